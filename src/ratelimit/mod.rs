//! The client-side rate limiter: one per credential, shared by every sender in the process; the
//! day's count is shared by every instance through Postgres.
//!
//! Keap meters per second (a spike arrest that sends no headers), per rolling minute and per
//! day (`docs/keap-api.md`, "Rate limits"). A call waits until all three admit it, so the daemon
//! stays under Keap's limits instead of discovering them through 429s (ARCHITECTURE.md,
//! invariants 8 and 15):
//!
//! - **Per second**: a `governor` GCRA limiter with a burst of one, i.e. a steady spacing at 95%
//!   of the configured rate — what GCRA is made for. Spike arrests count requests as they
//!   *arrive*, and network jitter can bunch calls that left evenly spaced, so a little headroom
//!   avoids 429s at the cost of 5% of the spike limit.
//! - **Per rolling minute**: an exact sliding log, not GCRA. A GCRA limiter of `n` per minute
//!   admits a burst of `n` and then refills at `n` per minute, so one rolling 60 s window could
//!   hold nearly `2n` calls; a sliding-window *counter* (two fixed windows, weighted) is an
//!   estimate that can overshoot too. The log counts the calls in flight and remembers when each
//!   call of the last minute *ended*, and a call is admitted only while fewer than the limit are
//!   counted. Ageing a call from its end rather than its start is what makes it exact: Keap counts
//!   a call when it arrives, which is after it was sent and before its answer (or our giving up),
//!   so however the network delays calls, no 60 s window of arrivals ever holds more than the
//!   limit (proof: take the last-admitted call of any window; every other call of that window
//!   arrived less than 60 s before it was admitted, so it was still in flight then or had ended
//!   less than 60 s before, and was counted). The price is that a slot is held for the call's
//!   duration on top of the minute (about 0.5% of the rate for 300 ms calls); the memory, one
//!   `Instant` per call of the last minute. The log sits behind a std `Mutex` held for a few
//!   instructions and never across an await. The limit in force is the configured one or the
//!   lowest Keap reports (`x-keap-product-throttle-limit`, `x-keap-tenant-throttle-limit`),
//!   whichever is lower; when either `-throttle-available` reports 0, senders wait one slot.
//! - **Per day**: the count lives in `keap_sync.quota_usage` (one row per credential kind and
//!   UTC day), so restarts and fail-overs do not refill it and every instance draws on the same
//!   count. Calls are reserved in blocks ([`Limiter::block`]: about four seconds of calls at full
//!   speed), one upsert per block rather than a write per call, capped at the per-day limit, by
//!   [`reserve_until_stopped`] — a task of the daemon's with a connection of its own — ahead of
//!   need: a new block is asked for when half of one is left, so a briefly slow database does not
//!   stall a sender. The trade-off: a daemon that crashes loses its unused reservations (at most
//!   a block and a half), which only makes the count higher than the calls made; a clean stop
//!   gives them back ([`Limiter::give_back`]). When the database grants less than asked, the
//!   day is spent: every sender pauses until 00:00 UTC. Keap's own report is honoured as
//!   well: when `x-keap-product-quota-available` (or the tenant's, if Keap sends one) reaches 0,
//!   every sender pauses until `-quota-expiry-time` (the next UTC midnight).
//!
//! A 429 pauses *every* sender (not just the one that got it) until the window reopens:
//! `Retry-After` if Keap sends it (not documented, so not relied on), else exponential backoff
//! from 1 s, doubling per consecutive 429, capped at 60 s.
//!
//! The files: the per-minute log and the admitted call's permit (`minute`), the day's count and
//! its reservations (`quota`), and what Keap's answers say about its windows (`answers`).

use std::collections::VecDeque;
use std::num::NonZeroU32;
use std::sync::atomic::{AtomicI64, AtomicU32};
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use governor::clock::DefaultClock;
use governor::state::{InMemoryState, NotKeyed};
use governor::{Quota, RateLimiter};
use tokio::sync::Notify;
use tokio::time::Instant;

use crate::config::{Credential, LimitsConfig};

mod answers;
mod minute;
mod quota;

use minute::MinuteLog;
pub(crate) use minute::Permit;
pub(crate) use quota::{reserve_until_stopped, Reserving};
use quota::{utc_day, DayBudget};

type Gcra = RateLimiter<NotKeyed, InMemoryState, DefaultClock>;

/// Fraction of the per-second limit actually used (see the module docs).
const SPIKE_HEADROOM: f64 = 0.95;
/// Keap's per-minute window.
const MINUTE: Duration = Duration::from_secs(60);
/// How long a sender waiting for a day's reservation waits before it looks again by itself
/// (the reserver wakes it sooner), so a day that rolls over or a reserver that is retrying
/// cannot leave it waiting unseen.
const BUDGET_RECHECK: Duration = Duration::from_secs(1);

/// What Keap last reported about its quotas, for status output and metrics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct QuotaReport {
    pub minute_available: Option<i64>,
    pub day_available: Option<i64>,
}

/// Whose quota: Keap counts an OAuth app's calls and an API key's tenant's calls separately,
/// with different limits, so the day's count is kept per kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum CredentialKind {
    OAuth,
    ApiKey,
}

impl CredentialKind {
    /// Whose quota a credential draws on: an API key's or an OAuth app's.
    pub(crate) fn of(credential: &Credential) -> CredentialKind {
        match credential {
            Credential::ApiKey(_) => CredentialKind::ApiKey,
            Credential::OAuth { .. } => CredentialKind::OAuth,
        }
    }

    /// As `keap_sync.quota_usage.credential_kind` spells it.
    fn as_str(self) -> &'static str {
        match self {
            CredentialKind::OAuth => "oauth",
            CredentialKind::ApiKey => "api_key",
        }
    }
}

/// The three windows, a shared pause, and the last quota report.
///
/// Shared as `Arc<Limiter>` by the Keap client (every delivery task), the daemon loop and the
/// reserver task, so every method takes `&self`. No lock is ever held across an `.await`.
pub(crate) struct Limiter {
    /// Per-second spacing. governor's limiters are lock-free (an atomic GCRA state), so many
    /// senders wait on one without a Mutex.
    second: Gcra,
    /// The per-minute log and the day's reservations. One std `Mutex` for both, so admitting a
    /// call to both is one atomic step; it is held for a few instructions, never across an await.
    windows: Mutex<Windows>,
    /// Signalled by a sender that finds the day's reservations running low. A `Notify` stores one
    /// permit, so a signal sent while the reserver is busy is not lost.
    budget_low: Notify,
    /// Signalled by the reserver when reservations came in: wakes every sender waiting for one.
    budget_changed: Notify,
    kind: CredentialKind,
    /// The pause every sender honours after a 429 or a spent quota. A std `Mutex` because it
    /// is read and written in a few instructions and never across an await; one lock keeps the
    /// read-compare-extend of `pause_for` atomic.
    paused_until: Mutex<Option<Instant>>,
    /// Until when an answer said the day's quota is spent (`x-keap-…-quota-available` 0). Answers
    /// are read in the order they arrive, not the order they were counted: one sent just before
    /// the quota ran out (saying 1 left) can be read after the one saying 0, and must not make
    /// the day look open again while the pause it caused holds.
    quota_spent_until: Mutex<Option<Instant>>,
    /// 429s in a row, for the backoff; reset by any success. Atomic: bumped by whichever
    /// sender got the answer.
    consecutive_429: AtomicU32,
    /// Keap's last reported calls left this minute (-1: unknown), for status and metrics.
    minute_available: AtomicI64,
    /// Keap's last reported calls left today (-1: unknown); 0 also when our own count is spent.
    day_available: AtomicI64,
    /// 429s seen by this process, for the heartbeat.
    throttled_total: AtomicU32,
}

struct Windows {
    minute: MinuteLog,
    day: DayBudget,
}

/// Why a call cannot be admitted yet.
enum Wait {
    /// The per-minute log is full until then.
    Minute(Instant),
    /// No day's reservation in hand; one has been asked for.
    Budget,
    /// Today's count has reached the per-day limit.
    DaySpent,
}

/// `n` as a non-zero count, 1 for zero, so a zero limit never panics.
fn nz(n: u32) -> NonZeroU32 {
    NonZeroU32::new(n).unwrap_or(NonZeroU32::MIN)
}

impl Limiter {
    /// The limiter for `limits`, counting the day's calls under the credential's kind.
    pub(crate) fn new(limits: &LimitsConfig, credential: &Credential) -> Limiter {
        Limiter::with_kind(limits, CredentialKind::of(credential))
    }

    /// The limiter for `limits`: calls spaced at 95% of the per-second limit, the minute's log empty, no
    /// day's calls reserved yet.
    fn with_kind(limits: &LimitsConfig, kind: CredentialKind) -> Limiter {
        let spacing = Duration::from_secs_f64(1.0 / (f64::from(limits.per_second.max(1)) * SPIKE_HEADROOM));
        Limiter {
            second: RateLimiter::direct(
                Quota::with_period(spacing).unwrap_or_else(|| Quota::per_second(nz(limits.per_second))),
            ),
            windows: Mutex::new(Windows {
                minute: MinuteLog { limit: limits.per_minute.max(1), in_flight: 0, ended: VecDeque::new() },
                day: DayBudget {
                    day: utc_day(),
                    in_hand: 0,
                    spent: false,
                    announced: false,
                    closed: false,
                    per_day: limits.per_day,
                    block: Limiter::block(limits),
                },
            }),
            budget_low: Notify::new(),
            budget_changed: Notify::new(),
            kind,
            paused_until: Mutex::new(None),
            quota_spent_until: Mutex::new(None),
            consecutive_429: AtomicU32::new(0),
            minute_available: AtomicI64::new(-1),
            day_available: AtomicI64::new(-1),
            throttled_total: AtomicU32::new(0),
        }
    }

    /// Calls reserved per database write: about four seconds of calls at full speed, so the next
    /// block is asked for about two seconds before it is needed; at least 10 (fewer writes) and at
    /// most 100 (a crash loses little: 0.1% of OAuth's 150,000 a day).
    fn block(limits: &LimitsConfig) -> u32 {
        limits.per_second.saturating_mul(4).clamp(10, 100)
    }

    /// The minute's and day's windows; a sender that panicked holding them does not lock out the
    /// others (a poisoned lock is taken anyway).
    fn windows(&self) -> MutexGuard<'_, Windows> {
        self.windows.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Waits until one more call fits in every window and no pause is in force, and admits it.
    /// Keep the permit until the call has ended.
    pub(crate) async fn until_ready(&self) -> Permit<'_> {
        loop {
            if let Some(until) = self.paused_until() {
                tokio::time::sleep_until(until).await;
                continue;
            }
            // Registered before looking, so a reservation arriving in between still wakes us.
            let budget_changed = self.budget_changed.notified();
            tokio::pin!(budget_changed);
            budget_changed.as_mut().enable();
            match self.admit(false) {
                Ok(()) => {}
                Err(Wait::Minute(at)) => {
                    tokio::time::sleep_until(at).await;
                    continue;
                }
                Err(Wait::Budget) => {
                    let _ = tokio::time::timeout(BUDGET_RECHECK, budget_changed).await;
                    continue;
                }
                Err(Wait::DaySpent) => {
                    self.day_spent();
                    continue;
                }
            }
            self.second.until_ready().await;
            // Another sender may have been throttled, or taken the last slot, while we waited.
            if self.paused_until().is_none() && self.admit(true).is_ok() {
                return Permit { limiter: self };
            }
        }
    }

    /// Whether a call fits in the minute and the day now; with `take`, admits it to both (one
    /// step under the lock, so a sender that gives up while waiting has used nothing).
    fn admit(&self, take: bool) -> Result<(), Wait> {
        let now = Instant::now();
        let mut w = self.windows();
        if let Some(at) = w.minute.next_slot(now) {
            return Err(Wait::Minute(at));
        }
        w.day.roll(utc_day());
        if w.day.in_hand == 0 {
            if w.day.spent {
                return Err(Wait::DaySpent);
            }
            self.budget_low.notify_one();
            return Err(Wait::Budget);
        }
        if take {
            w.day.in_hand -= 1;
            w.minute.in_flight += 1;
            if w.day.low() {
                self.budget_low.notify_one();
            }
        }
        Ok(())
    }

    /// The end of the current pause, if one is in force.
    pub(crate) fn paused_until(&self) -> Option<Instant> {
        let mut guard = self.paused_until.lock().unwrap_or_else(PoisonError::into_inner);
        match *guard {
            Some(until) if until > Instant::now() => Some(until),
            Some(_) => {
                *guard = None;
                None
            }
            None => None,
        }
    }

    /// Pauses every sender for `d`, unless a pause already runs longer; returns when the pause ends.
    fn pause_for(&self, d: Duration) -> Instant {
        let until = Instant::now() + d;
        let mut guard = self.paused_until.lock().unwrap_or_else(PoisonError::into_inner);
        let until = guard.map_or(until, |current| current.max(until));
        *guard = Some(until);
        until
    }
}

#[cfg(test)]
mod tests;
