//! The day's quota: calls reserved in blocks from `keap_sync.quota_usage`, shared by every
//! instance, by the reserver task; the pause when the day is spent.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::time::Instant;
use tokio_postgres::Client;
use tokio_util::sync::CancellationToken;

use super::{CredentialKind, Limiter};
use crate::db::{self, DbError};

/// Rows of `keap_sync.quota_usage` older than this many days are deleted.
const KEEP_DAYS: i32 = 31;

/// The day's calls this process has reserved in `keap_sync.quota_usage` and not used yet.
pub(super) struct DayBudget {
    /// The UTC day (days since 1970-01-01) the reservations in hand belong to.
    pub(super) day: i32,
    pub(super) in_hand: u32,
    /// The database granted less than asked: today's count has reached the per-day limit.
    pub(super) spent: bool,
    /// The spent day's pause has been logged.
    pub(super) announced: bool,
    /// Given back at a clean stop: nothing more is reserved or admitted.
    pub(super) closed: bool,
    pub(super) per_day: u32,
    /// Calls asked for per reservation.
    pub(super) block: u32,
}

impl DayBudget {
    /// Starts a new day's count when the UTC date changed; yesterday's leftovers do not count
    /// for today.
    pub(super) fn roll(&mut self, today: i32) {
        if self.day != today {
            *self = DayBudget { day: today, in_hand: 0, spent: false, announced: false, ..*self };
        }
    }

    /// True when a reservation should be under way: half a block or less in hand.
    pub(super) fn low(&self) -> bool {
        !self.closed && !self.spent && self.in_hand <= self.block / 2
    }
}

impl Limiter {
    /// Today's count has reached the per-day limit: every sender pauses until 00:00 UTC.
    pub(super) fn day_spent(&self) {
        let first = {
            let mut w = self.windows();
            !std::mem::replace(&mut w.day.announced, true)
        };
        self.day_available.store(0, Ordering::Relaxed);
        let until = self.pause_for(until_next_utc_midnight());
        if first {
            tracing::warn!(
                resume_in_secs = until.saturating_duration_since(Instant::now()).as_secs(),
                "the daily quota (limits.per_day, counted in keap_sync.quota_usage) is used up; deliveries pause until 00:00 UTC (changes stay queued)"
            );
        }
    }

    /// The reservation to make now, if one is needed: (UTC day, calls to ask for).
    pub(super) fn top_up_wanted(&self) -> Option<(i32, u32)> {
        let mut w = self.windows();
        w.day.roll(utc_day());
        w.day.low().then_some((w.day.day, w.day.block))
    }

    /// Adds what the database granted for `day` and wakes the senders waiting for it.
    pub(super) fn credit(&self, day: i32, asked: u32, granted: u32) {
        {
            let mut w = self.windows();
            w.day.roll(utc_day());
            // Reserved for a day that has ended meanwhile, or after the give-back: lost, which
            // only makes the count higher than the calls made.
            if w.day.day == day && !w.day.closed {
                w.day.in_hand += granted;
                w.day.spent |= granted < asked;
            }
        }
        self.budget_changed.notify_waiters();
    }

    /// At a clean stop, once no delivery is left: returns the reservations this process did not
    /// use to `keap_sync.quota_usage`, so the next instance may make those calls today. Nothing
    /// is reserved or admitted afterwards. A failure only leaves the count higher than the calls
    /// made.
    pub(crate) async fn give_back(&self, db: &Client) {
        let (day, unused) = {
            let mut w = self.windows();
            w.day.closed = true;
            (w.day.day, std::mem::take(&mut w.day.in_hand))
        };
        if unused == 0 {
            return;
        }
        let result = db
            .execute(
                "update keap_sync.quota_usage
                    set calls = greatest(calls - $3, 0), updated_at = now()
                  where credential_kind = $1 and day = date '1970-01-01' + $2::int4",
                &[&self.kind.as_str(), &day, &i64::from(unused)],
            )
            .await;
        match result {
            Ok(_) => tracing::debug!(unused, "gave back today's unused Keap call reservations"),
            Err(e) => tracing::debug!(error = %e, unused, "could not give back unused call reservations"),
        }
    }

    /// The calls counted today (UTC) in `keap_sync.quota_usage` for this limiter's credential
    /// kind, by every instance: reservations, so a little above the calls made.
    pub(crate) async fn counted_today(&self, db: &Client) -> Result<i64, DbError> {
        let row = db
            .query_opt(
                "select calls from keap_sync.quota_usage
                  where credential_kind = $1 and day = date '1970-01-01' + $2::int4",
                &[&self.kind.as_str(), &utc_day()],
            )
            .await?;
        Ok(row.map_or(0, |r| r.get(0)))
    }

    /// Reservations in hand for today, for tests.
    #[cfg(test)]
    pub(super) fn credit_today(&self, n: u32) {
        let mut w = self.windows();
        w.day.roll(utc_day());
        w.day.in_hand += n;
    }
}

/// The reserver of [`reserve_until_stopped`] for a short job outside the daemon's run (the
/// start-up check of the contact model, `preview`'s name lookups): those calls count against
/// the day like any other (invariant 15). The task ends when this guard drops.
pub(crate) struct Reserving(CancellationToken);

impl Reserving {
    /// Reserves one call at a time, as it is about to be made: for a short job whose few
    /// calls should count exactly (`preview`), so that stopping it mid-way leaves no block of
    /// calls reserved that were never made.
    pub(crate) fn start_exact(limiter: &Arc<Limiter>, pg: &db::Target) -> Reserving {
        limiter.windows().day.block = 1;
        Reserving::start(limiter, pg)
    }

    /// Reserves in blocks, like the daemon.
    pub(crate) fn start(limiter: &Arc<Limiter>, pg: &db::Target) -> Reserving {
        let stop = CancellationToken::new();
        #[allow(
            clippy::disallowed_methods,
            reason = "owned by the Reserving guard: dropping it ends the task"
        )]
        tokio::spawn(reserve_until_stopped(Arc::clone(limiter), pg.clone(), stop.clone()));
        Reserving(stop)
    }
}

impl Drop for Reserving {
    fn drop(&mut self) {
        self.0.cancel();
    }
}

/// Keeps the day's reservations topped up from `keap_sync.quota_usage` until `stop`: waits
/// for a sender to find them running low, then reserves a block on a connection of its own
/// (opened on first need, so a standby instance never opens one). A failed reservation is
/// retried with the reconnect backoff; senders keep using what is in hand meanwhile.
///
/// Spawned by the daemon into its task tracker; `stop` should come only once deliveries have
/// ended, so that none waits for a reservation that will not come.
pub(crate) async fn reserve_until_stopped(limiter: Arc<Limiter>, pg: db::Target, stop: CancellationToken) {
    let mut conn: Option<Client> = None;
    let mut failures = 0u32;
    let mut cleaned_up: Option<i32> = None;
    loop {
        if failures == 0 {
            tokio::select! {
                _ = limiter.budget_low.notified() => {}
                _ = stop.cancelled() => return,
            }
        }
        let Some((day, ask)) = limiter.top_up_wanted() else {
            failures = 0;
            continue;
        };
        let reserved = tokio::select! {
            r = reserve_on(&mut conn, &pg, &limiter, day, ask, cleaned_up != Some(day)) => r,
            _ = stop.cancelled() => return,
        };
        match reserved {
            Ok(granted) => {
                failures = 0;
                cleaned_up = Some(day);
                tracing::debug!(asked = ask, granted, "reserved Keap calls for today");
                limiter.credit(day, ask, granted);
            }
            Err(e) => {
                conn = None;
                failures += 1;
                let delay = db::reconnect_delay(failures);
                tracing::warn!(
                    error = %e,
                    retry_in_ms = delay.as_millis() as u64,
                    "cannot reserve today's Keap calls in keap_sync.quota_usage; calls already reserved go on, and it retries"
                );
                tokio::select! {
                    _ = tokio::time::sleep(delay) => {}
                    _ = stop.cancelled() => return,
                }
            }
        }
    }
}

/// One reservation (connecting first if need be); on the first of a day, rows older than
/// [`KEEP_DAYS`] go too (a failure there is only logged: the reservation stands).
async fn reserve_on(
    conn: &mut Option<Client>,
    pg: &db::Target,
    limiter: &Limiter,
    day: i32,
    ask: u32,
    clean_up: bool,
) -> Result<u32, DbError> {
    let client = match conn.take() {
        Some(c) if !c.is_closed() => c,
        _ => db::connect(pg).await?,
    };
    let per_day = limiter.windows().day.per_day;
    let granted = reserve(&client, limiter.kind, day, ask, per_day).await?;
    if clean_up {
        let old = client
            .execute(
                "delete from keap_sync.quota_usage where day < date '1970-01-01' + $1::int4",
                &[&(day - KEEP_DAYS)],
            )
            .await;
        if let Err(e) = old {
            tracing::debug!(error = %e, "could not delete old rows of keap_sync.quota_usage");
        }
    }
    *conn = Some(client);
    Ok(granted)
}

/// Reserves up to `ask` of `day`'s calls, never taking the day's count past `per_day`, and
/// returns how many were granted. One statement: the upsert takes the row's lock, so instances
/// reserving at once are serialised and their grants never add up to more than `per_day`.
async fn reserve(
    db: &Client,
    kind: CredentialKind,
    day: i32,
    ask: u32,
    per_day: u32,
) -> Result<u32, DbError> {
    let row = db
        .query_one(
            "insert into keap_sync.quota_usage as q (credential_kind, day, calls, last_grant)
             values ($1, date '1970-01-01' + $2::int4, least($3::int8, $4::int8), least($3::int8, $4::int8))
             on conflict (credential_kind, day) do update
                set calls = greatest(q.calls, least(q.calls + $3::int8, $4::int8)),
                    last_grant = greatest(q.calls, least(q.calls + $3::int8, $4::int8)) - q.calls,
                    updated_at = now()
             returning last_grant",
            &[&kind.as_str(), &day, &i64::from(ask), &i64::from(per_day)],
        )
        .await?;
    let granted: i64 = row.get(0);
    Ok(u32::try_from(granted.max(0)).unwrap_or(0))
}

/// Today's date in UTC, as days since 1970-01-01 (Keap's daily quota resets at 00:00 UTC).
pub(super) fn utc_day() -> i32 {
    let secs = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default().as_secs();
    i32::try_from(secs / 86_400).unwrap_or(i32::MAX)
}

/// How long until the next 00:00 UTC, when the day's count starts again.
pub(super) fn until_next_utc_midnight() -> Duration {
    let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default().as_secs();
    Duration::from_secs(86_400 - now % 86_400)
}
