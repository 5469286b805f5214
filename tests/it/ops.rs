//! Operations: backfill of pre-existing users (complete, resumable, lowest priority, not
//! repeated), `status --json`, and two instances (one delivers, the other takes over).

use std::collections::HashMap;
use std::time::{Duration, Instant};

use keap_sync::BackfillMode;
use keap_sync::RunOptions;
use keap_sync_testkit::app::{self, spawn_app_with, ChildDaemon, Options, TestApp};

async fn wait_exit(daemon: &mut ChildDaemon, timeout: Duration) -> std::process::ExitStatus {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(status) = daemon.child.try_wait().unwrap() {
            return status;
        }
        assert!(Instant::now() < deadline, "still running after {timeout:?}; log:\n{}", daemon.log_text());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Upserts per email: how often each user was sent.
fn upserts_per_email(app: &TestApp) -> HashMap<String, usize> {
    let mut per: HashMap<String, usize> = HashMap::new();
    for r in app.fake.requests().iter().filter(|r| r.method == "PUT" && (200..300).contains(&r.status)) {
        let body: serde_json::Value = serde_json::from_str(&r.body).unwrap_or_default();
        if let Some(email) = body["email_addresses"][0]["email"].as_str() {
            *per.entry(email.to_owned()).or_default() += 1;
        }
    }
    per
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backfill_of_10000_users_delivers_each_once_and_is_not_repeated() {
    let app = spawn_app_with(Options::stopped()).await;
    app.insert_preexisting_users(10_000).await;
    assert_eq!(app.count("select count(*) from keap_sync.outbox").await, 0, "not captured: pre-existing");
    let config = app.write_config_file("", "");

    let mut backfill = app.spawn_command(&config, &["backfill"]);
    let status = wait_exit(&mut backfill, Duration::from_secs(240)).await;
    assert!(status.success(), "log:\n{}", backfill.log_text());
    assert_eq!(app.contact_calls("PUT"), 10_000, "one call per user");
    app.assert_keap_matches_users().await;
    assert_eq!(app.count("select count(*) from keap_sync.backfill where state = 'done'").await, 1);

    // A second backfill after completion enqueues nothing and calls nothing.
    let mut again = app.spawn_command(&config, &["backfill"]);
    let status = wait_exit(&mut again, Duration::from_secs(30)).await;
    assert!(status.success(), "log:\n{}", again.log_text());
    assert!(again.log_text().contains("already finished"), "{}", again.log_text());
    assert_eq!(app.contact_calls("PUT"), 10_000);
    assert_eq!(app.count("select count(*) from keap_sync.outbox").await, 0);

    // Unless asked: a restart re-enqueues everyone, and unchanged payloads cost no call.
    let mut restart = app.spawn_command(&config, &["backfill", "--restart"]);
    let status = wait_exit(&mut restart, Duration::from_secs(120)).await;
    assert!(status.success(), "log:\n{}", restart.log_text());
    assert_eq!(app.contact_calls("PUT") + app.contact_calls("PATCH"), 10_000, "synced users cost no call");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_interrupted_backfill_resumes_without_resending_finished_users() {
    let app = spawn_app_with(Options::stopped()).await;
    app.insert_preexisting_users(10_000).await;
    let config = app.write_config_file("", "");

    let mut first = app.spawn_command(&config, &["backfill"]);
    app::eventually(Duration::from_secs(120), "about half delivered", || async {
        app.contact_calls("PUT") >= 5_000
    })
    .await;
    first.kill();
    let at_kill = app.contact_calls("PUT");

    let mut second = app.spawn_command(&config, &["backfill"]);
    let status = wait_exit(&mut second, Duration::from_secs(240)).await;
    assert!(status.success(), "log:\n{}", second.log_text());

    let per = upserts_per_email(&app);
    let resent = per.values().filter(|n| **n > 1).count();
    eprintln!(
        "killed after {at_kill} upserts; {} upserts in all; {resent} users sent twice",
        app.contact_calls("PUT")
    );
    // Only calls in flight at the kill (at most `concurrency` = 4) may be repeated.
    assert!(resent <= 4, "{resent} users re-sent");
    assert!(app.contact_calls("PUT") <= 10_004);
    app.assert_keap_matches_users().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn live_changes_overtake_a_running_backfill() {
    let mut app = spawn_app_with(Options {
        tweak: |c| {
            c.limits.per_second = 400;
        },
        ..Options::stopped()
    })
    .await;
    // 4,000 users: a first sync is a lookup and a create, 8,000 calls at 400/s.
    app.insert_preexisting_users(4_000).await;
    let options = RunOptions { backfill: Some(BackfillMode::Resume), ..RunOptions::default() };
    app.start_daemon_with_options(app.config(), options).await;
    app::eventually(Duration::from_secs(60), "backfill under way", || async {
        app.contact_calls("PUT") >= 250
    })
    .await;

    let mut delays = Vec::new();
    for i in 0..10 {
        let email = format!("live{i}@example.com");
        let id: i64 = app
            .db
            .query_one("insert into users (email) values ($1) returning id", &[&email])
            .await
            .unwrap()
            .get(0);
        let started = Instant::now();
        app::eventually(Duration::from_secs(30), "live change delivered", || async {
            app.count(&format!("select count(*) from keap_sync.contact_map where user_key = '{id}'")).await
                == 1
        })
        .await;
        delays.push(started.elapsed());
        assert!(
            app.count("select count(*) from keap_sync.outbox where priority = 2").await > 0,
            "live change {i} was delivered while the backfill was still running"
        );
    }
    delays.sort();
    eprintln!(
        "live change delay during backfill: min {:?}, median {:?}, max {:?}",
        delays[0], delays[5], delays[9]
    );
    // The README's promise: live changes go first. Behind the backfill's 8,000 calls at
    // 400/s they would wait up to 20 s; first, each takes the settle time and two calls.
    assert!(delays[9] < Duration::from_secs(1), "a live change took {:?} during the backfill", delays[9]);
    app.wait_idle_for(Duration::from_secs(120)).await;
    app.assert_keap_matches_users().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_json_reports_a_seeded_state() {
    let app = spawn_app_with(Options::stopped()).await;
    app.exec(
        "insert into keap_sync.outbox (user_key, priority, first_changed_at, parked_at) values
           ('1', 0, now() - interval '90 seconds', null),
           ('2', 0, now() - interval '10 seconds', null),
           ('3', 1, now() - interval '20 seconds', null),
           ('4', 2, now(), null), ('5', 2, now(), null), ('6', 2, now(), null),
           ('7', 0, now() - interval '1 hour', now());
         insert into keap_sync.change (user_key, at) values ('8', now() - interval '30 seconds'), ('8', now());",
    )
    .await;
    let out = app.run_cli(&["status", "--json"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let s: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        s["outbox"],
        serde_json::json!({"live": 2, "retry": 1, "backfill": 3, "parked": 1, "captured": 2})
    );
    let age = s["oldest_pending_age_secs"].as_f64().unwrap();
    assert!((90.0..100.0).contains(&age), "oldest age {age} (the parked one does not count)");
    assert_eq!(s["instances_alive"], serde_json::json!([]));
    assert!(s["token"].is_null());

    let text = app.run_cli(&["status"]);
    let text = String::from_utf8_lossy(&text.stdout);
    assert!(text.contains("2 live, 1 retrying, 3 backfill, 1 parked"), "{text}");
    assert!(text.contains("captured, not yet queued: 2 changes"), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_instances_one_delivers_and_the_other_takes_over() {
    let mut app = spawn_app_with(Options::default()).await;
    app::eventually(Duration::from_secs(10), "first instance active", || async {
        app.count("select count(*) from keap_sync.instances where role = 'active'").await == 1
    })
    .await;
    app.start_daemon().await;
    app::eventually(Duration::from_secs(10), "second instance standing by", || async {
        app.count("select count(*) from keap_sync.instances where role = 'standby'").await == 1
    })
    .await;
    app.exec("insert into users (email) select 'two' || g || '@example.com' from generate_series(1, 300) g")
        .await;
    app.wait_idle().await;
    assert_eq!(app.contact_calls("PUT"), 300);

    app.stop_one(0).await;
    app.exec("insert into users (email) select 'after' || g || '@example.com' from generate_series(1, 50) g")
        .await;
    app.wait_idle().await;
    assert_eq!(app.count("select count(*) from keap_sync.instances").await, 1);
    app::eventually(Duration::from_secs(10), "the other instance took over", || async {
        app.count("select count(*) from keap_sync.instances where role = 'active'").await == 1
    })
    .await;
    app.assert_keap_matches_users().await;
}

/// Parses the OpenMetrics text `/metrics` serves strictly enough to catch a broken exposition:
/// it ends with `# EOF`, every sample line is `name{labels} value` or `name value` with a valid
/// name, well-formed labels and a float value, and every sample's family has `# TYPE` before it
/// (a counter's samples carry `_total`, a histogram's `_bucket`, `_sum` and `_count`). Returns
/// (name with labels, value) pairs, the labels sorted by name so lookups don't depend on the
/// order the encoder writes them in.
fn parse_prometheus(text: &str) -> Vec<(String, f64)> {
    let valid_name = |n: &str| {
        !n.is_empty()
            && n.chars().next().is_some_and(|c| c.is_ascii_alphabetic() || c == '_' || c == ':')
            && n.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
    };
    let body = text.strip_suffix("# EOF\n").unwrap_or_else(|| panic!("no final # EOF:\n{text}"));
    let mut typed = std::collections::HashSet::new();
    let mut samples = Vec::new();
    for line in body.lines() {
        assert!(!line.trim().is_empty(), "blank line in OpenMetrics text");
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let mut parts = rest.split_whitespace();
            let name = parts.next().unwrap();
            let kind = parts.next().unwrap();
            assert!(["counter", "gauge", "histogram", "summary", "unknown"].contains(&kind), "{line}");
            typed.insert(name.to_owned());
            continue;
        }
        if line.starts_with('#') {
            continue;
        }
        let (series, value) = line.rsplit_once(' ').unwrap_or_else(|| panic!("no value: {line}"));
        let value: f64 = value.parse().unwrap_or_else(|_| panic!("bad value: {line}"));
        let (name, labels) = series.split_once('{').unwrap_or((series, ""));
        assert!(valid_name(name), "bad name: {line}");
        let mut labels: Vec<&str> = match labels {
            "" => Vec::new(),
            labels => {
                let labels = labels.strip_suffix('}').unwrap_or_else(|| panic!("unclosed labels: {line}"));
                // Our label values are fixed words, so a `,` only ever separates labels.
                labels.split(',').collect()
            }
        };
        for label in &labels {
            let (key, value) = label.split_once('=').unwrap_or_else(|| panic!("bad label: {line}"));
            assert!(valid_name(key), "bad label name: {line}");
            assert!(value.len() >= 2 && value.starts_with('"') && value.ends_with('"'), "{line}");
        }
        labels.sort_unstable();
        let family = ["_total", "_bucket", "_sum", "_count"]
            .iter()
            .find_map(|s| name.strip_suffix(s).filter(|f| typed.contains(*f)))
            .unwrap_or(name);
        assert!(typed.contains(family), "sample before its TYPE: {line}");
        let series =
            if labels.is_empty() { name.to_owned() } else { format!("{name}{{{}}}", labels.join(",")) };
        samples.push((series, value));
    }
    samples
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_parse_and_match_the_fakes_request_log() {
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let mut app = spawn_app_with(Options::stopped()).await;
    let mut config = app.config();
    config.metrics_listen = Some(format!("127.0.0.1:{port}").parse().unwrap());
    app.fake.inject(
        keap_sync_testkit::fake::FaultRule::new(
            keap_sync_testkit::fake::Route::Contacts,
            keap_sync_testkit::fake::FaultAction::Status(503, String::new()),
        )
        .times(5),
    );
    app.start_daemon_with(config).await;
    app.exec("insert into users (email) select 'm' || g || '@example.com' from generate_series(1, 40) g")
        .await;
    app.wait_idle().await;

    keap_sync_testkit::install_crypto_provider();
    let http = reqwest::Client::new();
    let health = http.get(format!("http://127.0.0.1:{port}/healthz")).send().await.unwrap();
    assert_eq!(health.status(), 200);
    let text =
        http.get(format!("http://127.0.0.1:{port}/metrics")).send().await.unwrap().text().await.unwrap();
    let samples = parse_prometheus(&text);
    let sum =
        |prefix: &str| -> f64 { samples.iter().filter(|(s, _)| s.starts_with(prefix)).map(|(_, v)| v).sum() };

    let keap_calls = app.fake.count(|r| r.path.starts_with("/crm/rest/v1/contacts")) as f64;
    assert_eq!(sum("keap_sync_keap_requests_total{"), keap_calls, "requests counted = requests the fake saw");
    let failed: f64 = samples
        .iter()
        .filter(|(s, _)| {
            s.starts_with("keap_sync_keap_requests_total{") && !s.contains("status_class=\"2xx\"")
        })
        .map(|(_, v)| v)
        .sum();
    assert_eq!(failed, 5.0, "the five injected 503s");
    assert_eq!(sum("keap_sync_deliveries_total{outcome=\"synced\"}"), 40.0);
    assert_eq!(sum("keap_sync_deliveries_total{outcome=\"retried\"}"), 5.0);
    assert_eq!(sum("keap_sync_keap_request_duration_seconds_count"), keap_calls);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn under_systemd_it_notifies_ready_watchdog_status_and_stopping() {
    use std::os::unix::net::UnixDatagram;
    let app = spawn_app_with(Options::stopped()).await;
    app.exec("insert into users (email) values ('sd@example.com')").await;
    let config = app.write_config_file("", "");
    let dir = config.parent().unwrap().to_owned();
    let socket_path = dir.join("notify.sock");
    let socket = UnixDatagram::bind(&socket_path).unwrap();
    socket.set_read_timeout(Some(Duration::from_secs(20))).unwrap();

    let child = std::process::Command::new(env!("CARGO_BIN_EXE_keap-sync"))
        .args(["--config", config.to_str().unwrap(), "run"])
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .envs(app.env())
        .env("NOTIFY_SOCKET", &socket_path)
        .env("WATCHDOG_USEC", "2000000")
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    // Killed on drop if an assertion fails first.
    let mut daemon = ChildDaemon { child, log: dir.join("unused.log") };

    let mut seen: Vec<String> = Vec::new();
    let mut buf = [0u8; 4096];
    let mut receive_until = |want: &str, seen: &mut Vec<String>| {
        while !seen.iter().any(|m| m.starts_with(want)) {
            let n = socket
                .recv(&mut buf)
                .unwrap_or_else(|e| panic!("no {want} from the daemon ({e}); got {seen:?}"));
            seen.push(String::from_utf8_lossy(&buf[..n]).into_owned());
        }
    };
    receive_until("READY=1", &mut seen);
    receive_until("WATCHDOG=1", &mut seen);
    receive_until("STATUS=", &mut seen);
    app.wait_idle().await;
    assert_eq!(app.fake.contacts().len(), 1);

    std::process::Command::new("kill").args(["-TERM", &daemon.child.id().to_string()]).status().unwrap();
    receive_until("STOPPING=1", &mut seen);
    assert!(daemon.child.wait().unwrap().success());
    let ready_at = seen.iter().position(|m| m == "READY=1").unwrap();
    assert!(seen[..ready_at].iter().all(|m| !m.starts_with("STOPPING")), "{seen:?}");
}
