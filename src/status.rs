//! `keap-sync status`: is it healthy and how far behind is it — read from the database alone,
//! so it works from any host, whether or not a daemon runs there. The daemon writes what this
//! reads (its heartbeat in `keap_sync.instances`); the CLI renders it (`cli::render`).

use serde::Serialize;
use tokio_postgres::Client;

use crate::backfill::{self, Progress};
use crate::db::DbError;
use crate::token::GrantState;

/// What an instance is doing, as its heartbeat records it (the column keeps the text).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub(crate) enum InstanceRole {
    /// Holds the delivery lock and delivers.
    Active,
    /// Waits to take over from the active instance.
    Standby,
}

impl InstanceRole {
    /// The role as `keap_sync.instances.role` spells it.
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            InstanceRole::Active => "active",
            InstanceRole::Standby => "standby",
        }
    }

    /// The role `keap_sync.instances.role` holds; any other text is an error naming the column.
    fn from_db(text: &str) -> Result<Self, DbError> {
        match text {
            "active" => Ok(InstanceRole::Active),
            "standby" => Ok(InstanceRole::Standby),
            other => Err(DbError::unknown_value("keap_sync.instances.role", other)),
        }
    }
}

/// A duration in seconds for people: "45 s", "12 min", "3.5 h", "2.0 days". Here, with the
/// views that report ages (`status`, `doctor`), for the CLI to print.
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

/// Instances whose heartbeat is older than this are not counted as alive.
const ALIVE_SECS: f64 = 30.0;

#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub(crate) struct Depth {
    pub live: i64,
    pub retry: i64,
    pub backfill: i64,
    pub parked: i64,
    /// Changes captured but not yet folded into the outbox (rows of `keap_sync.change`; several
    /// can be one user's). Near zero while a daemon runs: it folds on every notification.
    /// Counted up to [`CAPTURED_COUNT_LIMIT`]: a log that holds more says that many.
    pub captured: i64,
    /// Age of the oldest change not yet delivered (parked ones excluded).
    #[serde(skip)]
    pub oldest_pending_age_secs: Option<f64>,
}

/// How many rows of the change log [`depth`] reads at most.
pub(crate) const CAPTURED_COUNT_LIMIT: i64 = 100_000;

/// Outbox depth by kind and the oldest pending change's age, without counting the outbox: the
/// sums of `keap_sync.outbox_count` (kept by triggers on the outbox, `sql/0009_queue_counts.sql`)
/// and the first entry of the index on `first_changed_at`. Exact, and as cheap for a backlog of
/// millions as for an empty queue: the count table holds one row per kind once folded
/// ([`compact_counts`], on the active daemon's heartbeat), plus one per statement that changed a
/// row's kind since. Without a daemon running it grows by those deltas (a read sums them, still
/// far fewer rows than the outbox's) until the next fold.
///
/// The change log is counted: it has no index to ask, and it is short while a daemon runs (the
/// daemon folds it on every notification). After an outage, or with the fold broken, it can
/// hold millions of rows, and this runs on the daemon's shared connection before each fold: a
/// count of the whole log past `statement_timeout` failed the session every time, so it never
/// folded. So the count (and the oldest time) reads at most [`CAPTURED_COUNT_LIMIT`] rows, the
/// ones the next fold takes first.
pub(crate) async fn depth(client: &Client) -> Result<Depth, DbError> {
    let r = client
        .query_one(
            "select q.live, q.retry, q.backfill, q.parked, c.n,
                    extract(epoch from now() - least(
                        (select min(first_changed_at) from keap_sync.outbox where parked_at is null), c.at))::float8
               from (select coalesce(sum(n) filter (where not parked and priority = 0), 0)::int8 as live,
                            coalesce(sum(n) filter (where not parked and priority = 1), 0)::int8 as retry,
                            coalesce(sum(n) filter (where not parked and priority = 2), 0)::int8 as backfill,
                            coalesce(sum(n) filter (where parked), 0)::int8 as parked
                       from keap_sync.outbox_count) q,
                    -- One bounded scan of the log for both figures.
                    (select count(*) as n, min(at) as at
                       from (select at from keap_sync.change limit $1) l) c",
            &[&CAPTURED_COUNT_LIMIT],
        )
        .await?;
    Ok(Depth {
        live: r.get(0),
        retry: r.get(1),
        backfill: r.get(2),
        parked: r.get(3),
        captured: r.get(4),
        oldest_pending_age_secs: r.get(5),
    })
}

/// Folds the count deltas into one row per kind. Deltas whose transactions are still open are
/// not visible, so they stay and are folded next time; two folds at once each fold only what
/// they deleted, so the sums never change.
pub(crate) async fn compact_counts(client: &Client) -> Result<(), DbError> {
    client
        .execute(
            "with folded as (
                 delete from keap_sync.outbox_count returning priority, parked, n
             )
             insert into keap_sync.outbox_count (priority, parked, n)
             select priority, parked, sum(n) from folded group by 1, 2 having sum(n) <> 0",
            &[],
        )
        .await?;
    Ok(())
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub(crate) struct Instance {
    pub instance: String,
    pub role: InstanceRole,
    pub last_seen_secs_ago: f64,
    pub paused_reason: Option<String>,
    /// 429 answers this instance has had since it started.
    pub throttled: i64,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub(crate) struct Token {
    pub state: GrantState,
    pub detail: Option<String>,
    pub expires_in_secs: f64,
    pub refresh_token_age_secs: f64,
    /// The Keap app the grant is for (`None`: its scope named none).
    pub account: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub(crate) struct Status {
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
    /// keap-sync's mirror of Keap: how fresh, and the last reconcile's counts.
    pub mirror: crate::mirror::Freshness,
    /// Our hook subscriptions as last seen in Keap (the watchdog, `keap-sync hooks`), URLs
    /// masked; empty when none were recorded.
    pub hooks: Vec<HookHealth>,
    /// Conflicts over shared properties recorded in `keap_sync.conflict`.
    pub conflicts: Conflicts,
}

/// The conflicts `prefer` settled (`owner = "shared"`), as `keap_sync.conflict` records them.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub(crate) struct Conflicts {
    pub total: i64,
    pub last_day: i64,
    pub last_secs_ago: Option<f64>,
}

/// One of our hooks as last seen in Keap.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub(crate) struct HookHealth {
    pub event_key: String,
    /// `Verified`, `Unverified` or `Inactive`.
    pub status: String,
    /// The hook's URL, the secret path masked.
    pub url: String,
    pub checked_secs_ago: f64,
}

/// Everything `status` shows: queue depth, backfill, token, live instances, the active one's quota
/// report and the last delivery's age.
pub(crate) async fn read(client: &Client) -> Result<Status, DbError> {
    let depth = depth(client).await?;
    let token = client
        .query_opt(
            "select state, state_detail, extract(epoch from expires_at - now())::float8,
                    extract(epoch from now() - refresh_token_issued_at)::float8, account
               from keap_sync.oauth_token where id = 1",
            &[],
        )
        .await?
        .map(|r| {
            Ok::<_, DbError>(Token {
                state: GrantState::from_db(r.get(0))?,
                detail: r.get(1),
                expires_in_secs: r.get(2),
                refresh_token_age_secs: r.get(3),
                account: r.get(4),
            })
        })
        .transpose()?;
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
            Ok((
                Instance {
                    instance: r.get(0),
                    role: InstanceRole::from_db(r.get(1))?,
                    last_seen_secs_ago: r.get(2),
                    paused_reason: r.get(3),
                    throttled: r.get(6),
                },
                r.get(4),
                r.get(5),
            ))
        })
        .collect::<Result<_, DbError>>()?;
    let last_delivery: Option<f64> = client
        .query_one(
            "select extract(epoch from now() - max(synced_at))::float8 from keap_sync.contact_map",
            &[],
        )
        .await?
        .get(0);
    let quota = instances.iter().find(|(i, _, _)| i.role == InstanceRole::Active).map(|(_, m, d)| (*m, *d));
    Ok(Status {
        oldest_pending_age_secs: depth.oldest_pending_age_secs,
        outbox: depth,
        backfill: backfill::progress(client).await?,
        token,
        quota_minute_available: quota.and_then(|q| q.0),
        quota_day_available: quota.and_then(|q| q.1),
        last_delivery_secs_ago: last_delivery,
        instances_alive: instances.into_iter().map(|(i, _, _)| i).collect(),
        mirror: crate::mirror::freshness(client).await?,
        conflicts: conflicts(client).await?,
        hooks: crate::hooks::recorded(client)
            .await?
            .into_iter()
            .map(|(h, ago)| HookHealth {
                event_key: h.event_key,
                status: h.status,
                url: h.url,
                checked_secs_ago: ago,
            })
            .collect(),
    })
}

/// How many conflicts were recorded, in all and in the last day, and how long ago the last.
async fn conflicts(client: &Client) -> Result<Conflicts, DbError> {
    let r = client
        .query_one(
            "select count(*), count(*) filter (where at > now() - interval '1 day'),
                    extract(epoch from now() - max(at))::float8
               from keap_sync.conflict",
            &[],
        )
        .await?;
    Ok(Conflicts { total: r.get(0), last_day: r.get(1), last_secs_ago: r.get(2) })
}

#[cfg(test)]
mod tests {
    use super::human_secs;

    #[test]
    fn durations_read_naturally() {
        assert_eq!(human_secs(45.2), "45 s");
        assert_eq!(human_secs(720.0), "12 min");
        assert_eq!(human_secs(12_600.0), "3.5 h");
        assert_eq!(human_secs(172_800.0), "2.0 days");
        assert_eq!(human_secs(-3.0), "0 s");
    }
}
