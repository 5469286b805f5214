//! `keap-sync status`: is it healthy and how far behind is it — read from the database alone,
//! so it works from any host, whether or not a daemon runs there.

use serde::Serialize;
use tokio_postgres::Client;

use crate::backfill::{self, Progress};
use crate::db::DbError;

/// Instances whose heartbeat is older than this are not counted as alive.
const ALIVE_SECS: f64 = 30.0;

#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Depth {
    pub live: i64,
    pub retry: i64,
    pub backfill: i64,
    pub parked: i64,
    /// Age of the oldest change not yet delivered (parked ones excluded).
    #[serde(skip)]
    pub oldest_pending_age_secs: Option<f64>,
}

/// Outbox depth by kind and the oldest pending change's age: one scan of the outbox.
pub async fn depth(client: &Client) -> Result<Depth, DbError> {
    let r = client
        .query_one(
            "select count(*) filter (where parked_at is null and priority = 0),
                    count(*) filter (where parked_at is null and priority = 1),
                    count(*) filter (where parked_at is null and priority = 2),
                    count(*) filter (where parked_at is not null),
                    extract(epoch from now() - min(first_changed_at) filter (where parked_at is null))::float8
               from keap_sync.outbox",
            &[],
        )
        .await?;
    Ok(Depth {
        live: r.get(0),
        retry: r.get(1),
        backfill: r.get(2),
        parked: r.get(3),
        oldest_pending_age_secs: r.get(4),
    })
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Instance {
    pub instance: String,
    pub role: String,
    pub last_seen_secs_ago: f64,
    pub paused_reason: Option<String>,
    /// 429 answers this instance has had since it started.
    pub throttled: i64,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Token {
    pub state: String,
    pub detail: Option<String>,
    pub expires_in_secs: f64,
    pub refresh_token_age_secs: f64,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Status {
    pub outbox: Depth,
    /// Age of the oldest change not yet delivered (parked ones excluded).
    pub oldest_pending_age_secs: Option<f64>,
    pub backfill: Option<Progress>,
    /// The stored OAuth grant, if any (an API-key setup has none).
    pub token: Option<Token>,
    /// Keap's per-minute and per-day calls left, from the freshest live instance's last answer.
    pub quota_minute_available: Option<i64>,
    pub quota_day_available: Option<i64>,
    pub last_delivery_secs_ago: Option<f64>,
    pub instances_alive: Vec<Instance>,
}

pub async fn read(client: &Client) -> Result<Status, DbError> {
    let depth = depth(client).await?;
    let token = client
        .query_opt(
            "select state, state_detail, extract(epoch from expires_at - now())::float8,
                    extract(epoch from now() - refresh_token_issued_at)::float8
               from keap_sync.oauth_token where id = 1",
            &[],
        )
        .await?
        .map(|r| Token {
            state: r.get(0),
            detail: r.get(1),
            expires_in_secs: r.get(2),
            refresh_token_age_secs: r.get(3),
        });
    let instances: Vec<(Instance, Option<i64>, Option<i64>)> = client
        .query(
            "select instance, role, extract(epoch from now() - last_seen)::float8, paused_reason,
                    quota_minute_available, quota_day_available, throttled
               from keap_sync.instances
              where last_seen > now() - make_interval(secs => $1)
              order by last_seen desc",
            &[&ALIVE_SECS],
        )
        .await?
        .iter()
        .map(|r| {
            (
                Instance {
                    instance: r.get(0),
                    role: r.get(1),
                    last_seen_secs_ago: r.get(2),
                    paused_reason: r.get(3),
                    throttled: r.get(6),
                },
                r.get(4),
                r.get(5),
            )
        })
        .collect();
    let last_delivery: Option<f64> = client
        .query_one(
            "select extract(epoch from now() - max(synced_at))::float8 from keap_sync.contact_map",
            &[],
        )
        .await?
        .get(0);
    let quota = instances.iter().find(|(i, _, _)| i.role == "active").map(|(_, m, d)| (*m, *d));
    Ok(Status {
        oldest_pending_age_secs: depth.oldest_pending_age_secs,
        outbox: depth,
        backfill: backfill::progress(client).await?,
        token,
        quota_minute_available: quota.and_then(|q| q.0),
        quota_day_available: quota.and_then(|q| q.1),
        last_delivery_secs_ago: last_delivery,
        instances_alive: instances.into_iter().map(|(i, _, _)| i).collect(),
    })
}

/// The human rendering.
pub fn render(s: &Status) -> String {
    let mut out = String::new();
    let mut line = |l: String| {
        out.push_str(&l);
        out.push('\n');
    };
    let o = &s.outbox;
    line(format!(
        "queue: {} live, {} retrying, {} backfill, {} parked{}",
        o.live,
        o.retry,
        o.backfill,
        o.parked,
        if o.parked > 0 { " (see `keap-sync failures list`)" } else { "" }
    ));
    line(match s.oldest_pending_age_secs {
        Some(age) => format!("oldest pending change: {}", human_secs(age)),
        None => "oldest pending change: none (all delivered)".into(),
    });
    line(match s.last_delivery_secs_ago {
        Some(ago) => format!("last delivery: {} ago", human_secs(ago)),
        None => "last delivery: never".into(),
    });
    if let Some(b) = &s.backfill {
        line(format!("backfill: {} — {}", b.state, backfill::describe(b, 0.0)));
    }
    match &s.token {
        Some(t) if t.state == "ok" => line(format!(
            "oauth: ok; access token expires in {}; refresh token {} old",
            human_secs(t.expires_in_secs.max(0.0)),
            human_secs(t.refresh_token_age_secs)
        )),
        Some(t) => line(format!(
            "oauth: RE-AUTHORISATION NEEDED: {}; run `keap-sync auth login`",
            t.detail.as_deref().unwrap_or("the grant was refused")
        )),
        None => line("oauth: no grant stored (fine with an API key)".into()),
    }
    if let (Some(m), Some(d)) = (s.quota_minute_available, s.quota_day_available) {
        line(format!("keap quota left: {m} this minute, {d} today"));
    }
    if s.instances_alive.is_empty() {
        line("instances: none running".into());
    }
    for i in &s.instances_alive {
        line(format!(
            "instance {}: {}{}, seen {} ago, {} answered 429 since start",
            i.instance,
            i.role,
            i.paused_reason.as_deref().map(|r| format!(" (PAUSED: {r})")).unwrap_or_default(),
            human_secs(i.last_seen_secs_ago),
            i.throttled
        ));
    }
    out
}

/// A duration in seconds for people: "45 s", "12 min", "3.5 h", "2.0 days".
pub(crate) fn human_secs(s: f64) -> String {
    let s = s.max(0.0);
    if s < 120.0 {
        format!("{s:.0} s")
    } else if s < 7_200.0 {
        format!("{:.0} min", s / 60.0)
    } else if s < 172_800.0 {
        format!("{:.1} h", s / 3_600.0)
    } else {
        format!("{:.1} days", s / 86_400.0)
    }
}
