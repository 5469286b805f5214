//! README promises that had no test that could go red: a missed NOTIFY only delays a change; a
//! call that outlasts `request_timeout_secs` is retried; a 429 pauses every sender and nothing
//! is lost; one user never has two calls in flight; only the lock holder calls Keap and a
//! standby takes over within about 2 s of a crash; live changes go before retries; the retry
//! schedule survives a restart; the contact map keeps hashes, never values. Each is checked
//! from the fake's side (what reached Keap, and when), not from the daemon's own report.

use std::time::{Duration, Instant};

use keap_sync_testkit::app::{self, spawn_app, spawn_app_with, Options, TestApp, API_KEY};
use keap_sync_testkit::fake::{FakeKeap, FaultAction, FaultRule, Route};

async fn mapped(app: &TestApp, key: &str) -> bool {
    app.count(&format!("select count(*) from keap_sync.contact_map where user_key = '{key}'")).await == 1
}

/// A user in the table that capture never saw (as if its NOTIFY and its log row were both
/// lost), with key `key`.
async fn uncaptured_user(app: &TestApp, key: i64, email: &str) {
    app.exec(&format!(
        "alter table users disable trigger keap_sync_capture;
         insert into users (id, email, first_name) values ({key}, '{email}', 'Silent');
         alter table users enable always trigger keap_sync_capture;"
    ))
    .await;
}

/// A change queued in the outbox with no NOTIFY (the daemon was listening, the wake-up never
/// came) is delivered on the next poll: delayed by at most the poll interval, not lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_queued_change_whose_notify_was_missed_waits_one_poll_interval_at_most() {
    let app = spawn_app_with(Options {
        tweak: |c| c.delivery.poll_interval = Duration::from_secs(2),
        ..Options::default()
    })
    .await;
    app.exec("insert into users (email) values ('first@example.com')").await;
    app.wait_idle().await;
    uncaptured_user(&app, 1_000, "silent@example.com").await;
    let queued = Instant::now();
    app.exec("insert into keap_sync.outbox (user_key) values ('1000')").await;
    app::eventually(Duration::from_secs(10), "the silent change delivered", || async {
        mapped(&app, "1000").await
    })
    .await;
    let took = queued.elapsed();
    eprintln!("a change with no NOTIFY delivered after {took:?} (poll interval 2 s)");
    // The poll interval, the settle time (100 ms) and a first sync's two calls.
    assert!(took <= Duration::from_millis(2_900), "delivered after {took:?}, poll interval 2 s");
    app.assert_keap_matches_users().await;
}

/// A change in the change log with no NOTIFY is folded by the daemon's sweep (every 30 s) and
/// delivered: delayed, never lost (invariant 1).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_logged_change_whose_notify_was_missed_is_folded_by_the_sweep() {
    let app = spawn_app().await;
    app.exec("insert into users (email) values ('first@example.com')").await;
    app.wait_idle().await;
    uncaptured_user(&app, 2_000, "silent@example.com").await;
    let logged = Instant::now();
    app.exec("insert into keap_sync.change (user_key) values ('2000')").await;
    app::eventually(Duration::from_secs(40), "the silent change delivered", || async {
        mapped(&app, "2000").await
    })
    .await;
    let took = logged.elapsed();
    eprintln!("a logged change with no NOTIFY delivered after {took:?} (sweep every 30 s)");
    assert!(took <= Duration::from_secs(32), "delivered after {took:?}");
    app.assert_keap_matches_users().await;
}

/// A call Keap does not answer within `request_timeout_secs` (3 s in the tests) is abandoned
/// and retried, not waited for; nothing is parked and no contact is doubled.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_that_outlasts_the_request_timeout_is_retried() {
    let mut app = spawn_app_with(Options::stopped()).await;
    // The first contact call (the lookup by email) takes 6 s to answer.
    app.fake.inject(FaultRule::new(Route::Contacts, FaultAction::Delay(Duration::from_secs(6))).times(1));
    app.exec("insert into users (email, first_name) values ('slow@example.com', 'Slow')").await;
    app.start_daemon().await;
    app.wait_idle_for(Duration::from_secs(20)).await;
    let lookups: Vec<Instant> = {
        let mut at: Vec<Instant> =
            app.fake.requests().into_iter().filter(|r| r.method == "GET").map(|r| r.at).collect();
        at.sort();
        at
    };
    assert!(lookups.len() >= 2, "the timed-out lookup was sent again ({} lookups)", lookups.len());
    let again = lookups[1] - lookups[0];
    eprintln!("the lookup was sent again {again:?} after the first");
    assert!(
        again >= Duration::from_millis(2_900) && again < Duration::from_millis(5_900),
        "sent again {again:?} after the first: after the 3 s timeout, before Keap's 6 s answer"
    );
    assert_eq!(app.count("select count(*) from keap_sync.outbox where parked_at is not null").await, 0);
    app.assert_keap_matches_users().await;
}

/// A 429 pauses every sender, not only the one that got it, until the window reopens (1 s for
/// a first 429 without `Retry-After`); the change is retried, never parked, and nothing is lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_429_pauses_every_sender_and_loses_nothing() {
    // 100 first syncs at 100 calls/s: two seconds of calls, so a sender that did not pause
    // would be seen calling during the pause.
    let mut app =
        spawn_app_with(Options { tweak: |c| c.limits.per_second = 100, ..Options::stopped() }).await;
    app.insert_users(100).await;
    let throttled =
        r#"{"code":"429","message":"Quota Exceeded","status":"Request Throttled","details":null}"#;
    app.fake.inject(FaultRule::new(Route::Contacts, FaultAction::Status(429, throttled.into())).times(1));
    app.start_daemon().await;
    app.wait_idle_for(Duration::from_secs(30)).await;

    let answered_429: Vec<Instant> =
        app.fake.requests().into_iter().filter(|r| r.status == 429).map(|r| r.at).collect();
    assert_eq!(answered_429.len(), 1);
    let t0 = answered_429[0];
    // Calls already on the wire when the 429 came arrive within a few ms; after that, none
    // until the pause ends.
    let during: Vec<Duration> = app
        .fake
        .contact_call_times()
        .into_iter()
        .filter(|t| *t > t0)
        .map(|t| t - t0)
        .filter(|d| *d > Duration::from_millis(150) && *d < Duration::from_millis(950))
        .collect();
    assert!(during.is_empty(), "calls {during:?} after the 429, inside the 1 s pause");
    assert_eq!(app.count("select count(*) from keap_sync.outbox where parked_at is not null").await, 0);
    app.assert_keap_matches_users().await;
}

/// One user never has two calls in flight: while Keap takes 250 ms to answer, a user changed
/// every 40 ms gets its calls one after another, each sent after the previous was answered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_user_never_has_two_calls_in_flight() {
    let latency = Duration::from_millis(250);
    let app = spawn_app().await;
    app.fake.set_latency(latency);
    app.exec("insert into users (id, email, first_name) values (1, 'busy@example.com', 'v0')").await;
    let started = Instant::now();
    let mut n = 0;
    while started.elapsed() < Duration::from_secs(3) {
        n += 1;
        app.db.execute("update users set first_name = $1 where id = 1", &[&format!("v{n}")]).await.unwrap();
        // Pacing the load, not synchronisation.
        tokio::time::sleep(Duration::from_millis(40)).await;
    }
    // Checked before the outbox must be empty, so a defect shows as overlapping calls rather
    // than as a delivery that never settles.
    let _ = app::wait_until_empty(&app.db, Duration::from_secs(10)).await;
    let calls = app.fake.contact_call_times();
    eprintln!("{n} updates of one user: {} calls", calls.len());
    assert!(calls.len() >= 4, "several calls were made ({})", calls.len());
    for pair in calls.windows(2) {
        let gap = pair[1] - pair[0];
        assert!(gap >= latency, "a call arrived {gap:?} after the previous one, which takes {latency:?}");
    }
    app.wait_idle().await;
    app.assert_keap_matches_users().await;
}

/// Two instances, each pointed at its own fake Keap, so the fakes tell who called: only the
/// holder of the delivery lock calls Keap; after it is killed (SIGKILL) the standby takes over
/// within about 2 s.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_the_lock_holder_calls_keap_and_a_standby_takes_over_within_2_s() {
    let app = spawn_app_with(Options::stopped()).await;
    let other = FakeKeap::start(app::fake_options()).await.expect("a second fake");
    other.add_api_key(API_KEY);
    let config = app.write_config_file("", "");
    // The environment names Keap's URL, over the file's.
    let spawn = |api_url: String| {
        let log = config.with_extension(format!("log.{}", app::rand_suffix()));
        let child = std::process::Command::new(app::keap_sync_binary())
            .args(["--config", config.to_str().unwrap(), "run"])
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .envs(app.env())
            .env("KEAP_API_URL", api_url)
            .env("KEAP_SYNC_LOG", "info")
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .expect("spawn keap-sync");
        app::ChildDaemon { child, log }
    };
    let mut a = spawn(app.fake.api_url());
    app.exec("insert into users (email) values ('first@example.com')").await;
    app.wait_idle().await;
    let b = spawn(other.api_url());
    app::eventually(Duration::from_secs(10), "the second instance waiting as a standby", || async {
        app.count("select count(*) from keap_sync.instances where role = 'standby'").await == 1
    })
    .await;
    app.insert_users(30).await;
    app.wait_idle().await;
    assert_eq!(other.requests().len(), 0, "the standby made no call");
    assert!(app.fake.contacts().len() >= 30, "the holder delivered");

    a.kill();
    let killed = Instant::now();
    app.exec("insert into users (email) values ('after@example.com')").await;
    let deadline = Instant::now() + Duration::from_secs(10);
    while other.requests().is_empty() {
        assert!(Instant::now() < deadline, "the standby made no call in 10 s; its log:\n{}", b.log_text());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let took = other.requests().iter().map(|r| r.at).min().expect("a call") - killed;
    eprintln!("the standby's first call {took:?} after the kill");
    assert!(took <= Duration::from_millis(2_600), "the standby took over after {took:?}");
    app::eventually(Duration::from_secs(15), "the new user delivered by the standby", || async {
        other.contacts_with_email("after@example.com").len() == 1
    })
    .await;
}

/// Live changes go before retries: with 40 users waiting to be retried and the limiter the
/// bottleneck, a new user is delivered while most of the retries still wait. (At most the
/// `concurrency` deliveries already claimed, 4, go ahead of it.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn live_changes_go_before_retries() {
    let app = spawn_app_with(Options {
        tweak: |c| {
            c.limits.per_second = 10;
        },
        ..Options::default()
    })
    .await;
    // Every contact call fails for now: 40 users become retries.
    app.fake
        .inject(FaultRule::new(Route::Contacts, FaultAction::Status(500, r#"{"message":"down"}"#.into())));
    app.insert_users(40).await;
    app::eventually(Duration::from_secs(30), "40 retries", || async {
        app.count("select count(*) from keap_sync.outbox where priority = 1").await == 40
    })
    .await;
    app.fake.clear_faults();
    app.exec("insert into users (id, email) values (1000, 'live@example.com')").await;
    app::eventually(Duration::from_secs(20), "the live change delivered", || async {
        mapped(&app, "1000").await
    })
    .await;
    // 80 calls at 9.5/s: the retries take about 8 s; the live change, two calls.
    let waiting = app.count("select count(*) from keap_sync.outbox where priority = 1").await;
    eprintln!("the live change was delivered with {waiting} of 40 retries still waiting");
    assert!(waiting >= 25, "only {waiting} of 40 retries still waited when the live change was delivered");
    app.wait_idle_for(Duration::from_secs(30)).await;
    app.assert_keap_matches_users().await;
}

/// The retry schedule lives in the outbox row: a daemon restarted while a change waits for its
/// retry does not send it before its time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_retry_schedule_survives_a_restart() {
    let mut app = spawn_app_with(Options {
        tweak: |c| {
            c.delivery.retry_base = Duration::from_secs(4);
            c.delivery.retry_max = Duration::from_secs(8);
        },
        ..Options::default()
    })
    .await;
    app.fake.inject(
        FaultRule::new(Route::Contacts, FaultAction::Status(503, r#"{"message":"busy"}"#.into())).times(1),
    );
    app.exec("insert into users (id, email) values (1, 'later@example.com')").await;
    let scheduled = "select extract(epoch from next_attempt_at - now())::float8 from keap_sync.outbox
                      where user_key = '1' and attempts = 1 and lease_until is null";
    app::eventually(Duration::from_secs(10), "the retry scheduled", || async {
        app.db.query_opt(scheduled, &[]).await.unwrap().is_some()
    })
    .await;
    app.stop_daemon().await;
    let due_in: f64 = app.db.query_one(scheduled, &[]).await.unwrap().get(0);
    let due = Instant::now() + Duration::from_secs_f64(due_in.max(0.0));
    assert!(due_in > 1.0, "a retry {due_in:.2} s away");
    app.start_daemon().await;
    app.wait_idle_for(Duration::from_secs(20)).await;
    let calls = app.fake.contact_call_times();
    assert_eq!(calls.len(), 3, "the refused lookup, then the lookup and the create");
    let early = due.saturating_duration_since(calls[1]);
    assert!(early <= Duration::from_millis(100), "retried {early:?} before its time after the restart");
    app.assert_keap_matches_users().await;
}

/// What the contact map keeps of Keap's state is hashes: no personal value of the user is
/// stored in it (invariant 12).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_contact_map_keeps_hashes_never_values() {
    let app = spawn_app().await;
    let values = ["Zebediah", "Quillfeather", "zebediah.quill@example.com"];
    app.exec(&format!(
        "insert into users (id, first_name, last_name, email) values (1, '{}', '{}', '{}')",
        values[0], values[1], values[2]
    ))
    .await;
    app.wait_idle().await;
    app.exec("update users set first_name = 'Ezekiel' where id = 1").await;
    app.wait_idle().await;
    let stored: String = app
        .db
        .query_one("select string_agg(m::text, ' ') from keap_sync.contact_map m", &[])
        .await
        .unwrap()
        .get(0);
    let sent: String = app
        .db
        .query_one("select coalesce(sent::text, '') from keap_sync.contact_map", &[])
        .await
        .unwrap()
        .get(0);
    assert!(sent.contains("given_name"), "the map keeps what Keap holds, per path: {sent}");
    for v in values.iter().chain(&["Ezekiel"]) {
        assert!(!stored.to_lowercase().contains(&v.to_lowercase()), "the contact map holds {v:?}: {stored}");
    }
}
