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
}
