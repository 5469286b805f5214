//! Benchmark: what capture costs the application's inserts, on a throwaway PostgreSQL, after
//! `migrate`, daemon not running.
//!
//! ```sh
//! cargo bench --bench capture                 # 20,000 rows per case
//! cargo bench --bench capture -- --rows 5000
//! ```
//!
//! Inserts rows into `users` in 100-row statements (one transaction each) and in single-row
//! autocommit statements, three ways: no capture trigger, the capture triggers `migrate`
//! installs (per statement, since issue 12), and the row trigger of 0005 (`keap_sync.capture`,
//! installed here explicitly for comparison). Prints rows/s and the ratio to no trigger.

use std::time::Instant;

use keap_sync::config::Config;
use keap_sync_testkit::pg::Cluster;
use tokio_postgres::{Client, NoTls};

fn arg(name: &str, default: i64) -> i64 {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.replace('_', "").parse().ok())
        .unwrap_or(default)
}

async fn connect(conninfo: &str) -> Client {
    let (client, connection) = tokio_postgres::connect(conninfo, NoTls).await.expect("connect");
    tokio::spawn(connection);
    client
}

/// Empties users and the outbox without capturing it.
async fn reset(client: &Client) {
    client
        .batch_execute(
            "alter table users disable trigger user; truncate users; truncate keap_sync.outbox, keap_sync.outbox_count;",
        )
        .await
        .expect("reset");
}

/// rows/s for (100-row statements, single-row autocommit statements).
async fn measure(client: &Client, rows: i64, enable: &str) -> (f64, f64) {
    reset(client).await;
    client.batch_execute(enable).await.expect("enable");
    let started = Instant::now();
    for b in 0..rows / 100 {
        client
            .execute(
                "insert into users (email, first_name, last_name)
                 select 'b' || g || '@example.com', 'F' || g, 'L' || g from generate_series($1::bigint, $1::bigint + 99) g",
                &[&(b * 100)],
            )
            .await
            .expect("batch insert");
    }
    let batch = rows as f64 / started.elapsed().as_secs_f64();
    let insert = client
        .prepare("insert into users (email, first_name, last_name) values ($1, 'F', 'L')")
        .await
        .expect("prepare");
    let started = Instant::now();
    for i in 0..rows {
        client.execute(&insert, &[&format!("s{i}@example.com")]).await.expect("single insert");
    }
    let single = rows as f64 / started.elapsed().as_secs_f64();
    (batch, single)
}

#[tokio::main]
async fn main() {
    let rows = arg("--rows", 20_000);
    let cluster = tokio::task::spawn_blocking(Cluster::start).await.unwrap().expect("throwaway PostgreSQL");
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

    let none = measure(&client, rows, "").await;
    let new = measure(
        &client,
        rows,
        "alter table users enable always trigger keap_sync_capture, enable always trigger keap_sync_capture_update,
             enable always trigger keap_sync_capture_delete, enable always trigger keap_sync_capture_key,
             enable always trigger keap_sync_capture_truncate;",
    )
    .await;
    let old = measure(
        &client,
        rows,
        "alter table users enable always trigger keap_sync_capture_row_0005; alter table users enable always trigger keap_sync_capture_truncate;",
    )
    .await;
    println!("{rows} rows per case; rows/s (ratio to no trigger)");
    println!("{:<28} {:>22} {:>22}", "", "100-row transactions", "single-row autocommit");
    for (name, (b, s)) in
        [("no trigger", none), ("row trigger (0005, main)", old), ("statement triggers (new)", new)]
    {
        println!(
            "{name:<28} {b:>12.0} ({:>5.1} %) {s:>12.0} ({:>5.1} %)",
            100.0 * b / none.0,
            100.0 * s / none.1
        );
    }
}
