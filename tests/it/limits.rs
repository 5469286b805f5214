//! Keap's limits as rolling windows, shared and durable (ARCHITECTURE.md, invariant 15): no
//! rolling 60 s window holds more calls than the per-minute limit, and the day's count lives in
//! Postgres, so a restart does not refill it.
//!
//! The test kit's fake reports a per-minute limit far above anything a test sends
//! (`app::fake_options()`), and the daemon adopts only *lower* reported limits, so the limits
//! exercised here are the configured ones.

use std::time::{Duration, Instant};

use keap_sync_testkit::app::{self, spawn_app_with, Options, TestApp};

/// Arrival times (as the fake recorded them) of every contact call, 429s included: Keap's
/// window counts what arrives.
/// The most calls in any half-open window `[t, t + span)`, and how far after the first call
/// that window starts.
fn most_in_any_window(at: &[Instant], span: Duration) -> (usize, Duration) {
    let (mut most, mut start, mut lo) = (0, Duration::ZERO, 0);
    for hi in 0..at.len() {
        while at[hi].duration_since(at[lo]) >= span {
            lo += 1;
        }
        if hi - lo + 1 > most {
            most = hi - lo + 1;
            start = at[lo].duration_since(at[0]);
        }
    }
    (most, start)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_rolling_minute_holds_more_calls_than_the_per_minute_limit() {
    // Small, so the backlog outlasts one window in about a minute of wall time. A first sync is
    // two calls (a lookup by email, then the create), so 20 users make 40 calls.
    const PER_MINUTE: usize = 30;
    const USERS: usize = PER_MINUTE / 2 + 5;
    let mut app =
        spawn_app_with(Options { tweak: |c| c.limits.per_minute = PER_MINUTE as u32, ..Options::stopped() })
            .await;
    app.insert_users(USERS).await;
    app.start_daemon().await;
    app.wait_idle_for(Duration::from_secs(150)).await;

    let at = app.fake.contact_call_times();
    let (most, from) = most_in_any_window(&at, Duration::from_secs(60));
    eprintln!(
        "{} calls; at most {most} in a rolling 60 s (window starting {from:?} after the first)",
        at.len()
    );
    // A lookup and a create per user; a user whose create could not be admitted before its
    // lease ran out looks up again on its retry, so there may be a few more.
    assert!(at.len() >= 2 * USERS, "{} calls for {USERS} users", at.len());
    assert!(
        most <= PER_MINUTE,
        "{most} calls in one rolling 60 s window (starting {from:?} after the first call); per_minute = {PER_MINUTE}"
    );
    app.assert_keap_matches_users().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_days_count_survives_a_restart() {
    let mut app = spawn_app_with(Options {
        tweak: |c| {
            c.limits.per_day = 20;
            // Slow enough that the first daemon can be stopped part-way through the day's 20.
            c.limits.per_second = 4;
        },
        ..Options::stopped()
    })
    .await;
    app.insert_users(30).await;
    app.start_daemon().await;
    app::eventually(Duration::from_secs(30), "the first daemon's first calls", || async {
        app.fake.contacts().len() >= 5
    })
    .await;
    app.stop_daemon().await;
    let first = app.fake.contact_call_times().len();
    assert!(first < 20, "the first daemon was meant to stop part-way, but made {first} calls");

    app.start_daemon().await;
    app::eventually(Duration::from_secs(60), "the daily pause, or more than 20 calls", || async {
        app.fake.contact_call_times().len() > 20
            || app
                .count("select count(*) from keap_sync.instances where paused_reason like '%daily quota%'")
                .await
                == 1
    })
    .await;
    let total = app.fake.contact_call_times().len();
    eprintln!("first daemon: {first} calls; both: {total}");
    assert_eq!(total, 20, "calls in one day with per_day = 20 across a restart ({first} before it)");
    // A first sync is a lookup and a create; the stop may fall between the two for each of the
    // deliveries in flight (delivery.concurrency, 4), and each such user looks up again after
    // the restart: 20 calls = 2 × contacts + repeated lookups (0 to 4), so 8 to 10 contacts.
    let contacts = app.fake.contacts().len();
    assert!((8..=10).contains(&contacts), "{contacts} contacts for 20 calls");
    assert_eq!(
        app.count("select count(*) from keap_sync.outbox").await,
        30 - contacts as i64,
        "the rest stays queued"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_daemon_never_lets_the_day_exceed_its_count() {
    let mut app = spawn_app_with(Options {
        tweak: |c| {
            c.limits.per_day = 20;
            c.limits.per_second = 4;
        },
        ..Options::stopped()
    })
    .await;
    app.insert_users(30).await;
    let config = app.write_config_file("", "");
    let toml = std::fs::read_to_string(&config).expect("config file");
    let toml =
        toml.replace("per_second = 5000", "per_second = 4").replace("per_day = 10000000", "per_day = 20");
    std::fs::write(&config, toml).expect("config file");
    let mut daemon = app.spawn_process(&config);
    app::eventually(Duration::from_secs(30), "the killed daemon's first calls", || async {
        app.fake.contacts().len() >= 5
    })
    .await;
    daemon.kill();
    let first = app.fake.contact_call_times().len();

    // The killed daemon's unused reservations are lost with it: the day only ends sooner.
    app.start_daemon().await;
    app::eventually(Duration::from_secs(60), "the daily pause, or more than 20 calls", || async {
        app.fake.contact_call_times().len() > 20
            || app
                .count("select count(*) from keap_sync.instances where paused_reason like '%daily quota%'")
                .await
                == 1
    })
    .await;
    let total = app.fake.contact_call_times().len();
    eprintln!("killed daemon: {first} calls; both: {total}");
    assert!(total <= 20, "{total} calls in one day with per_day = 20 across a crash ({first} before it)");
    assert_eq!(app.count("select calls from keap_sync.quota_usage").await, 20, "the day's count is spent");
    drop(daemon);
}

/// The daemon's defaults for an API key (10/s, 240/min) against the fake's strictest default
/// limits (Keap's documented ones, and a tenant's 5,000/min): no call is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_daemons_default_limits_meet_the_fakes_default_limits() {
    let app = spawn_app_with(Options {
        fake: keap_sync_testkit::fake::FakeOptions::default(),
        tweak: |c| c.limits = keap_sync::config::LimitsConfig::API_KEY,
        ..Options::default()
    })
    .await;
    // 20 first syncs: 40 calls, about 4 s at 9.5/s.
    app.insert_users(20).await;
    app.wait_idle_for(Duration::from_secs(30)).await;
    assert_eq!(app.fake.count(|r| r.status == 429), 0, "Keap refused a call");
    app.assert_keap_matches_users().await;
}

/// Waits until Keap has admitted `limit` contact calls, watches a further 2 s (absence is the
/// assertion: this waits on the clock) and asserts that no more were admitted and none refused.
async fn holds_to_a_reported_minute_limit(app: &TestApp, limit: usize) {
    let admitted = || app.fake.count(|r| r.path.starts_with("/crm/rest/v1/contacts") && r.status != 429);
    app::eventually(Duration::from_secs(20), "the reported minute's calls made", || async {
        admitted() >= limit
    })
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(app.fake.count(|r| r.status == 429), 0, "the daemon went past the reported limit");
    assert_eq!(admitted(), limit, "the daemon holds at the reported limit until the minute has passed");
}

/// Keap reports a per-minute limit lower than the configured one in
/// `x-keap-product-throttle-limit`: the daemon adopts it (invariant 8) instead of meeting 429s.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lower_per_minute_limit_keap_reports_is_adopted() {
    let app = spawn_app_with(Options {
        fake: keap_sync_testkit::fake::FakeOptions { per_minute_limit: Some(20), ..app::fake_options() },
        ..Options::default()
    })
    .await;
    app.insert_users(15).await;
    holds_to_a_reported_minute_limit(&app, 20).await;
}

/// The same for the tenant's limit, reported in `x-keap-tenant-throttle-limit`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tenants_per_minute_limit_keap_reports_is_adopted() {
    let app = spawn_app_with(Options {
        fake: keap_sync_testkit::fake::FakeOptions { tenant_minute_limit: Some(20), ..app::fake_options() },
        ..Options::default()
    })
    .await;
    app.insert_users(15).await;
    holds_to_a_reported_minute_limit(&app, 20).await;
}
