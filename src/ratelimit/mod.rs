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

use std::collections::VecDeque;
use std::num::NonZeroU32;
use std::sync::atomic::{AtomicI64, AtomicU32, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use governor::clock::DefaultClock;
use governor::state::{InMemoryState, NotKeyed};
use governor::{Quota, RateLimiter};
use reqwest::header::HeaderMap;
use tokio::sync::Notify;
use tokio::time::Instant;
use tokio_postgres::{Client, Config as PgConfig};
use tokio_util::sync::CancellationToken;

use crate::config::{Credential, LimitsConfig};
use crate::db::{self, DbError};

type Gcra = RateLimiter<NotKeyed, InMemoryState, DefaultClock>;

/// Fraction of the per-second limit actually used (see the module docs).
const SPIKE_HEADROOM: f64 = 0.95;
const MAX_THROTTLE_PAUSE: Duration = Duration::from_secs(60);
/// Keap's per-minute window.
const MINUTE: Duration = Duration::from_secs(60);
/// How long a sender waiting for a day's reservation waits before it looks again by itself
/// (the reserver wakes it sooner), so a day that rolls over or a reserver that is retrying
/// cannot leave it waiting unseen.
const BUDGET_RECHECK: Duration = Duration::from_secs(1);
/// Rows of `keap_sync.quota_usage` older than this many days are deleted.
const KEEP_DAYS: i32 = 31;

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

/// The exact sliding log of the per-minute window (see the module docs).
struct MinuteLog {
    /// The limit in force: the configured one, or a lower one Keap reported.
    limit: u32,
    /// Admitted calls that have not ended yet: they count until 60 s after they end.
    in_flight: u32,
    /// When each call of the last 60 s ended, oldest first (pushed under the lock with the time
    /// read under it, so the order holds).
    ended: VecDeque<Instant>,
}

impl MinuteLog {
    fn forget_old(&mut self, now: Instant) {
        while self.ended.front().is_some_and(|t| now.saturating_duration_since(*t) >= MINUTE) {
            self.ended.pop_front();
        }
    }

    /// `None` if a call fits now, else the earliest moment one could.
    fn next_slot(&mut self, now: Instant) -> Option<Instant> {
        self.forget_old(now);
        let counted = self.in_flight as usize + self.ended.len();
        let limit = self.limit.max(1) as usize;
        if counted < limit {
            return None;
        }
        // `counted - limit + 1` calls must age out (more than one if the limit was lowered),
        // oldest first. If calls still in flight must end too, each of them frees its slot 60 s
        // after an end still to come: now + 60 s is the earliest, and the sender looks again then.
        Some(self.ended.get(counted - limit).map_or(now + MINUTE, |t| *t + MINUTE))
    }
}

/// The day's calls this process has reserved in `keap_sync.quota_usage` and not used yet.
struct DayBudget {
    /// The UTC day (days since 1970-01-01) the reservations in hand belong to.
    day: i32,
    in_hand: u32,
    /// The database granted less than asked: today's count has reached the per-day limit.
    spent: bool,
    /// The spent day's pause has been logged.
    announced: bool,
    /// Given back at a clean stop: nothing more is reserved or admitted.
    closed: bool,
    per_day: u32,
    /// Calls asked for per reservation.
    block: u32,
}

impl DayBudget {
    /// Starts a new day's count when the UTC date changed; yesterday's leftovers do not count
    /// for today.
    fn roll(&mut self, today: i32) {
        if self.day != today {
            *self = DayBudget { day: today, in_hand: 0, spent: false, announced: false, ..*self };
        }
    }

    /// True when a reservation should be under way: half a block or less in hand.
    fn low(&self) -> bool {
        !self.closed && !self.spent && self.in_hand <= self.block / 2
    }
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

/// One admitted call. Hold it until the call has ended (an answer, an error, or abandoned):
/// dropping it starts the 60 s after which its per-minute slot is free again.
#[must_use = "the call's per-minute slot is counted from when the permit drops"]
pub(crate) struct Permit<'a> {
    limiter: &'a Limiter,
}

impl Drop for Permit<'_> {
    fn drop(&mut self) {
        let mut w = self.limiter.windows();
        w.minute.in_flight = w.minute.in_flight.saturating_sub(1);
        // Read under the lock, so `ended` stays in order.
        let now = Instant::now();
        w.minute.ended.push_back(now);
    }
}

fn nz(n: u32) -> NonZeroU32 {
    NonZeroU32::new(n).unwrap_or(NonZeroU32::MIN)
}

impl Limiter {
    pub(crate) fn new(limits: &LimitsConfig, credential: &Credential) -> Limiter {
        Limiter::with_kind(limits, CredentialKind::of(credential))
    }

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

    /// Today's count has reached the per-day limit: every sender pauses until 00:00 UTC.
    fn day_spent(&self) {
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

    fn pause_for(&self, d: Duration) -> Instant {
        let until = Instant::now() + d;
        let mut guard = self.paused_until.lock().unwrap_or_else(PoisonError::into_inner);
        let until = guard.map_or(until, |current| current.max(until));
        *guard = Some(until);
        until
    }

    /// Learns from an answer's headers. Call for every answer, whatever its status.
    ///
    /// Keap reports a window for the credential (`x-keap-product-…`) and, for some answers, one
    /// for the whole tenant (`x-keap-tenant-…`), which other integrations draw on too: the
    /// lower limit and the fewer calls left win.
    pub(crate) fn observe(&self, status: u16, headers: &HeaderMap) {
        let read = |name: &str| {
            headers.get(name).and_then(|v| v.to_str().ok()).and_then(|v| v.trim().parse::<i64>().ok())
        };
        let lowest = |suffix: &str| {
            ["product", "tenant"].iter().filter_map(|scope| read(&format!("x-keap-{scope}-{suffix}"))).min()
        };
        if let Some(limit) = lowest("throttle-limit") {
            self.adopt_minute_limit(limit);
        }
        let minute_available = lowest("throttle-available");
        if let Some(v) = minute_available {
            self.minute_available.store(v, Ordering::Relaxed);
        }
        for scope in ["product", "tenant"] {
            if read(&format!("x-keap-{scope}-quota-available")).is_some_and(|v| v <= 0) {
                let reset = read(&format!("x-keap-{scope}-quota-expiry-time"))
                    .and_then(until_epoch_ms)
                    .unwrap_or_else(until_next_utc_midnight);
                let until = self.pause_for(reset);
                let mut spent = self.quota_spent_until.lock().unwrap_or_else(PoisonError::into_inner);
                *spent = Some(spent.map_or(until, |current| current.max(until)));
                tracing::warn!(
                    scope,
                    resume_in_secs = until.saturating_duration_since(Instant::now()).as_secs(),
                    "Keap's daily quota is used up; deliveries pause until it resets (changes stay queued)"
                );
            }
        }
        if let Some(v) = lowest("quota-available") {
            let spent = self.quota_spent_until.lock().unwrap_or_else(PoisonError::into_inner);
            let v = if spent.is_some_and(|until| until > Instant::now()) { v.min(0) } else { v };
            self.day_available.store(v, Ordering::Relaxed);
        }
        if (200..300).contains(&status) {
            self.consecutive_429.store(0, Ordering::Relaxed);
            if minute_available == Some(0) {
                // The next call would be throttled; wait for one slot of the rolling window.
                let limit = self.windows().minute.limit.max(1);
                self.pause_for(MINUTE / limit);
            }
        }
    }

    /// A 429 arrived: pauses every sender and returns how long.
    pub(crate) fn throttled(&self, headers: &HeaderMap) -> Duration {
        self.throttled_total.fetch_add(1, Ordering::Relaxed);
        let n = self.consecutive_429.fetch_add(1, Ordering::Relaxed);
        let retry_after = headers
            .get(reqwest::header::RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<u64>().ok())
            .map(Duration::from_secs);
        let pause = retry_after.unwrap_or_else(|| Duration::from_secs(1 << n.min(6))).min(MAX_THROTTLE_PAUSE);
        self.pause_for(pause);
        tracing::warn!(pause_ms = pause.as_millis() as u64, "Keap answered 429; all deliveries pause");
        pause
    }

    /// Adopts a per-minute limit Keap reports if it is lower than the one in force (never a
    /// higher one: the configured limit is a ceiling).
    fn adopt_minute_limit(&self, reported: i64) {
        let Ok(reported) = u32::try_from(reported) else { return };
        let mut w = self.windows();
        if reported == 0 || reported >= w.minute.limit {
            return;
        }
        w.minute.limit = reported;
        drop(w);
        tracing::info!(per_minute = reported, "Keap reports a lower per-minute limit; using it");
    }

    /// What Keap last reported.
    pub(crate) fn report(&self) -> QuotaReport {
        let get = |a: &AtomicI64| Some(a.load(Ordering::Relaxed)).filter(|v| *v >= 0);
        QuotaReport { minute_available: get(&self.minute_available), day_available: get(&self.day_available) }
    }

    /// 429 answers seen by this process.
    pub(crate) fn throttled_total(&self) -> u32 {
        self.throttled_total.load(Ordering::Relaxed)
    }

    /// The reservation to make now, if one is needed: (UTC day, calls to ask for).
    fn top_up_wanted(&self) -> Option<(i32, u32)> {
        let mut w = self.windows();
        w.day.roll(utc_day());
        w.day.low().then_some((w.day.day, w.day.block))
    }

    /// Adds what the database granted for `day` and wakes the senders waiting for it.
    fn credit(&self, day: i32, asked: u32, granted: u32) {
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

    /// Reservations in hand for today, for tests.
    #[cfg(test)]
    fn credit_today(&self, n: u32) {
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
    pub(crate) fn start(limiter: &Arc<Limiter>, pg: &PgConfig) -> Reserving {
        let stop = CancellationToken::new();
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
pub(crate) async fn reserve_until_stopped(limiter: Arc<Limiter>, pg: PgConfig, stop: CancellationToken) {
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
    pg: &PgConfig,
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
fn utc_day() -> i32 {
    let secs = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default().as_secs();
    i32::try_from(secs / 86_400).unwrap_or(i32::MAX)
}

fn until_epoch_ms(ms: i64) -> Option<Duration> {
    let target = UNIX_EPOCH + Duration::from_millis(u64::try_from(ms).ok()?);
    let d = target.duration_since(SystemTime::now()).ok()?;
    // A reset more than a day away is not a daily reset; do not trust it.
    (d <= Duration::from_secs(86_400)).then_some(d)
}

fn until_next_utc_midnight() -> Duration {
    let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default().as_secs();
    Duration::from_secs(86_400 - now % 86_400)
}

#[cfg(test)]
mod tests {
    use super::*;
    use reqwest::header::{HeaderName, HeaderValue};

    fn limits(per_second: u32, per_minute: u32) -> LimitsConfig {
        LimitsConfig { per_second, per_minute, per_day: 1_000_000 }
    }

    /// A limiter with plenty of today's calls in hand (no reserver runs in unit tests).
    fn limiter(per_second: u32, per_minute: u32) -> Limiter {
        let l = Limiter::with_kind(&limits(per_second, per_minute), CredentialKind::ApiKey);
        l.credit_today(1_000_000);
        l
    }

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.insert(HeaderName::from_static(k), HeaderValue::from_str(v).unwrap());
        }
        h
    }

    #[tokio::test]
    async fn calls_are_spaced_under_the_per_second_limit() {
        // governor keeps real time, so this runs in real time; only the lower bound is
        // asserted (the limiter must never be faster than the limit; slower is the machine).
        let l = limiter(20, 100_000);
        let start = std::time::Instant::now();
        for _ in 0..21 {
            drop(l.until_ready().await);
        }
        let took = start.elapsed().as_secs_f64();
        assert!(took >= 20.0 / (20.0 * SPIKE_HEADROOM) - 0.01, "21 calls in {took} s");
    }

    /// Simulates senders against the log alone, with calls of varied length, `concurrency` at a
    /// time, and checks the invariant itself: when a call is admitted, the calls admitted before
    /// it that could arrive at Keap within the same 60 s (still in flight, or ended less than
    /// 60 s before) number fewer than the limit.
    #[test]
    fn the_minute_log_never_lets_a_rolling_minute_hold_more_than_the_limit() {
        const LIMIT: usize = 7;
        let t0 = Instant::now();
        let mut log = MinuteLog { limit: LIMIT as u32, in_flight: 0, ended: VecDeque::new() };
        let mut clock = t0;
        let mut pending: Vec<Instant> = Vec::new();
        let mut calls: Vec<(Instant, Instant)> = Vec::new();
        let end_earliest = |log: &mut MinuteLog, pending: &mut Vec<Instant>, clock: &mut Instant| {
            let i = (0..pending.len()).min_by_key(|&i| pending[i]).unwrap();
            let e = pending.swap_remove(i);
            *clock = (*clock).max(e);
            log.in_flight -= 1;
            log.ended.push_back(e);
        };
        for n in 0..100u64 {
            loop {
                if pending.len() == 3 {
                    end_earliest(&mut log, &mut pending, &mut clock);
                    continue;
                }
                match log.next_slot(clock) {
                    None => break,
                    Some(at) if pending.iter().any(|e| *e <= at) => {
                        end_earliest(&mut log, &mut pending, &mut clock)
                    }
                    Some(at) => clock = at,
                }
            }
            log.in_flight += 1;
            // 50 ms to ~13 s: calls much longer than the spacing, and some as long as a timeout.
            let end = clock + Duration::from_millis(50 + (n * 7_919) % 13_000);
            pending.push(end);
            calls.push((clock, end));
        }
        for (j, (admitted, _)) in calls.iter().enumerate() {
            let counted = calls[..j].iter().filter(|(_, ended)| *ended + MINUTE > *admitted).count();
            assert!(counted < LIMIT, "call {j} admitted with {counted} others in its minute");
        }
        // Exact, not merely safe: the limit is reached, and a slot is held no longer than a
        // minute plus its call's length (at most 13 s here).
        let took = calls.last().unwrap().0 - t0;
        assert!(took < (MINUTE + Duration::from_secs(13)) * (100 / LIMIT as u32 + 1), "{took:?}");
        assert!(calls.iter().filter(|(s, _)| *s < t0 + MINUTE).count() == LIMIT);
    }

    #[tokio::test(start_paused = true)]
    async fn a_call_holds_its_minute_slot_until_60_s_after_it_ends() {
        let l = limiter(1000, 2);
        let t0 = Instant::now();
        let long = l.until_ready().await;
        let short = l.until_ready().await;
        drop(short);
        tokio::time::sleep(Duration::from_secs(30)).await;
        drop(long); // ends at t0 + 30 s
        drop(l.until_ready().await);
        let third = t0.elapsed();
        assert!(third >= Duration::from_secs(60) && third < Duration::from_secs(61), "{third:?}");
        drop(l.until_ready().await);
        let fourth = t0.elapsed();
        assert!(fourth >= Duration::from_secs(90) && fourth < Duration::from_secs(91), "{fourth:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn a_429_pauses_everyone_with_growing_backoff() {
        let l = limiter(1000, 100_000);
        assert_eq!(l.throttled(&HeaderMap::new()), Duration::from_secs(1));
        assert_eq!(l.throttled(&HeaderMap::new()), Duration::from_secs(2));
        let start = Instant::now();
        drop(l.until_ready().await);
        assert!(start.elapsed() >= Duration::from_secs(2));
        l.observe(200, &HeaderMap::new());
        assert_eq!(l.throttled(&headers(&[("retry-after", "7")])), Duration::from_secs(7));
        assert_eq!(l.throttled_total(), 3);
    }

    #[tokio::test(start_paused = true)]
    async fn an_exhausted_daily_quota_pauses_until_the_reset() {
        let l = limiter(1000, 100_000);
        let reset_ms = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_millis() as i64 + 3_600_000;
        l.observe(
            200,
            &headers(&[
                ("x-keap-product-quota-available", "0"),
                ("x-keap-product-quota-expiry-time", &reset_ms.to_string()),
            ]),
        );
        let until = l.paused_until().expect("paused");
        let left = until - Instant::now();
        assert!(left > Duration::from_secs(3_500) && left <= Duration::from_secs(3_600), "{left:?}");
        assert_eq!(l.report().day_available, Some(0));
    }

    /// Four calls in flight when the quota runs out: the answer saying 0 left can be read before
    /// one sent earlier saying 1 left. Status must keep saying the day is spent (a test of the
    /// daemon's status failed on it: `paused_reason` stayed empty).
    #[tokio::test(start_paused = true)]
    async fn an_earlier_answer_read_late_does_not_reopen_a_spent_day() {
        let l = limiter(1000, 100_000);
        l.observe(200, &headers(&[("x-keap-product-quota-available", "0")]));
        l.observe(200, &headers(&[("x-keap-product-quota-available", "1")]));
        assert_eq!(l.report().day_available, Some(0));
        assert!(l.paused_until().is_some());
        // Once the pause is over (the quota reset), answers count again.
        tokio::time::advance(Duration::from_secs(25 * 3600)).await;
        l.observe(200, &headers(&[("x-keap-product-quota-available", "5000")]));
        assert_eq!(l.report().day_available, Some(5000));
    }

    #[test]
    fn the_tenants_quota_pauses_too_and_the_fewest_calls_left_are_reported() {
        let l = limiter(1000, 100_000);
        let reset_ms = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_millis() as i64 + 7_200_000;
        l.observe(
            200,
            &headers(&[
                ("x-keap-product-quota-available", "29000"),
                ("x-keap-tenant-quota-available", "0"),
                ("x-keap-tenant-quota-expiry-time", &reset_ms.to_string()),
                ("x-keap-product-throttle-available", "200"),
                ("x-keap-tenant-throttle-available", "50"),
            ]),
        );
        let left = l.paused_until().expect("paused") - Instant::now();
        assert!(left > Duration::from_secs(7_100) && left <= Duration::from_secs(7_200), "{left:?}");
        assert_eq!(l.report(), QuotaReport { minute_available: Some(50), day_available: Some(0) });
    }

    #[test]
    fn the_lowest_reported_minute_limit_is_adopted() {
        let l = limiter(25, 1_500);
        l.observe(200, &headers(&[("x-keap-product-throttle-limit", "240")]));
        assert_eq!(l.windows().minute.limit, 240);
        l.observe(200, &headers(&[("x-keap-product-throttle-limit", "5000")]));
        assert_eq!(l.windows().minute.limit, 240, "never raised above the config");
        l.observe(
            200,
            &headers(&[("x-keap-product-throttle-limit", "240"), ("x-keap-tenant-throttle-limit", "100")]),
        );
        assert_eq!(l.windows().minute.limit, 100, "the tenant's, when lower");
    }

    #[test]
    fn a_day_whose_count_is_spent_pauses_until_midnight_and_says_so() {
        let l = Limiter::with_kind(
            &LimitsConfig { per_second: 10, per_minute: 240, per_day: 25 },
            CredentialKind::ApiKey,
        );
        assert_eq!(l.top_up_wanted(), Some((utc_day(), 40)), "nothing in hand: a block is wanted");
        // The database had 3 left of the day's 25.
        l.credit(utc_day(), 40, 3);
        assert_eq!(l.top_up_wanted(), None, "spent: nothing more to ask for today");
        for _ in 0..3 {
            assert!(l.admit(true).is_ok());
            drop(Permit { limiter: &l });
        }
        assert!(matches!(l.admit(true), Err(Wait::DaySpent)));
        l.day_spent();
        let left = l.paused_until().expect("paused") - Instant::now();
        assert!(
            left <= until_next_utc_midnight() && left + Duration::from_secs(5) > until_next_utc_midnight()
        );
        assert_eq!(l.report().day_available, Some(0));
    }

    #[test]
    fn reservations_are_asked_for_ahead_of_need() {
        let l = Limiter::with_kind(&limits(10, 240), CredentialKind::ApiKey);
        assert!(matches!(l.admit(true), Err(Wait::Budget)), "nothing reserved yet");
        l.credit(utc_day(), 40, 40);
        for _ in 0..19 {
            assert!(l.admit(true).is_ok());
        }
        assert_eq!(l.top_up_wanted(), None, "21 in hand: more than half a block");
        assert!(l.admit(true).is_ok());
        assert_eq!(l.top_up_wanted(), Some((utc_day(), 40)), "half a block left: the next is asked for");
        l.credit(utc_day() - 1, 40, 40);
        assert_eq!(l.windows().day.in_hand, 20, "a reservation for another day does not count");
    }
}
