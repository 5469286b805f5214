//! PostgreSQL stopped and restarted under load, on a cluster of the test's own (the other tests
//! of the binary share theirs, which must not go down under them).

use std::time::Duration;

use keap_sync_testkit::app::{self, spawn_app_with, Options};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_daemon_rides_out_a_postgres_restart_under_load() {
    let mut app = spawn_app_with(Options { private_cluster: true, ..Options::default() }).await;
    app.fake.set_latency(Duration::from_millis(20));
    app.exec(
        "insert into users (email, first_name) select 'pg' || g || '@example.com', 'A' from generate_series(1, 500) g",
    )
    .await;
    app::eventually(Duration::from_secs(30), "deliveries under way", || async {
        app.contact_calls("PUT") >= 50
    })
    .await;

    let cluster = app.cluster();
    tokio::task::spawn_blocking(move || cluster.stop()).await.unwrap().expect("stop postgres");
    // Keap keeps answering while the database is gone; results that cannot be recorded are
    // redelivered later, safely.
    tokio::task::spawn_blocking(move || cluster.restart()).await.unwrap().expect("restart postgres");

    app.db = app::connect(&app.conninfo).await;
    app.exec("update users set first_name = 'B' where id % 3 = 0").await;
    app.exec(
        "insert into users (email, first_name) select 'late' || g || '@example.com', 'C' from generate_series(1, 100) g",
    )
    .await;
    app.wait_idle_for(Duration::from_secs(60)).await;
    app.assert_keap_matches_users().await;
    assert!(app.daemons_running(), "the daemon did not exit");
    app.stop_daemon().await;
}
