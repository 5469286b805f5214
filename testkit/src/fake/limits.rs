//! Keap's limits as the fake plays them: per-second, per-minute and per-day windows per
//! credential, 429s without `Retry-After`, and the throttle and quota headers.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use super::http::Headers;
use super::{unix_ms, State, DAY_MS};

/// Rolling windows and daily count of one credential.
#[derive(Default)]
pub(super) struct Bucket {
    pub(super) second: VecDeque<Instant>,
    pub(super) minute: VecDeque<Instant>,
    pub(super) day: u64,
    pub(super) day_used: u64,
}

/// A credential that passed authentication; limits are counted per credential.
pub(super) enum Cred {
    OAuth,
    Key(String),
}

impl State {
    /// Counts the request against its credential's windows. Returns whether it is admitted and
    /// the throttle/quota headers Keap sends (`docs/keap-api.md`).
    pub(super) fn admit(&mut self, cred: &Cred, now: Instant) -> (bool, Headers) {
        let (key, default_second, default_minute, default_day) = match cred {
            Cred::OAuth => ("oauth".to_owned(), 25, 1_500, 150_000),
            Cred::Key(k) => (format!("key:{k}"), 10, 240, 30_000),
        };
        let o = &self.opts;
        // Strictest: where a test set no limit, Keap's documented one holds.
        let documented = |set: Option<u32>, default: u32| set.or(o.documented_limits.then_some(default));
        let per_second = documented(o.per_second_limit, default_second);
        let per_minute = documented(o.per_minute_limit, default_minute);
        let daily = o.daily_quota.or(o.documented_limits.then_some(default_day));
        let tenant_limit = o.tenant_minute_limit;
        let tenant = &mut self.tenant_minute;
        while tenant.front().is_some_and(|t| now.duration_since(*t) >= Duration::from_secs(60)) {
            tenant.pop_front();
        }
        let tenant_over = tenant_limit.is_some_and(|l| tenant.len() >= l as usize);
        let b = self.buckets.entry(key).or_default();
        for (window, span) in [(&mut b.second, 1), (&mut b.minute, 60)] {
            let span = Duration::from_secs(span);
            while window.front().is_some_and(|t| now.duration_since(*t) >= span) {
                window.pop_front();
            }
        }
        let today = unix_ms() / DAY_MS;
        if b.day != today {
            (b.day, b.day_used) = (today, 0);
        }
        let over = per_second.is_some_and(|l| b.second.len() >= l as usize)
            || per_minute.is_some_and(|l| b.minute.len() >= l as usize)
            || daily.is_some_and(|l| b.day_used >= l)
            || tenant_over;
        if !over {
            b.second.push_back(now);
            b.minute.push_back(now);
            b.day_used += 1;
            self.tenant_minute.push_back(now);
        }
        let minute_limit = per_minute.map_or(u64::from(default_minute), u64::from);
        let minute_used = b.minute.len() as u64;
        let day_limit = daily.unwrap_or(default_day);
        let mut headers = vec![
            ("product-throttle-limit", minute_limit.to_string()),
            ("product-throttle-time-unit", "minute".into()),
            ("product-throttle-interval", "1".into()),
            ("product-throttle-available", minute_limit.saturating_sub(minute_used).to_string()),
            ("product-throttle-used", minute_used.to_string()),
            ("product-quota-limit", day_limit.to_string()),
            ("product-quota-time-unit", "day".into()),
            ("product-quota-interval", "1".into()),
            ("product-quota-available", day_limit.saturating_sub(b.day_used).to_string()),
            ("product-quota-used", b.day_used.to_string()),
            ("product-quota-expiry-time", ((today + 1) * DAY_MS).to_string()),
            ("tenant-id", "fake123.infusionsoft.com".into()),
        ];
        if let Some(limit) = tenant_limit {
            let used = self.tenant_minute.len() as u64;
            headers.extend([
                ("tenant-throttle-limit", limit.to_string()),
                ("tenant-throttle-time-unit", "minute".into()),
                ("tenant-throttle-interval", "1".into()),
                ("tenant-throttle-available", u64::from(limit).saturating_sub(used).to_string()),
                ("tenant-throttle-used", used.to_string()),
            ]);
        }
        (!over, headers.into_iter().map(|(n, v)| (format!("x-keap-{n}"), v)).collect())
    }
}
