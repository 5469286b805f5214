//! The client-side rate limiter: one per credential, shared by every sender in the process.
//!
//! Keap meters per second (a spike limit that sends no headers), per rolling minute and per
//! day; each window is a `governor` GCRA limiter and a call waits until all three admit it, so
//! the daemon stays under Keap's limits instead of discovering them through 429s. The numbers
//! come from the configuration (defaulting to Keap's documented limits for the credential
//! kind). The quota headers of each answer are remembered for status reporting.

use std::num::NonZeroU32;
use std::sync::atomic::{AtomicI64, Ordering};

use governor::clock::DefaultClock;
use governor::state::{InMemoryState, NotKeyed};
use governor::{Quota, RateLimiter};

use crate::config::LimitsConfig;

type Gcra = RateLimiter<NotKeyed, InMemoryState, DefaultClock>;

/// Per-second, per-minute and per-day limiters, plus what Keap last said about its quotas.
pub struct Limiter {
    second: Gcra,
    minute: Gcra,
    day: Gcra,
    /// `x-keap-product-throttle-available` of the last answer, -1 if never seen.
    throttle_available: AtomicI64,
    /// `x-keap-product-quota-available` of the last answer, -1 if never seen.
    quota_available: AtomicI64,
}

impl Limiter {
    pub fn new(limits: &LimitsConfig) -> Limiter {
        let nz = |n: u32| NonZeroU32::new(n.max(1)).unwrap_or(NonZeroU32::MIN);
        // The per-second window allows no burst beyond its rate; the minute and day windows
        // admit their full allowance as a burst, which the per-second limiter then spreads out.
        let per_day_period = std::time::Duration::from_secs(86_400) / limits.per_day.max(1);
        Limiter {
            second: RateLimiter::direct(Quota::per_second(nz(limits.per_second))),
            minute: RateLimiter::direct(Quota::per_minute(nz(limits.per_minute))),
            day: RateLimiter::direct(
                Quota::with_period(per_day_period)
                    .unwrap_or_else(|| Quota::per_hour(NonZeroU32::MIN))
                    .allow_burst(nz(limits.per_day)),
            ),
            throttle_available: AtomicI64::new(-1),
            quota_available: AtomicI64::new(-1),
        }
    }

    /// Waits until one more call fits in every window.
    pub async fn until_ready(&self) {
        self.day.until_ready().await;
        self.minute.until_ready().await;
        self.second.until_ready().await;
    }

    /// Remembers the quota headers of an answer.
    pub fn observe(&self, headers: &reqwest::header::HeaderMap) {
        let read = |name: &str| {
            headers.get(name).and_then(|v| v.to_str().ok()).and_then(|v| v.trim().parse::<i64>().ok())
        };
        if let Some(v) = read("x-keap-product-throttle-available") {
            self.throttle_available.store(v, Ordering::Relaxed);
        }
        if let Some(v) = read("x-keap-product-quota-available") {
            self.quota_available.store(v, Ordering::Relaxed);
        }
    }

    /// (per-minute calls left, per-day calls left) as Keap last reported them.
    pub fn last_reported(&self) -> (Option<i64>, Option<i64>) {
        let get = |a: &AtomicI64| Some(a.load(Ordering::Relaxed)).filter(|v| *v >= 0);
        (get(&self.throttle_available), get(&self.quota_available))
    }
}
