//! Claiming due rows with a lease (committed before any Keap call), and when the next row is due.

use std::time::Duration;

use super::Claim;
use crate::db::{Db, DbError};

/// Timing knobs for [`claim`].
#[derive(Debug, Clone, Copy)]
pub(crate) struct ClaimTiming {
    pub lease: Duration,
    /// A change is claimed once the user has been quiet this long...
    pub settle: Duration,
    /// ...or once it has waited this long, so a user who never goes quiet still syncs.
    pub max_settle: Duration,
}

/// Claims up to `limit` due rows for `instance`, oldest schedule first.
pub(crate) async fn claim(
    client: &Db,
    instance: &str,
    limit: i64,
    t: ClaimTiming,
) -> Result<Vec<Claim>, DbError> {
    let rows = client
        .cached_query(
            "with due as (
                 select user_key from keap_sync.outbox
                  where parked_at is null
                    and next_attempt_at <= now()
                    and (changed_at <= now() - make_interval(secs => $3)
                         or first_changed_at <= now() - make_interval(secs => $4))
                    and (lease_until is null or lease_until < now())
                  order by priority, next_attempt_at
                  limit $1
                  for update skip locked
             )
             update keap_sync.outbox o
                set lease_until = now() + make_interval(secs => $2),
                    leased_by   = $5,
                    attempts    = o.attempts + 1
               from due
               left join keap_sync.contact_map m on m.user_key = due.user_key
              where o.user_key = due.user_key
          returning o.user_key, o.version, o.attempts, m.contact_id, m.fingerprint, m.sent, o.create_sent",
            &[
                &limit,
                &t.lease.as_secs_f64(),
                &t.settle.as_secs_f64(),
                &t.max_settle.as_secs_f64(),
                &instance,
            ],
        )
        .await?;
    Ok(rows
        .iter()
        .map(|r| Claim {
            user_key: r.get(0),
            version: r.get(1),
            attempts: r.get(2),
            contact_id: r.get(3),
            fingerprint: r.get(4),
            sent: r.get(5),
            create_sent: r.get(6),
        })
        .collect())
}

/// When the loop should claim again, after a claim that took fewer rows than it asked for.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct NextDue {
    /// How long until the earliest pending row that was not due at the claim becomes due (zero
    /// if one became due since); `None` if there is none.
    pub(crate) due_in: Option<Duration>,
    /// Some row was already due at the claim, yet the claim did not take it: an open
    /// transaction holds its lock (an application transaction that changed the user and has not
    /// committed, typically), and `skip locked` passed it over. Claiming again at once would
    /// only skip it again; its commit sends a NOTIFY anyway.
    pub(crate) skipped_locked: bool,
}

/// How long until the next row becomes claimable, looking past rows the last claim skipped
/// because someone else holds their lock. `since_claim` is how long ago the claim was sent: a
/// row that was due by then and is still here was skipped (the caller asks only after a claim
/// that took fewer rows than its limit, so the limit did not leave it). Looks at the 1,000
/// earliest schedules of each priority only; anything later is found by the regular poll.
///
/// One index range scan per priority (`outbox_claim_idx` is `(priority, next_attempt_at)`), so
/// the cost does not grow with the backlog; ordering all pending rows by `next_attempt_at`
/// alone would sort every one of them.
pub(crate) async fn next_due_in(
    client: &Db,
    t: ClaimTiming,
    since_claim: Duration,
) -> Result<NextDue, DbError> {
    let row = client
        .cached_query_one(
            "with pending as (
                 (select next_attempt_at, changed_at, first_changed_at, lease_until from keap_sync.outbox
                   where parked_at is null and priority = 0 order by next_attempt_at limit 1000)
                 union all
                 (select next_attempt_at, changed_at, first_changed_at, lease_until from keap_sync.outbox
                   where parked_at is null and priority = 1 order by next_attempt_at limit 1000)
                 union all
                 (select next_attempt_at, changed_at, first_changed_at, lease_until from keap_sync.outbox
                   where parked_at is null and priority = 2 order by next_attempt_at limit 1000)
             ), due as (
                 select greatest(
                            next_attempt_at,
                            least(changed_at + make_interval(secs => $1), first_changed_at + make_interval(secs => $2)),
                            coalesce(lease_until, '-infinity')) as at
                   from pending
             )
             select extract(epoch from min(at) filter (where at > now() - make_interval(secs => $3)) - now())::float8,
                    coalesce(bool_or(at <= now() - make_interval(secs => $3)), false)
               from due",
            &[&t.settle.as_secs_f64(), &t.max_settle.as_secs_f64(), &since_claim.as_secs_f64()],
        )
        .await?;
    let secs: Option<f64> = row.get(0);
    Ok(NextDue { due_in: secs.map(|s| Duration::from_secs_f64(s.max(0.0))), skipped_locked: row.get(1) })
}
