//! Keap: the credential (an API key, or the stored OAuth grant's state and expiry), one
//! read-only call with it (`GET /v1/contacts/model`, which is also what custom field names
//! resolve against) and the limits in force after Keap's answer, then every custom field and
//! tag the mapping names, resolved as delivery resolves them (`catalog`).
//!
//! The calls go through the configuration's client and limiter (`access::KeapAccess`) and are
//! counted in `keap_sync.quota_usage` one by one as they are made (`Reserving::start_exact`,
//! as `preview` does); what was reserved and not used is given back at the end.

use std::collections::BTreeSet;
use std::time::Duration;

use tokio::time::Instant;

use super::connection::Connected;
use super::{Check, Report, Step, CREDENTIAL, KEAP, NAMES};
use crate::access::KeapAccess;
use crate::catalog::{Catalog, Tags};
use crate::config::{Config, Credential, OnDelete, TagRef, TagTemplate};
use crate::keap::{Auth, ErrorKind, KeapError};
use crate::mapping::Mapper;
use crate::ratelimit::Reserving;
use crate::status::{human_secs, Status, Token};
use crate::token::{GrantState, TokenError, REAUTHORIZE_HINT};

/// A refresh token older than this is about to lapse (Keap's lapse after 45 days).
const REFRESH_TOKEN_WARN: Duration = Duration::from_secs(40 * 86_400);

/// The Keap checks: the credential, the call, the names; calls counted, leftovers given back.
pub(super) async fn checks(report: &mut Report, config: &Config, db: &Connected, status: Option<&Status>) {
    let Some(access) = report.take(credential(config, db, status)) else {
        report.skip(&[KEAP, NAMES], "no usable Keap credential");
        return;
    };
    let reserving = Reserving::start_exact(&access.limiter, &db.target);
    let catalog = Catalog::default();
    match report.take(reachable(config, db, &access, &catalog).await) {
        Some(auth) => report.push(names(config, &access, &catalog, &auth).await),
        None => report.skip(&[NAMES], "Keap was not reached"),
    }
    drop(reserving);
    access.limiter.give_back(&db.client).await;
}

/// The credential configured, and for OAuth the stored grant: usable, and how long it lasts.
fn credential(config: &Config, db: &Connected, status: Option<&Status>) -> Step<KeapAccess> {
    let credential =
        match config.credential() {
            Ok(c) => c,
            Err(e) => return Step::failed(Check::fail(
                CREDENTIAL,
                e.to_string(),
                "set KEAP_API_KEY (or `api_key_file` under [keap], or the systemd credential keap-api-key), \
                 or KEAP_CLIENT_ID and KEAP_CLIENT_SECRET for OAuth",
            )),
        };
    let check = match credential {
        Credential::ApiKey(_) => {
            Check::ok(CREDENTIAL, "an API key (sent as X-Keap-API-Key; nothing to refresh)")
        }
        Credential::OAuth { client_id, .. } => match grant(client_id, status) {
            Ok(check) => check,
            Err(check) => return Step::failed(check),
        },
    };
    match KeapAccess::build(config, &db.target) {
        Ok(access) => Step::found(check, access),
        Err(e) => Step::failed(Check::fail(CREDENTIAL, e.to_string(), "see the message")),
    }
}

/// The stored OAuth grant's line: usable (a warning when its refresh token is near Keap's
/// lapse), or the failure that asks for a new one.
fn grant(client_id: &str, status: Option<&Status>) -> Result<Check, Check> {
    let fix = || format!("store a grant: {REAUTHORIZE_HINT}");
    let Some(status) = status else {
        return Err(Check::fail(
            CREDENTIAL,
            "cannot read the stored grant (keap_sync.oauth_token)",
            "see the log",
        ));
    };
    let Some(t) = &status.token else {
        return Err(Check::fail(
            CREDENTIAL,
            format!("OAuth client {client_id}, but no grant is stored"),
            fix(),
        ));
    };
    if t.state == GrantState::ReauthorizationNeeded {
        let why = t.detail.as_deref().unwrap_or("Keap refused the grant");
        return Err(Check::fail(
            CREDENTIAL,
            format!("OAuth client {client_id}: re-authorisation needed: {why}"),
            fix(),
        ));
    }
    let detail = grant_detail(client_id, t);
    if t.refresh_token_age_secs >= REFRESH_TOKEN_WARN.as_secs_f64() {
        return Ok(Check::warn(
            CREDENTIAL,
            detail,
            "start the daemon soon: it refreshes a grant whose refresh token is `refresh_token_max_age_days` old \
             (or the grant lapses at 45 days and needs `keap-sync auth login`)",
        ));
    }
    Ok(Check::ok(CREDENTIAL, detail))
}

/// "OAuth client C, grant for app A: ok; access token expires in …; refresh token … old".
fn grant_detail(client_id: &str, t: &Token) -> String {
    let app = t.account.as_deref().unwrap_or("an app its scope does not name");
    let access = if t.expires_in_secs > 0.0 {
        format!("access token expires in {}", human_secs(t.expires_in_secs))
    } else {
        "access token expired (refreshed on next use)".to_owned()
    };
    format!(
        "OAuth client {client_id}, grant for {app}: ok; {access}; refresh token {} old (Keap lets it lapse at 45 days)",
        human_secs(t.refresh_token_age_secs)
    )
}

/// One read-only call with the credential, and the limits in force after Keap's answer.
async fn reachable(config: &Config, db: &Connected, access: &KeapAccess, catalog: &Catalog) -> Step<Auth> {
    let auth = match access.tokens.auth(&db.client).await {
        Ok(auth) => auth,
        Err(e) => {
            let fix = match &e {
                TokenError::Transient(_) => format!(
                    "the token endpoint ({}) failed: check keap.token_url (KEAP_TOKEN_URL) and the network",
                    config.keap.token_url
                ),
                TokenError::Db(_) => "see the server's message".to_owned(),
                _ => format!("store a grant: {REAUTHORIZE_HINT}"),
            };
            return Step::failed(Check::fail(KEAP, e.to_string(), fix));
        }
    };
    let started = Instant::now();
    let deadline = started + config.keap.request_timeout * 2;
    match catalog.model(&access.keap, &auth, deadline).await {
        Ok(model) => {
            let detail = format!(
                "{} answered GET /v1/contacts/model in {} ms ({} custom fields); {}",
                config.keap.api_url,
                started.elapsed().as_millis(),
                model.fields.len(),
                limits(config, access, db).await
            );
            Step::found(Check::ok(KEAP, detail), auth)
        }
        Err(e) => Step::failed(Check::fail(KEAP, e.to_string(), call_fix(&e, config))),
    }
}

/// What to do about a failed read-only call.
fn call_fix(e: &KeapError, config: &Config) -> String {
    let api_key = matches!(config.keap.credential, Some(Credential::ApiKey(_)));
    match e.kind {
        ErrorKind::Unauthorized if api_key => "Keap refused the API key: check KEAP_API_KEY or the key file \
            (keys are managed under Settings > API in Keap)"
            .to_owned(),
        ErrorKind::Unauthorized => format!("Keap refused the grant: {REAUTHORIZE_HINT}"),
        ErrorKind::Forbidden => {
            "the credential may not read contacts: use a key, or an app's user, with access \
            to contacts"
                .to_owned()
        }
        ErrorKind::Throttled => {
            "Keap's limits are spent for now: run doctor again in a minute (the day's quota \
            resets at 00:00 UTC)"
                .to_owned()
        }
        ErrorKind::Transient => {
            "check keap.api_url (KEAP_API_URL), name resolution, and any proxy or firewall \
            between here and Keap"
                .to_owned()
        }
        ErrorKind::NotFound | ErrorKind::Rejected => format!(
            "check keap.api_url (KEAP_API_URL): it is {}, Keap's REST base is {}",
            config.keap.api_url,
            crate::config::DEFAULT_API_URL
        ),
    }
}

/// "limits in force: 10/s, 240/min, 30000/day; Keap reports …; N counted today".
async fn limits(config: &Config, access: &KeapAccess, db: &Connected) -> String {
    let l = &config.limits;
    let minute = access.limiter.minute_limit();
    let mut text = format!("limits in force: {}/s, {minute}/min", l.per_second);
    if minute < l.per_minute {
        text.push_str(&format!(" (as Keap reports; {} configured)", l.per_minute));
    }
    text.push_str(&format!(", {}/day", l.per_day));
    let report = access.limiter.report();
    if let (Some(m), Some(d)) = (report.minute_available, report.day_available) {
        text.push_str(&format!("; Keap reports {m} calls left this minute, {d} today"));
    }
    if let Ok(n) = access.limiter.counted_today(&db.client).await {
        text.push_str(&format!("; {n} counted today by keap-sync"));
    }
    text
}

/// Every custom field and every tag the configuration names, resolved in Keap.
async fn names(config: &Config, access: &KeapAccess, catalog: &Catalog, auth: &Auth) -> Check {
    let deadline = Instant::now() + config.keap.request_timeout * 2;
    let mapper = Mapper::new(&config.users);
    let (mut found, mut problems, mut fixes) = (Vec::new(), Vec::new(), Vec::new());
    if mapper.needs_model() {
        match catalog.model(&access.keap, auth, deadline).await.map(|m| mapper.check_model(m)) {
            Ok(Ok(())) => found.push("every mapped custom field".to_owned()),
            Ok(Err(missing)) => {
                problems.push(missing);
                fixes.push("create the custom field in Keap, or correct the mapping".to_owned());
            }
            Err(e) => problems.push(format!("cannot read Keap's contact model: {e}")),
        }
    }
    let refs = tag_names(config);
    if !refs.is_empty() {
        let create = config.users.contact.tags.create_missing;
        match catalog.tag_ids(&access.keap, auth, &refs, false, deadline).await {
            Ok(Tags::Ids(ids)) if ids.len() == 1 => found.push("the tag the mapping names".to_owned()),
            Ok(Tags::Ids(ids)) => found.push(format!("the {} tags the mapping names", ids.len())),
            Ok(Tags::Missing(missing)) if create => found.push(format!(
                "tag names ({} to be created on first use: [tags] create_missing = true)",
                missing.join(", ")
            )),
            Ok(Tags::Missing(missing)) => {
                problems.push(format!("Keap has no tag named {}", missing.join(", ")));
                fixes.push(
                    "create the tag in Keap (the exact name), or set `[tags] create_missing = true`".into(),
                );
            }
            Err(e) => problems.push(format!("cannot look tags up: {e}")),
        }
    }
    names_check(config, found, problems, fixes)
}

/// The names line from what was found and what was not.
fn names_check(config: &Config, found: Vec<String>, problems: Vec<String>, fixes: Vec<String>) -> Check {
    let templates =
        config.users.contact.tags.rules.iter().filter(|r| matches!(r.tag, TagTemplate::Named(_))).count();
    let later = match templates {
        0 => String::new(),
        n => format!("; {n} tag templates name their tags from row values, looked up when used"),
    };
    if !problems.is_empty() {
        let fix = if fixes.is_empty() { "see the message".to_owned() } else { fixes.join("; ") };
        return Check::fail(NAMES, problems.join("; "), fix);
    }
    if found.is_empty() {
        return Check::ok(NAMES, format!("the mapping names no custom field or tag by name{later}"));
    }
    Check::ok(NAMES, format!("Keap has {}{later}", found.join(" and ")))
}

/// The tags named (not by id) by `on_create`, the rules without `{value}` and `on_delete`.
fn tag_names(config: &Config) -> BTreeSet<TagRef> {
    let tags = &config.users.contact.tags;
    let rules = tags.rules.iter().filter_map(|r| match &r.tag {
        TagTemplate::When(t) => Some(t),
        TagTemplate::Named(_) => None,
    });
    let on_delete = match &config.delivery.on_delete {
        OnDelete::Tag { tag, .. } => Some(tag),
        _ => None,
    };
    tags.on_create
        .iter()
        .chain(rules)
        .chain(on_delete)
        .filter(|t| matches!(t, TagRef::Name(_)))
        .cloned()
        .collect()
}
