//! Benchmark: what capture costs the application's inserts, on a throwaway PostgreSQL, after
//! `migrate`, daemon not running.
//!
//! ```sh
//! cargo bench --bench capture                 # 20,000 rows per case
//! cargo bench --bench capture -- --rows 5000
//! ```
//!
//! Inserts rows into `users` in 100-row statements (one transaction each) and in single-row
//! autocommit statements, three ways, interleaved (`bench::insert_rates`): no capture trigger,
//! the capture triggers `migrate` installs (per statement, appending to the change log of 0011),
//! and the row trigger of 0005 (`keap_sync.capture`, installed here explicitly for comparison).
//! Prints rows/s and the ratio to no trigger.
//!
//! Then a bulk UPDATE of every row with the capture triggers, in a fresh session and in one
//! that updated a single row first (a pooled connection's usual state: PL/pgSQL plans a
//! trigger's statements once per session, with its first call's sizes), three rounds each.

#![allow(
    clippy::disallowed_methods,
    reason = "tests, benches and the demo own the servers and daemons they spawn, which end with them"
)]
use keap_sync::config::Config;
use keap_sync_testkit::bench::{self, arg, connect, insert_rates as measure};

#[tokio::main]
async fn main() {
    let rows = arg("--rows", 20_000);
    let cluster = bench::start_cluster().await;
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
    // The row trigger of 0005, beside the new ones, disabled unless measured.
    let args: Vec<String> = std::iter::once(config.users.key.clone())
        .chain(config.users.synced_columns())
        .map(|c| format!("'{c}'"))
        .collect();
    client
        .batch_execute(&format!(
            "create trigger keap_sync_capture_row_0005 after insert or update or delete on users
                 for each row execute function keap_sync.capture({})",
            args.join(", ")
        ))
        .await
        .expect("old trigger");

    let rates = measure(
        &client,
        rows,
        &[
            "",
            bench::ENABLE_CAPTURE,
            "alter table users enable always trigger keap_sync_capture_row_0005; alter table users enable always trigger keap_sync_capture_truncate;",
        ],
    )
    .await;
    let (none, new, old) = (rates[0], rates[1], rates[2]);
    println!("{rows} rows per case; rows/s (ratio to no trigger)");
    println!("{:<28} {:>22} {:>22}", "", "100-row transactions", "single-row autocommit");
    for (name, (b, s)) in
        [("no trigger", none), ("row trigger (0005)", old), ("change log (0011, main)", new)]
    {
        println!(
            "{name:<28} {b:>12.0} ({:>5.1} %) {s:>12.0} ({:>5.1} %)",
            100.0 * b / none.0,
            100.0 * s / none.1
        );
    }
    bulk_update_after_one_row(&client, &conninfo, rows).await;
}

/// Times `update users set first_name = …` of all `rows` rows, capture on, in a fresh session
/// and in a session whose first update touched one row; prints the medians of three rounds.
async fn bulk_update_after_one_row(client: &tokio_postgres::Client, conninfo: &str, rows: i64) {
    bench::reset_users(client).await;
    client.batch_execute(bench::ENABLE_CAPTURE).await.expect("enable capture");
    client
        .execute(
            "insert into users (email, first_name) select 'u' || g || '@example.com', 'U' from generate_series(1, $1::int8) g",
            &[&rows],
        )
        .await
        .expect("rows");
    let mut fresh = Vec::new();
    let mut after_one = Vec::new();
    for round in 0..3 {
        for warm in [false, true] {
            let session = connect(conninfo).await;
            if warm {
                session
                    .batch_execute("update users set first_name = 'one' where id = 1")
                    .await
                    .expect("one row");
            }
            let started = std::time::Instant::now();
            session
                .execute("update users set first_name = $1 || id", &[&format!("r{round}{warm}")])
                .await
                .expect("bulk update");
            let took = started.elapsed().as_secs_f64() * 1000.0;
            if warm {
                after_one.push(took)
            } else {
                fresh.push(took)
            }
            client.batch_execute("truncate keap_sync.change").await.expect("empty the log");
        }
    }
    let median = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let (f, w) = (median(&mut fresh), median(&mut after_one));
    println!();
    println!("bulk UPDATE of {rows} rows, capture on (median of 3)");
    println!("{:<40} {f:>10.1} ms", "fresh session");
    println!("{:<40} {w:>10.1} ms ({:.2}x)", "after a one-row UPDATE in the session", w / f);
}
