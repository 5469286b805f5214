//! keap-sync's integration tests: one binary (so the crate is linked once), one throwaway
//! PostgreSQL cluster per run (started on first use by the test kit), a fresh database and a
//! fresh fake Keap per test, and the real daemon — in-process, or as a child process where a
//! test must SIGKILL it.
//!
//! Each module is an area; run one with `cargo test --test it sync::` (or any name filter).
//! Tests never sleep to synchronise: they wait for a condition with a deadline.

#![allow(
    clippy::disallowed_methods,
    reason = "tests, benches and the demo own the servers and daemons they spawn, which end with them"
)]
mod architecture;
mod backlog;
mod capture;
mod capture_shapes;
mod cli;
mod consent;
mod contacts;
mod database;
mod doctor;
mod faults;
mod gone;
mod hooks;
mod inbound;
mod inbound_tags;
mod init;
mod limits;
mod mapping;
mod mirror;
mod ops;
mod owned;
mod pg_restart;
mod promises;
mod refusals;
mod shared;
mod sync;
mod tls;
mod tokens;
mod transport;

/// Waits until nothing is waiting for delivery: every change delivered or parked.
pub async fn wait_settled(app: &keap_sync_testkit::app::TestApp) {
    keap_sync_testkit::app::eventually(
        std::time::Duration::from_secs(60),
        "every change delivered or parked",
        || async {
            app.count(
                "select (select count(*) from keap_sync.outbox where parked_at is null)
                  + (select count(*) from keap_sync.change)",
            )
            .await
                == 0
        },
    )
    .await;
}

/// The writes (not reads, not the token endpoint) the fake recorded from request `from` on.
pub fn writes_since(
    app: &keap_sync_testkit::app::TestApp,
    from: usize,
) -> Vec<keap_sync_testkit::fake::RecordedRequest> {
    app.fake
        .requests()
        .into_iter()
        .skip(from)
        .filter(|r| r.method != "GET" && !r.path.ends_with("/token"))
        .collect()
}

/// Waits until the contact `user_key` is linked to is in the mirror.
pub async fn wait_mirrored(app: &keap_sync_testkit::app::TestApp, user_key: &str) {
    keap_sync_testkit::app::eventually(
        std::time::Duration::from_secs(20),
        "the user's contact in the mirror",
        || async {
            app.db
                .query_one(
                    "select count(*) from keap_sync.mirror m join keap_sync.contact_map c using (contact_id)
                  where c.user_key = $1",
                    &[&user_key],
                )
                .await
                .map(|r| r.get::<_, i64>(0) == 1)
                .unwrap_or(false)
        },
    )
    .await;
}

/// Nothing captured, queued or waiting to go to Keap.
pub async fn nothing_outbound(app: &keap_sync_testkit::app::TestApp) -> i64 {
    app.count("select (select count(*) from keap_sync.change) + (select count(*) from keap_sync.outbox)")
        .await
}

/// A port of 127.0.0.1 that was free a moment ago.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// Applies, in order, every migration in `sql/` that sorts before the one whose name ends in
/// `suffix`, then runs `between`, then that migration.
pub async fn migrate_up_to(db: &tokio_postgres::Client, suffix: &str, between: &str) {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("sql");
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|n| n.ends_with(".sql") && n.as_bytes()[0].is_ascii_digit())
        .collect();
    files.sort();
    let target = files.iter().position(|n| n.ends_with(suffix)).expect("the migration exists");
    db.batch_execute("create schema keap_sync").await.unwrap();
    for name in &files[..target] {
        db.batch_execute(&std::fs::read_to_string(dir.join(name)).unwrap()).await.unwrap();
    }
    db.batch_execute(between).await.unwrap();
    db.batch_execute(&std::fs::read_to_string(dir.join(&files[target])).unwrap()).await.unwrap();
}

/// Counts the `event` statements (`insert`, `update`, `delete`) on `table` in `public.<counter>`
/// (read with `select count(*)`): a statement-level trigger appends a row to an insert-only
/// table, so the counting takes no lock a counted statement could wait on.
pub async fn count_statements(
    app: &keap_sync_testkit::app::TestApp,
    counter: &str,
    event: &str,
    table: &str,
) {
    app.exec(&format!(
        "create table public.{counter} (at timestamptz not null default clock_timestamp());
         create function public.{counter}_count() returns trigger language plpgsql as $$
         begin
             insert into public.{counter} default values;
             return null;
         end $$;
         create trigger {counter}_count after {event} on {table}
             for each statement execute function public.{counter}_count();"
    ))
    .await;
}

/// Why user `key` is parked (`outbox.last_error`); `None` when it is not parked.
pub async fn parked_reason(app: &keap_sync_testkit::app::TestApp, key: &str) -> Option<String> {
    app.db
        .query_opt(
            "select last_error from keap_sync.outbox where user_key = $1 and parked_at is not null",
            &[&key],
        )
        .await
        .expect("outbox")
        .and_then(|r| r.get(0))
}

/// The first column of every row `sql` returns, as text.
pub async fn texts(app: &keap_sync_testkit::app::TestApp, sql: &str) -> Vec<String> {
    app.db.query(sql, &[]).await.unwrap().iter().map(|r| r.get(0)).collect()
}
