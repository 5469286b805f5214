//! `keap-sync reconcile`: Keap as it is, against the table. The mirror is brought up to date
//! (a full v2 listing, [`crate::mirror`]), then every user is classified ([`classify`]) from
//! its row, its mapping and the mirror: in sync, an owned property that differs in Keap, a
//! mapped contact gone, no contact yet, parked, or two contacts with its address. The report
//! changes nothing but the mirror: no Keap write, no change to the users table, the outbox or
//! the contact map. `--apply` queues each repairable user for delivery, having made its next
//! delivery rewrite what keap-sync owns (its record of what Keap holds is cleared). Nothing is
//! unlinked on the mirror's word (invariant 20): a contact the listing no longer saw is
//! confirmed gone by Keap's 404 to that delivery, which then links the user again by email;
//! delivery never makes a duplicate (invariant 4) and sends only owned properties (invariant 12).

mod classify;

use std::collections::{BTreeSet, HashMap};

use serde::Serialize;
use tokio_postgres::Client;

use crate::access::{AccessError, KeapAccess};
use crate::config::{Config, ConfigError};
use crate::db::{self, DbError};
use crate::mapping::{Held, Mapper};
use crate::mirror::{self, MirrorError};
use crate::outbox;
use crate::ratelimit::Reserving;
use crate::schema::{self, SchemaError, UserTable};

pub use crate::mirror::Listing;
pub use classify::Class;

/// Users read per statement.
const BATCH: usize = 1_000;

/// Why reconcile could not run. Its own variants rather than the daemon's `RunError`, so that
/// the daemon may run the report (a module of its layer uses another only without a cycle).
#[derive(Debug, thiserror::Error)]
pub enum ReconcileError {
    /// The configuration is incomplete or invalid.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// Schema `keap_sync` is missing or outdated, or the users table does not match the config.
    #[error(transparent)]
    Schema(#[from] SchemaError),
    /// The database could not be reached or answered with an error.
    #[error(transparent)]
    Db(#[from] DbError),
    /// Keap's client could not be set up (TLS).
    #[error("{0}")]
    Setup(String),
    /// Keap's listing failed; what was stored stays, and the next run resumes the listing.
    #[error("{0}")]
    Mirror(String),
}

impl From<MirrorError> for ReconcileError {
    fn from(e: MirrorError) -> Self {
        match e {
            MirrorError::Db(e) => ReconcileError::Db(e),
            other => ReconcileError::Mirror(other.to_string()),
        }
    }
}

impl From<AccessError> for ReconcileError {
    fn from(e: AccessError) -> Self {
        match e {
            AccessError::Config(e) => ReconcileError::Config(e),
            AccessError::Setup(message) => ReconcileError::Setup(message),
        }
    }
}

/// One user that is not in sync.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Drift {
    /// The user key.
    pub user: String,
    /// How it stands.
    pub class: Class,
    /// The contact it is linked to, if any.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub contact_id: Option<i64>,
    /// What differs: owned property paths, `tag <id>`, or the contacts sharing the address.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub differs: Vec<String>,
    /// With `show_values` only: each differing property's value in the table and in Keap.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub values: Vec<Difference>,
}

/// One owned property that differs, with both values (personal data: shown only when asked).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Difference {
    /// The property path, as `preview` names it (`given_name`, `phone_numbers.PHONE1.number`).
    pub path: String,
    /// The value the table gives it.
    pub table: serde_json::Value,
    /// The value Keap holds.
    pub keap: serde_json::Value,
}

/// What `reconcile` does besides reporting.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ReconcileOptions {
    /// Queue each repairable user for delivery.
    pub apply: bool,
    /// Put each differing property's values in the report (personal data).
    pub show_values: bool,
}

/// What a reconcile found (and, with `apply`, queued).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Report {
    /// The listing that refreshed the mirror.
    pub listing: Listing,
    /// Users compared.
    pub users: u64,
    /// Users in sync.
    pub in_sync: u64,
    /// Every user that is not, in key order.
    pub drift: Vec<Drift>,
    /// Users queued for delivery by `--apply`.
    pub queued: u64,
}

/// Lists every Keap contact into the mirror (resuming a listing stopped half-way), counting
/// the calls against the day like deliveries. Changes nothing in Keap or the users table.
pub async fn refresh_mirror(config: &Config) -> Result<Listing, ReconcileError> {
    let (client, pg) = connect(config).await?;
    list(config, &client, &pg).await
}

/// `keap-sync reconcile [KEYS…] [--apply]`: refreshes the mirror, then classifies `keys` (all
/// users when empty); with `apply`, queues the repairable ones for delivery.
pub async fn reconcile(
    config: &Config,
    keys: &[String],
    options: ReconcileOptions,
) -> Result<Report, ReconcileError> {
    let (client, pg) = connect(config).await?;
    let table = UserTable::resolve(&client, &config.users).await?;
    let mut report = Report { listing: list(config, &client, &pg).await?, ..Report::default() };
    let mapper = Mapper::new(&config.users);
    let mut after: Option<String> = None;
    loop {
        let batch = match keys.is_empty() {
            true => outbox::user_keys(&client, &table, after.as_deref(), BATCH as i64).await?,
            false if after.is_none() => keys.to_vec(),
            false => Vec::new(),
        };
        let Some(last) = batch.last().cloned() else { break };
        let found = compare(&client, &table, &mapper, &batch, options.show_values).await?;
        report.users += batch.len() as u64;
        report.in_sync += batch.len() as u64 - found.len() as u64;
        if options.apply {
            report.queued += repair(&client, &found).await?;
        }
        report.drift.extend(found);
        after = Some(last);
    }
    if keys.is_empty() {
        record_counts(&client, &report).await?;
    }
    Ok(report)
}

/// A connection at this binary's schema version, and the settings it was made from (the
/// listing's reservations open connections of their own).
async fn connect(config: &Config) -> Result<(Client, db::Target), ReconcileError> {
    let pg = db::parse(config.database()?)?;
    let client = db::connect(&pg).await?;
    schema::ensure_current(&client).await?;
    Ok((client, pg))
}

/// The full listing, with the day's calls reserved like the daemon's and the rest given back.
async fn list(config: &Config, client: &Client, pg: &db::Target) -> Result<Listing, ReconcileError> {
    let access = KeapAccess::build(config, pg)?;
    let reserving = Reserving::start(&access.limiter, pg);
    let mapper = Mapper::new(&config.users);
    let keap =
        mirror::Keap { client: &access.keap, tokens: &access.tokens, timeout: config.keap.request_timeout };
    let listed = mirror::list_all(client, &keap, &mapper).await;
    drop(reserving);
    access.limiter.give_back(client).await;
    Ok(listed?)
}

/// The users of `keys` that are not in sync, in key order.
async fn compare(
    client: &Client,
    table: &UserTable,
    mapper: &Mapper,
    keys: &[String],
    show_values: bool,
) -> Result<Vec<Drift>, DbError> {
    let mut rows = outbox::read_users(client, table, keys).await?;
    let maps = outbox::mappings(client, keys).await?;
    let parked = parked(client, keys).await?;
    let contact_ids: Vec<i64> = maps.values().map(|m| m.contact_id).collect();
    let contacts = mirror::contacts(client, &contact_ids).await?;
    let mut drift = Vec::new();
    let mut payloads = HashMap::new();
    for key in keys {
        let Some(row) = rows.remove(key) else { continue };
        payloads.insert(key.clone(), row.ok().and_then(|row| mapper.payload(key, &row, None).ok()));
    }
    let emails: Vec<String> =
        payloads.values().flatten().map(|p| p.email.trim().to_ascii_lowercase()).collect();
    let by_email = mirror::by_email1(client, &emails).await?;
    for key in keys {
        let Some(payload) = payloads.get(key) else { continue };
        let mapping = maps.get(key);
        let mapped = mapping.map(|m| {
            let held =
                payload.as_ref().map(|p| Held::of_mapping(m.sent.as_ref(), m.fingerprint.as_deref(), p));
            (m.contact_id, held.and_then(|h| h.tags().cloned()).unwrap_or_default())
        });
        let contact =
            mapping.and_then(|m| contacts.get(&m.contact_id)).map(|(json, tags)| (json, tags.as_slice()));
        let email = payload.as_ref().map(|p| p.email.trim().to_ascii_lowercase()).unwrap_or_default();
        let facts = classify::Facts {
            payload: payload.as_ref(),
            mapped,
            contact,
            by_email: by_email.get(&email).map_or(&[][..], Vec::as_slice),
            parked: parked.contains(key),
        };
        let (class, differs) = classify::classify(&facts);
        if class == Class::InSync {
            continue;
        }
        let values = match (show_values, payload, contact) {
            (true, Some(p), Some((json, _))) => p
                .differences(json)
                .into_iter()
                .map(|(path, table, keap)| Difference { path, table, keap })
                .collect(),
            _ => Vec::new(),
        };
        let contact_id = mapping.map(|m| m.contact_id);
        drift.push(Drift { user: key.clone(), class, contact_id, differs, values });
    }
    Ok(drift)
}

/// Keeps a whole-table run's counts by class (no key, no value) for `status`.
async fn record_counts(client: &Client, report: &Report) -> Result<(), DbError> {
    let mut counts = serde_json::Map::new();
    for d in &report.drift {
        let class = serde_json::to_value(d.class)
            .ok()
            .and_then(|v| v.as_str().map(str::to_owned))
            .unwrap_or_default();
        let n = counts.get(&class).and_then(serde_json::Value::as_i64).unwrap_or(0);
        counts.insert(class, n.saturating_add(1).into());
    }
    client
        .execute(
            "update keap_sync.mirror_state set reconciled_at = now(), reconciled_users = $1, drift = $2",
            &[&i64::try_from(report.users).unwrap_or(i64::MAX), &serde_json::Value::Object(counts)],
        )
        .await?;
    Ok(())
}

/// The users of `keys` whose change is parked.
async fn parked(client: &Client, keys: &[String]) -> Result<BTreeSet<String>, DbError> {
    let rows = client
        .query(
            "select user_key from keap_sync.outbox where user_key = any($1) and parked_at is not null",
            &[&keys],
        )
        .await?;
    Ok(rows.iter().map(|r| r.get(0)).collect())
}

/// Queues the repairable users for delivery, in one statement. The mirror only suggests
/// (invariant 20): nothing is unlinked here. A differing or gone user's record of what Keap
/// holds is cleared, so its next delivery sends every owned property to its contact (reading
/// it first for arrays); Keap then confirms a gone contact with a 404, and only then does
/// delivery link the user again by email, or create its contact. Users with no contact are
/// simply queued. Each at the backfill's priority, behind live changes. Returns how many.
async fn repair(client: &Client, drift: &[Drift]) -> Result<u64, DbError> {
    let rewrite: Vec<String> = drift
        .iter()
        .filter(|d| matches!(d.class, Class::Differs | Class::ContactGone))
        .map(|d| d.user.clone())
        .collect();
    let queue: Vec<String> = drift.iter().filter(|d| d.class.repairable()).map(|d| d.user.clone()).collect();
    if queue.is_empty() {
        return Ok(0);
    }
    let row = client
        .query_one(
            "with cleared as (
                 update keap_sync.contact_map set sent = null, fingerprint = ''
                  where user_key = any($1)
                 returning 1
             ), queued as (
                 insert into keap_sync.outbox (user_key, priority)
                 select k, 2 from unnest($2::text[]) k
                 on conflict (user_key) do update set version = keap_sync.outbox.version + 1
                 returning 1
             )
             select (select count(*) from queued), pg_notify($3, '')::text is null",
            &[&rewrite, &queue, &db::NOTIFY_CHANNEL],
        )
        .await?;
    Ok(u64::try_from(row.get::<_, i64>(0)).unwrap_or(0))
}
