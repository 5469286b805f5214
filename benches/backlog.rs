//! Benchmark: what an idle daemon costs beside a backlog of N outbox rows (default 1,000,000)
//! that are not due yet (a Keap outage's retries, a backfill scheduled for later), on a
//! throwaway PostgreSQL with `pg_stat_statements`.
//!
//! ```sh
//! cargo bench --bench backlog                     # 1,000,000 rows, 20 s idle
//! cargo bench --bench backlog -- --rows 200000 --secs 10
//! ```
//!
//! The rows are inserted with SQL (90 % backfill due in a day, 10 % retries due in an hour), then
//! the daemon runs in this process with the default settings (5 s poll interval, heartbeat every
//! 5 s) and a Keap URL it never calls. Prints, for the idle window: each statement the daemon
//! ran with its calls and mean time (`pg_stat_statements`), this process's CPU (utime + stime
//! from `/proc/self/stat`, i.e. the daemon) and the CPU of every server process of the cluster
//! (`/proc/<pid>/stat`, the postmaster and each backend). For comparison it also times, with
//! `explain analyze`, the queue-depth and next-due queries keap-sync ran before migration 0007.

#![allow(
    clippy::disallowed_methods,
    reason = "tests, benches and the demo own the servers and daemons they spawn, which end with them"
)]
use std::time::{Duration, Instant};

use keap_sync::config::Config;
use keap_sync_testkit::bench::{self, arg, connect, cpu_ticks, ServerCpu};
use tokio_postgres::Client;

/// `explain analyze` execution time of `sql`, in ms (median of 3).
async fn explain_ms(client: &Client, sql: &str) -> f64 {
    let mut times = Vec::new();
    for _ in 0..3 {
        let rows = client.query(&format!("explain (analyze, format json) {sql}"), &[]).await.expect(sql);
        let plan: serde_json::Value = rows[0].get(0);
        times.push(plan[0]["Execution Time"].as_f64().unwrap_or(f64::NAN));
    }
    times.sort_by(f64::total_cmp);
    times[1]
}

#[tokio::main]
async fn main() {
    let rows = arg("--rows", 1_000_000);
    let secs = arg("--secs", 20) as u64;
    let cluster = bench::enable_pg_stat_statements(bench::start_cluster().await).await;
    let conninfo = cluster.create_database("bench").await.expect("database");
    let env = |k: &str| match k {
        "DATABASE_URL" => Some(conninfo.clone()),
        "KEAP_API_KEY" => Some("unused".to_owned()),
        _ => None,
    };
    let config = Config::from_env(&env).expect("config");
    let mut client = connect(&conninfo).await;
    client
        .batch_execute(
            "create table users (id bigserial primary key, email text, first_name text, last_name text)",
        )
        .await
        .expect("users");
    keap_sync::migrate(&mut client, &config.users).await.expect("migrate");
    let started = Instant::now();
    client
        .batch_execute(&format!(
            "insert into keap_sync.outbox (user_key, priority, next_attempt_at, first_changed_at, changed_at)
             select g::text,
                    case when g % 10 = 0 then 1 else 2 end,
                    now() + case when g % 10 = 0 then interval '1 hour' else interval '1 day' end,
                    now() - interval '1 hour', now() - interval '1 hour'
               from generate_series(1, {rows}) g"
        ))
        .await
        .expect("backlog");
    client.batch_execute("vacuum analyze keap_sync.outbox").await.expect("vacuum");
    println!("backlog:             {rows} outbox rows, built in {:.1} s", started.elapsed().as_secs_f64());

    // The queries keap-sync ran before migration 0007, for comparison.
    let old_depth = explain_ms(
        &client,
        "select count(*) filter (where parked_at is null and priority = 0),
                count(*) filter (where parked_at is null and priority = 1),
                count(*) filter (where parked_at is null and priority = 2),
                count(*) filter (where parked_at is not null),
                extract(epoch from now() - min(first_changed_at) filter (where parked_at is null))::float8
           from keap_sync.outbox",
    )
    .await;
    let old_next_due = explain_ms(
        &client,
        "select extract(epoch from min(greatest(next_attempt_at,
                    least(changed_at + interval '0.1 s', first_changed_at + interval '1 s'),
                    coalesce(lease_until, '-infinity'))) - now())::float8
           from (select next_attempt_at, changed_at, first_changed_at, lease_until
                   from keap_sync.outbox where parked_at is null
                  order by next_attempt_at limit 1000) s",
    )
    .await;

    client
        .batch_execute("create extension pg_stat_statements; select pg_stat_statements_reset()")
        .await
        .expect("pg_stat_statements");
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let daemon = keap_sync::Daemon::build(config, keap_sync::RunOptions::default()).await.expect("daemon");
    let running = tokio::spawn(daemon.run(async {
        let _ = stop_rx.await;
    }));
    // Let it connect and drain once, then measure the idle window.
    tokio::time::sleep(Duration::from_secs(2)).await;
    client.batch_execute("select pg_stat_statements_reset()").await.expect("reset");
    let pg_before = ServerCpu::read(&cluster);
    let self_before = cpu_ticks("self");
    let window = Instant::now();
    tokio::time::sleep(Duration::from_secs(secs)).await;
    let self_after = cpu_ticks("self");
    let pg_secs = ServerCpu::read(&cluster).since(&pg_before);
    let elapsed = window.elapsed().as_secs_f64();
    let statements = bench::statements(&client).await;
    let _ = stop_tx.send(());
    running.await.expect("daemon task").expect("daemon run");

    let tck = bench::ticks_per_sec();
    let total_ms: f64 = statements.iter().map(|s| s.total_ms).sum();
    println!("idle window:         {elapsed:.1} s, default settings (poll 5 s, heartbeat 5 s)");
    println!(
        "daemon CPU:          {:.3} s ({:.2} % of a core)",
        (self_after - self_before) as f64 / tck,
        (self_after - self_before) as f64 / tck / elapsed * 100.0
    );
    println!(
        "postgres CPU:        {:.3} s ({:.2} % of a core), all server processes",
        pg_secs,
        pg_secs / elapsed * 100.0
    );
    println!("statement time:      {total_ms:.1} ms in total (pg_stat_statements)");
    println!("statements (calls, mean ms, query):");
    for s in &statements {
        let query: String = s.query.chars().take(90).collect();
        println!("  {:>5} {:>9.3}  {query}", s.calls, s.mean_ms);
    }
    println!("before 0007, for comparison (explain analyze, median of 3):");
    println!("  depth (count of the outbox):   {old_depth:.1} ms per heartbeat / status / progress read");
    println!("  next due (sort of every row):  {old_next_due:.1} ms per loop turn");
    drop(client);
    drop(cluster);
}
