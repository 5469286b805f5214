//! Delivery benchmark: does the daemon run at full speed *within* Keap's limits?
//!
//! A throwaway Postgres and the fake Keap (enforcing `--limit` requests per rolling second and
//! `60 × limit` per rolling minute, answering 429 above them) are started; `--changes` users are
//! inserted while no daemon runs (a backlog), then the real daemon is started in-process with
//! `[limits] per_second = limit` and `[delivery] concurrency = 4`. While it drains the backlog,
//! `--probes` more users are inserted one at a time, evenly spread over the expected drain time,
//! and their change-to-delivery latency (commit → `keap_sync.contact_map.synced_at`) is measured.
//!
//! Printed: contact calls, drain wall time, sustained calls/s (calls after the first ÷ time from
//! the first to the last contact request, as the fake recorded them) and its ratio to the limit,
//! 429s, the most calls the fake saw in any sliding 1-second and 60-second window, and probe
//! latency p50/p95/max. Figures only, no pass/fail.
//!
//! ```text
//! cargo bench --bench delivery -- [--limit N] [--changes N] [--probes N] [--backfill] [--api-key-limits]
//! ```
//! With `--api-key-limits` the daemon runs on an API key's default limits (no `[limits]`
//! section: 10/s, 240 per rolling minute, 30,000/day) and the fake enforces 10/s and 240 per
//! rolling 60 s, as Keap does for a PAT or SAK; `--limit` is ignored. The figure to read is the
//! most calls in any rolling 60 s window, which must not exceed 240 (ARCHITECTURE.md,
//! invariant 15): `cargo bench --bench delivery -- --api-key-limits --changes 600` takes about
//! 2.5 minutes.
//! With `--backfill` the backlog is pre-existing users synced by a backfill (lowest priority),
//! so the probes — live changes — overtake it; without, the backlog is live changes too and the
//! probes queue behind it in order.
//! Defaults: `--limit 25 --changes 2000 --probes 20`. The drain takes about changes ÷ limit
//! seconds. Daemon logs go to stderr at `warn` unless `KEAP_SYNC_LOG` says otherwise.

#![allow(
    clippy::disallowed_methods,
    reason = "tests, benches and the demo own the servers and daemons they spawn, which end with them"
)]
use std::collections::HashMap;
use std::time::{Duration, Instant, SystemTime};

use keap_sync::config::{Config, LimitsConfig};
use keap_sync_testkit::bench::connect;
use keap_sync_testkit::fake::{FakeKeap, FakeOptions};
use keap_sync_testkit::pg::Cluster;

const API_KEY: &str = "bench-key";
const USERS_DDL: &str =
    "create table users (id bigserial primary key, email text, first_name text, last_name text)";

struct Args {
    limit: u32,
    changes: u32,
    probes: u32,
    /// The backlog is a backfill of pre-existing users (lowest priority) instead of live changes.
    backfill: bool,
    /// An API key's default limits (10/s, 240/min) instead of `--limit` per second.
    api_key_limits: bool,
}

fn parse_args() -> Args {
    let mut args = Args { limit: 25, changes: 2000, probes: 20, backfill: false, api_key_limits: false };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let slot = match flag.as_str() {
            "--limit" => &mut args.limit,
            "--changes" => &mut args.changes,
            "--probes" => &mut args.probes,
            "--bench" => continue, // added by `cargo bench`
            "--backfill" => {
                args.backfill = true;
                continue;
            }
            "--api-key-limits" => {
                args.api_key_limits = true;
                continue;
            }
            _ => usage(&flag),
        };
        *slot = it.next().and_then(|v| v.parse().ok()).filter(|&n| n > 0).unwrap_or_else(|| usage(&flag));
    }
    args
}

fn usage(bad: &str) -> ! {
    eprintln!(
        "bad argument {bad:?}\nusage: cargo bench --bench delivery -- [--limit N] [--changes N] [--probes N] [--backfill] [--api-key-limits]"
    );
    std::process::exit(2)
}

fn main() {
    let args = parse_args();
    let filter = tracing_subscriber::EnvFilter::try_from_env("KEAP_SYNC_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).init();

    let cluster = Cluster::start().unwrap_or_else(|e| panic!("cannot start a throwaway PostgreSQL: {e}"));
    let rt = tokio::runtime::Runtime::new().expect("tokio runtime");
    rt.block_on(bench(&cluster, &args));
}

/// The most calls (arrival times, sorted) in any half-open window `[t, t + span)`.
fn most_in_any_window(at: &[Instant], span: Duration) -> usize {
    let (mut most, mut lo) = (0, 0);
    for hi in 0..at.len() {
        while at[hi].duration_since(at[lo]) >= span {
            lo += 1;
        }
        most = most.max(hi - lo + 1);
    }
    most
}

async fn bench(cluster: &Cluster, a: &Args) {
    let conninfo = cluster.create_database("bench").await.expect("create database");
    let (per_second, per_minute) = if a.api_key_limits {
        (LimitsConfig::API_KEY.per_second, LimitsConfig::API_KEY.per_minute)
    } else {
        (a.limit, a.limit * 60)
    };
    let fake = FakeKeap::start(FakeOptions {
        per_second_limit: Some(per_second),
        // Set so the fake's throttle header agrees with the config: left unset, it reports the
        // API-key default (240/min), which the daemon adopts, and the test would measure that.
        per_minute_limit: Some(per_minute),
        // The limits measured are the configured ones, not the fake's tenant minute.
        tenant_minute_limit: None,
        ..Default::default()
    })
    .await
    .expect("fake Keap");
    fake.add_api_key(API_KEY);

    let mut client = connect(&conninfo).await;
    client.batch_execute(USERS_DDL).await.expect("users table");
    let env = HashMap::from([
        ("DATABASE_URL", conninfo.clone()),
        ("KEAP_API_URL", fake.api_url()),
        ("KEAP_API_KEY", API_KEY.to_owned()),
    ]);
    // With --api-key-limits no [limits] section: the defaults for an API key are the point.
    let toml = if a.api_key_limits {
        "[delivery]\nconcurrency = 4\n".to_owned()
    } else {
        format!(
            "[delivery]\nconcurrency = 4\n\n[limits]\nper_second = {per_second}\nper_minute = {per_minute}\nper_day = 10000000\n"
        )
    };
    let config = Config::from_toml(&toml, &|k| env.get(k).cloned()).expect("config");
    keap_sync::migrate(&mut client, &config.users).await.expect("migrate");

    // The backlog, in one statement, before any daemon runs: live changes, or (--backfill)
    // users that existed before the trigger, which the daemon then backfills.
    if a.backfill {
        client.batch_execute("alter table users disable trigger keap_sync_capture").await.expect("disable");
    }
    client
        .execute(
            "insert into users (email, first_name, last_name)
             select 'user' || n || '@example.com', 'First' || n, 'Last' || n from generate_series(1, $1) n",
            &[&(a.changes as i32)],
        )
        .await
        .expect("backlog insert");
    if a.backfill {
        client
            .batch_execute("alter table users enable always trigger keap_sync_capture")
            .await
            .expect("enable");
    }
    let options = keap_sync::RunOptions {
        backfill: a.backfill.then_some(keap_sync::BackfillMode::Resume),
        ..Default::default()
    };

    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let started = Instant::now();
    let daemon = keap_sync::Daemon::build(config, options).await.expect("daemon start-up checks");
    let daemon = tokio::spawn(daemon.run(async {
        let _ = stop_rx.await;
    }));

    // Probes: single-row commits spread over the expected drain time.
    let rate = f64::from(per_second).min(f64::from(per_minute) / 60.0);
    let drain_secs = f64::from(a.changes) / rate;
    let gap = Duration::from_secs_f64(drain_secs / f64::from(a.probes));
    let mut probes: Vec<(String, SystemTime)> = Vec::new();
    for i in 0..a.probes {
        tokio::time::sleep_until((started + gap * i).into()).await;
        let row = client
            .query_one(
                "insert into users (email, first_name, last_name) values ($1, 'Probe', $2) returning id",
                &[&format!("probe{i}@example.com"), &i.to_string()],
            )
            .await
            .expect("probe insert");
        probes.push((row.get::<_, i64>(0).to_string(), SystemTime::now()));
    }

    let timeout = Duration::from_secs_f64(drain_secs * 2.0 + 60.0);
    let drained = keap_sync_testkit::app::wait_until_empty(&client, timeout).await;
    let wall = started.elapsed();

    // Contact calls as the fake received them (429s included: they show the client's pacing).
    let at: Vec<Instant> = fake.contact_call_times();
    let calls = at.len();
    let span = match (at.first(), at.last()) {
        (Some(first), Some(last)) => last.duration_since(*first).as_secs_f64(),
        _ => 0.0,
    };
    let sustained = if span > 0.0 { (calls - 1) as f64 / span } else { 0.0 };
    let max_window = most_in_any_window(&at, Duration::from_secs(1));
    let max_minute = most_in_any_window(&at, Duration::from_secs(60));

    // Probe latency: commit → the contact map row the daemon wrote on delivery.
    let latency_ms = keap_sync_testkit::bench::delivery_latencies_ms(&client, &probes).await;
    let pct = |q: f64| match latency_ms.len() {
        0 => f64::NAN,
        n => latency_ms[((q * n as f64).ceil() as usize).clamp(1, n) - 1],
    };

    println!(
        "limit:                {per_second}/s and {per_minute} per rolling minute{}",
        if a.api_key_limits { " (an API key's defaults)" } else { "" }
    );
    println!("changes:              {} backlog + {} probes", a.changes, a.probes);
    println!("contact calls:        {calls}");
    println!(
        "drain wall time:      {:.2} s{}",
        wall.as_secs_f64(),
        if drained { "" } else { " (TIMED OUT)" }
    );
    println!("sustained rate:       {sustained:.2} calls/s over {span:.2} s");
    println!("ratio to limit:       {:.3}", sustained / rate);
    println!("429 answers:          {}", fake.throttled_count());
    println!("max calls in any 1 s: {max_window}");
    println!("max calls in any 60 s: {max_minute} (limit {per_minute})");
    println!("Keap contacts:        {}", fake.contacts().len());
    println!(
        "probe latency (ms):   p50 {:.0}, p95 {:.0}, max {:.0} ({} of {} delivered)",
        pct(0.50),
        pct(0.95),
        pct(1.0),
        latency_ms.len(),
        probes.len()
    );

    let _ = stop_tx.send(());
    match tokio::time::timeout(Duration::from_secs(60), daemon).await {
        Ok(Ok(Ok(()))) => {}
        Ok(Ok(Err(e))) => eprintln!("daemon failed: {e}"),
        Ok(Err(e)) => eprintln!("daemon task: {e}"),
        Err(_) => eprintln!("daemon did not stop within 60 s"),
    }
}
