//! Giving claims back: one claim, every claim of this instance, or those of instances that are
//! gone (found by their lost database sessions).

use std::time::Duration;

use tokio_postgres::Client;

use super::Claim;
use crate::db::{Db, DbError};

/// Gives back a claim without a result (shutdown, lost token), so it is retried at once by
/// whoever runs next. The attempt is not counted.
pub(crate) async fn release(client: &Db, claim: &Claim, instance: &str) -> Result<(), DbError> {
    client
        .cached_execute(
            "update keap_sync.outbox
                set lease_until = null, leased_by = null, attempts = greatest(attempts - 1, 0)
              where user_key = $1 and leased_by = $2 and attempts = $3",
            &[&claim.user_key, &instance, &claim.attempts],
        )
        .await?;
    Ok(())
}

/// Gives back every claim `instance` still holds (stop, or a new session after a lost
/// connection): claimable again after `after` (zero: at once), which covers a call that may
/// still be in flight at Keap for an aborted delivery.
pub(crate) async fn release_all(client: &Client, instance: &str, after: Duration) -> Result<u64, DbError> {
    Ok(client
        .execute(
            "update keap_sync.outbox
                set lease_until = case when $2::float8 > 0
                                       then least(lease_until, now() + make_interval(secs => $2)) end,
                    leased_by = null,
                    attempts = greatest(attempts - 1, 0)
              where leased_by = $1",
            &[&instance, &after.as_secs_f64()],
        )
        .await?)
}

/// An instance none of whose recorded database sessions (`keap_sync.instances.backend_pid` and
/// `backend_start`) is connected any more, as [`orphans`] finds it.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Orphan {
    pub(crate) instance: String,
    /// Where it ran and its process id, as its heartbeats said.
    pub(crate) host: String,
    pub(crate) pid: i32,
    /// Time since its last heartbeat.
    pub(crate) silent_for: Duration,
}

/// Every instance other than `instance` with no session of its own left connected. Such an
/// instance may be dead (killed, crashed), or alive on the other side of a database fail-over,
/// or under a role whose sessions this one cannot see: the caller decides which
/// (`daemon`). Reads only the small instances table.
pub(crate) async fn orphans(client: &Client, instance: &str) -> Result<Vec<Orphan>, DbError> {
    Ok(client
        .query(
            "select i.instance, i.host, i.pid, extract(epoch from now() - i.last_seen)::float8
               from keap_sync.instances i
              where i.instance <> $1
                and not exists (select from pg_catalog.pg_stat_activity a
                                 where a.pid = i.backend_pid and a.backend_start = i.backend_start)",
            &[&instance],
        )
        .await?
        .iter()
        .map(|r| Orphan {
            instance: r.get(0),
            host: r.get(1),
            pid: r.get(2),
            silent_for: Duration::from_secs_f64(r.get::<_, f64>(3).max(0.0)),
        })
        .collect())
}

/// Forgets the instances `gone` and releases their claims. Called only by the holder of the
/// delivery lock, for instances that can no longer have a call to Keap on the wire: their
/// claims would otherwise sit out their lease (two minutes by default). The attempt each claim
/// counted is given back, as in [`release_all`].
///
/// The outbox has no index on `leased_by` (claims stay HOT updates), so it is scanned only
/// when an instance is gone, not on every heartbeat.
pub(crate) async fn release_instances(client: &Client, gone: &[String]) -> Result<u64, DbError> {
    if gone.is_empty() {
        return Ok(0);
    }
    client.execute("delete from keap_sync.instances where instance = any($1)", &[&gone]).await?;
    Ok(client
        .execute(
            "update keap_sync.outbox
                set lease_until = null, leased_by = null, attempts = greatest(attempts - 1, 0)
              where leased_by = any($1)",
            &[&gone],
        )
        .await?)
}
