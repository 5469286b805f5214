//! Unit tests of the three windows, the pauses and the day's reservations, on a paused clock.

use super::quota::until_next_utc_midnight;
use super::*;
use reqwest::header::HeaderMap;
use reqwest::header::{HeaderName, HeaderValue};
use std::time::{SystemTime, UNIX_EPOCH};

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
    assert!(left <= until_next_utc_midnight() && left + Duration::from_secs(5) > until_next_utc_midnight());
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
