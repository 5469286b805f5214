//! Benchmark: time and peak memory to enqueue a backfill of N pre-existing users (default
//! 1,000,000) on a throwaway PostgreSQL. Delivery is not part of it (see `delivery`).
//!
//! ```sh
//! cargo bench --bench backfill               # 1,000,000 users
//! cargo bench --bench backfill -- --users 200000
//! ```
//!
//! Prints the enqueue time, the rate, the number of batches (= transactions), the longest
//! single batch (how long any one statement held its snapshot), and this process's peak
//! resident memory (`VmHWM`) before and after, which shows that memory does not grow with the
//! table: the rows never leave the database.

#![allow(
    clippy::disallowed_methods,
    reason = "tests, benches and the demo own the servers and daemons they spawn, which end with them"
)]
use std::time::{Duration, Instant};

use keap_sync::config::Config;
use keap_sync::BackfillMode;
use keap_sync_testkit::bench::{self, arg};

#[tokio::main]
async fn main() {
    let users = arg("--users", 1_000_000);
    let cluster = bench::start_cluster().await;
    let conninfo = cluster.create_database("bench").await.expect("database");
    let env = |k: &str| match k {
        "DATABASE_URL" => Some(conninfo.clone()),
        "KEAP_API_KEY" => Some("unused".to_owned()),
        _ => None,
    };
    let config = Config::from_env(&env).expect("config");
    let mut client = bench::connect(&conninfo).await;
    client
        .batch_execute(&format!(
            "create table users (id bigserial primary key, email text, first_name text, last_name text);
             insert into users (email, first_name, last_name)
             select 'user' || g || '@example.com', 'First' || g, 'Last' || g from generate_series(1, {users}) g;
             analyze users;"
        ))
        .await
        .expect("users");
    keap_sync::migrate(&mut client, &config.users).await.expect("migrate");

    let rss_before = bench::peak_rss_kib("self");
    let started = Instant::now();
    let mut batches = 0u64;
    let mut longest = Duration::ZERO;
    let mut last = Instant::now();
    let mut batch_size = 0;
    let mut enqueued_before = 0;
    let begun = keap_sync::enqueue_backfill(&config, BackfillMode::Restart, |enqueued| {
        batches += 1;
        batch_size = batch_size.max(enqueued - enqueued_before);
        enqueued_before = enqueued;
        longest = longest.max(last.elapsed());
        last = Instant::now();
    })
    .await
    .expect("enqueue");
    assert!(begun, "a restarted backfill always begins");
    let took = started.elapsed();
    let queued: i64 = client.query_one("select count(*) from keap_sync.outbox", &[]).await.unwrap().get(0);
    let rss_after = bench::peak_rss_kib("self");

    println!("users:               {users}");
    println!("enqueued:            {queued}");
    println!("enqueue time:        {:.2} s", took.as_secs_f64());
    println!("rate:                {:.0} users/s", queued as f64 / took.as_secs_f64());
    println!("batches (txns):      {batches} of up to {batch_size}");
    println!("longest batch:       {} ms", longest.as_millis());
    println!("peak RSS before:     {} KiB", rss_before);
    println!("peak RSS after:      {} KiB", rss_after);
    assert_eq!(queued, users, "every user enqueued");
    drop(client);
    drop(cluster);
}
