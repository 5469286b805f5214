//! The client-side rate limiter: one per credential, shared by every sender in the process.
//!
//! Keap meters per second (a spike arrest that sends no headers), per rolling minute and per
//! day (`docs/keap-api.md`, "Rate limits"). Each window is a `governor` GCRA limiter and a call waits until
//! all three admit it, so the daemon stays under Keap's limits instead of discovering them
//! through 429s:
//!
//! - **Per second** is a steady spacing (burst of one) at 95% of the configured rate: spike
//!   arrests count requests as they *arrive*, and network jitter can bunch calls that left
//!   evenly spaced, so a little headroom avoids 429s at the cost of 5% of the spike limit.
//! - **Per minute** adopts the limit Keap reports (`x-keap-product-throttle-limit`) when it is
//!   lower than the configured one, and pauses when Keap reports none left.
//! - **Per day**: when `x-keap-product-quota-available` reaches 0, every sender pauses until
//!   `x-keap-product-quota-expiry-time` (the next UTC midnight), and the log says so.
//!
//! A 429 pauses *every* sender (not just the one that got it) until the window reopens:
//! `Retry-After` if Keap sends it (not documented, so not relied on), else exponential backoff
//! from 1 s, doubling per consecutive 429, capped at 60 s.

use std::num::NonZeroU32;
use std::sync::atomic::{AtomicI64, AtomicU32, Ordering};
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use governor::clock::DefaultClock;
use governor::state::{InMemoryState, NotKeyed};
use governor::{Quota, RateLimiter};
use reqwest::header::HeaderMap;
use tokio::time::Instant;

use crate::config::LimitsConfig;

type Gcra = RateLimiter<NotKeyed, InMemoryState, DefaultClock>;

/// Fraction of the per-second limit actually used (see the module docs).
const SPIKE_HEADROOM: f64 = 0.95;
const MAX_THROTTLE_PAUSE: Duration = Duration::from_secs(60);

/// What Keap last reported about its quotas, for status output and metrics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct QuotaReport {
    pub minute_available: Option<i64>,
    pub day_available: Option<i64>,
}

/// Per-second, per-minute and per-day limiters, a shared pause, and the last quota report.
///
/// Shared as `Arc<Limiter>` by the Keap client (every delivery task) and the daemon loop, so
/// every method takes `&self`. No lock is ever held across an `.await`.
pub(crate) struct Limiter {
    /// Per-second spacing. governor's limiters are lock-free (an atomic GCRA state), so many
    /// senders wait on one without a Mutex.
    second: Gcra,
    /// Per-minute window. Behind an `RwLock<Arc<…>>` because adopting a lower limit Keap reports
    /// swaps the whole limiter: senders clone the `Arc` under a brief read lock and wait on it
    /// outside the lock; a swap (rare) takes the write lock.
    minute: RwLock<Arc<Gcra>>,
    /// The per-minute limit in force, to compare reported limits against without the lock.
    minute_limit: AtomicU32,
    /// Per-day bucket.
    day: Gcra,
    /// The pause every sender honours after a 429 or a spent quota. A std `Mutex` because it
    /// is read and written in a few instructions and never across an await; one lock keeps the
    /// read-compare-extend of `pause_for` atomic.
    paused_until: Mutex<Option<Instant>>,
    /// 429s in a row, for the backoff; reset by any success. Atomic: bumped by whichever
    /// sender got the answer.
    consecutive_429: AtomicU32,
    /// Keap's last reported calls left this minute (-1: unknown), for status and metrics.
    minute_available: AtomicI64,
    /// Keap's last reported calls left today (-1: unknown).
    day_available: AtomicI64,
    /// 429s seen by this process, for the heartbeat.
    throttled_total: AtomicU32,
}

fn nz(n: u32) -> NonZeroU32 {
    NonZeroU32::new(n).unwrap_or(NonZeroU32::MIN)
}

fn per_minute(limit: u32) -> Gcra {
    RateLimiter::direct(Quota::per_minute(nz(limit)))
}

impl Limiter {
    pub(crate) fn new(limits: &LimitsConfig) -> Limiter {
        let spacing = Duration::from_secs_f64(1.0 / (f64::from(limits.per_second.max(1)) * SPIKE_HEADROOM));
        let per_day_period = Duration::from_secs(86_400) / limits.per_day.max(1);
        Limiter {
            second: RateLimiter::direct(
                Quota::with_period(spacing).unwrap_or_else(|| Quota::per_second(nz(limits.per_second))),
            ),
            minute: RwLock::new(Arc::new(per_minute(limits.per_minute))),
            minute_limit: AtomicU32::new(limits.per_minute),
            day: RateLimiter::direct(
                Quota::with_period(per_day_period)
                    .unwrap_or_else(|| Quota::per_hour(NonZeroU32::MIN))
                    .allow_burst(nz(limits.per_day)),
            ),
            paused_until: Mutex::new(None),
            consecutive_429: AtomicU32::new(0),
            minute_available: AtomicI64::new(-1),
            day_available: AtomicI64::new(-1),
            throttled_total: AtomicU32::new(0),
        }
    }

    /// Waits until one more call fits in every window and no pause is in force.
    pub(crate) async fn until_ready(&self) {
        loop {
            if let Some(until) = self.paused_until() {
                tokio::time::sleep_until(until).await;
            }
            self.day.until_ready().await;
            let minute = self.minute.read().unwrap_or_else(PoisonError::into_inner).clone();
            minute.until_ready().await;
            self.second.until_ready().await;
            // Another sender may have been throttled while we waited: honour its pause.
            if self.paused_until().is_none() {
                return;
            }
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
    pub(crate) fn observe(&self, status: u16, headers: &HeaderMap) {
        let read = |name: &str| {
            headers.get(name).and_then(|v| v.to_str().ok()).and_then(|v| v.trim().parse::<i64>().ok())
        };
        if let Some(limit) = read("x-keap-product-throttle-limit") {
            self.adopt_minute_limit(limit);
        }
        let minute_available = read("x-keap-product-throttle-available");
        if let Some(v) = minute_available {
            self.minute_available.store(v, Ordering::Relaxed);
        }
        if let Some(v) = read("x-keap-product-quota-available") {
            self.day_available.store(v, Ordering::Relaxed);
            if v <= 0 {
                let reset = read("x-keap-product-quota-expiry-time")
                    .and_then(until_epoch_ms)
                    .unwrap_or_else(until_next_utc_midnight);
                let until = self.pause_for(reset);
                tracing::warn!(
                    resume_in_secs = until.saturating_duration_since(Instant::now()).as_secs(),
                    "Keap's daily quota is used up; deliveries pause until it resets (changes stay queued)"
                );
            }
        }
        if (200..300).contains(&status) {
            self.consecutive_429.store(0, Ordering::Relaxed);
            if minute_available == Some(0) {
                // The next call would be throttled; wait for one slot of the rolling window.
                let limit = self.minute_limit.load(Ordering::Relaxed).max(1);
                self.pause_for(Duration::from_secs(60) / limit);
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

    fn adopt_minute_limit(&self, reported: i64) {
        let Ok(reported) = u32::try_from(reported) else { return };
        if reported == 0 || reported >= self.minute_limit.load(Ordering::Relaxed) {
            return;
        }
        self.minute_limit.store(reported, Ordering::Relaxed);
        *self.minute.write().unwrap_or_else(PoisonError::into_inner) = Arc::new(per_minute(reported));
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
        let l = Limiter::new(&limits(20, 100_000));
        let start = std::time::Instant::now();
        for _ in 0..21 {
            l.until_ready().await;
        }
        let took = start.elapsed().as_secs_f64();
        assert!(took >= 20.0 / (20.0 * SPIKE_HEADROOM) - 0.01, "21 calls in {took} s");
    }

    #[tokio::test(start_paused = true)]
    async fn a_429_pauses_everyone_with_growing_backoff() {
        let l = Limiter::new(&limits(1000, 100_000));
        assert_eq!(l.throttled(&HeaderMap::new()), Duration::from_secs(1));
        assert_eq!(l.throttled(&HeaderMap::new()), Duration::from_secs(2));
        let start = Instant::now();
        l.until_ready().await;
        assert!(start.elapsed() >= Duration::from_secs(2));
        l.observe(200, &HeaderMap::new());
        assert_eq!(l.throttled(&headers(&[("retry-after", "7")])), Duration::from_secs(7));
        assert_eq!(l.throttled_total(), 3);
    }

    #[tokio::test(start_paused = true)]
    async fn an_exhausted_daily_quota_pauses_until_the_reset() {
        let l = Limiter::new(&limits(1000, 100_000));
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

    #[test]
    fn a_lower_reported_minute_limit_is_adopted() {
        let l = Limiter::new(&limits(25, 1_500));
        l.observe(200, &headers(&[("x-keap-product-throttle-limit", "240")]));
        assert_eq!(l.minute_limit.load(Ordering::Relaxed), 240);
        l.observe(200, &headers(&[("x-keap-product-throttle-limit", "5000")]));
        assert_eq!(l.minute_limit.load(Ordering::Relaxed), 240, "never raised above the config");
    }
}
