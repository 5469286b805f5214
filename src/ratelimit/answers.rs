//! What Keap's answers say: the limits and calls left in its headers, and the pause after a
//! 429 that every sender honours.

use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::PoisonError;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use reqwest::header::HeaderMap;
use tokio::time::Instant;

use super::quota::until_next_utc_midnight;
use super::{Limiter, QuotaReport, MINUTE};

const MAX_THROTTLE_PAUSE: Duration = Duration::from_secs(60);

impl Limiter {
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
    pub(super) fn adopt_minute_limit(&self, reported: i64) {
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

    /// The per-minute limit in force: the configured one, or the lower one Keap reported.
    pub(crate) fn minute_limit(&self) -> u32 {
        self.windows().minute.limit
    }

    /// 429 answers seen by this process.
    pub(crate) fn throttled_total(&self) -> u32 {
        self.throttled_total.load(Ordering::Relaxed)
    }
}

/// How long until the epoch-milliseconds time `ms`; `None` when it has passed or is more than a day
/// away, which no daily reset is.
fn until_epoch_ms(ms: i64) -> Option<Duration> {
    let target = UNIX_EPOCH + Duration::from_millis(u64::try_from(ms).ok()?);
    let d = target.duration_since(SystemTime::now()).ok()?;
    // A reset more than a day away is not a daily reset; do not trust it.
    (d <= Duration::from_secs(86_400)).then_some(d)
}
