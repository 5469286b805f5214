//! A busy production database: changes locked by open application transactions, and backlogs
//! of hundreds of thousands of changes (a Keap outage, a backfill). The daemon must neither
//! spin on a row it cannot claim nor count the whole outbox to report its depth.

use std::time::Duration;

use keap_sync_testkit::app::{self, spawn_app_with, Options, TestApp};
use tokio_postgres::Client;

async fn outbox_updates(app: &TestApp) -> i64 {
    app.count("select count(*) from public.outbox_updates").await
}

async fn commits(db: &Client) -> i64 {
    db.query_one(
        "select pg_stat_clear_snapshot()::text, xact_commit from pg_stat_database where datname = current_database()",
        &[],
    )
    .await
    .expect("pg_stat_database")
    .get(1)
}

/// An application transaction that changed a queued user's key and stays open holds that
/// user's outbox row (the key-change trigger enqueues the old key as gone there, invariant 13):
/// the claim skips it (`skip locked`), and the row is due. The daemon must not re-claim in a
/// loop for as long as the transaction stays open, and once it commits, its NOTIFY gets the
/// change delivered at once. (Other changes are captured in the change log and lock no outbox
/// row; the fold does not wait for this one either: `tests/it/capture.rs`.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_due_row_locked_by_an_open_transaction_does_not_make_the_daemon_spin() {
    let mut app = spawn_app_with(Options::stopped()).await;
    app.exec("insert into users (id, email, first_name) values (1, 'held@example.com', 'Held')").await;
    app.fold().await;
    // A claim is one UPDATE statement, even when it claims nothing.
    crate::count_statements(&app, "outbox_updates", "update", "keap_sync.outbox").await;
    // The application's transaction: the key-change trigger locks the queued row until commit.
    let held = app::connect(&app.conninfo).await;
    held.batch_execute("begin; update users set id = 2, first_name = 'Held again' where id = 1")
        .await
        .expect("open transaction");
    app.start_daemon().await;
    app::eventually(Duration::from_secs(10), "the daemon's first heartbeat", || async {
        app.count("select count(*) from keap_sync.instances").await > 0
    })
    .await;
    let (updates_before, commits_before) = (outbox_updates(&app).await, commits(&app.db).await);
    // A measurement window, not a synchronisation: how often the daemon claims while the row
    // stays locked (before the fix it re-claimed every 5 ms).
    let window = Duration::from_secs(10);
    tokio::time::sleep(window).await;
    let claims = outbox_updates(&app).await - updates_before;
    let xacts = commits(&app.db).await - commits_before;
    // The test poll interval is 500 ms: ~20 claims in 10 s; allow for start-up and jitter.
    assert!(
        claims <= 40,
        "the daemon ran {claims} claim statements in {window:?} while one due row was locked by an open \
         transaction ({xacts} transactions committed in the database meanwhile): it spins instead of waiting"
    );
    assert_eq!(app.contact_calls("PUT"), 0, "nothing was claimable");
    held.batch_execute("commit").await.expect("commit");
    app.wait_idle_for(Duration::from_secs(5)).await;
    app.assert_keap_matches_users().await;
    app.stop_daemon().await;
}

/// Tuples the outbox's scans have read so far (sequential and index), once every other
/// connection to the database has closed: a backend flushes its statistics when it exits. This
/// connection reads nothing from the outbox meanwhile.
async fn outbox_tuples_read(app: &TestApp) -> i64 {
    app::eventually(Duration::from_secs(10), "the other connections to close", || async {
        app.count(
            "select count(*) from pg_stat_activity
              where datname = current_database() and pid <> pg_backend_pid()",
        )
        .await
            == 0
    })
    .await;
    app.count(
        "select coalesce(t.seq_tup_read, 0)
                + (select coalesce(sum(i.idx_tup_read), 0)::int8 from pg_stat_user_indexes i where i.relid = t.relid)
           from pg_stat_user_tables t where t.relid = 'keap_sync.outbox'::regclass",
    )
    .await
}

/// `status` (and the daemon's heartbeat, the systemd STATUS line, the metrics, backfill
/// progress) report the queue's depth by kind without counting the outbox, and the figures are
/// exact after inserts, upserts, kind changes, parking, deletes and a backfill-sized insert.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_reports_a_200000_row_backlog_exactly_without_reading_it() {
    let app = spawn_app_with(Options::stopped()).await;
    {
        // On a connection of its own, closed before the measurement.
        let setup = app::connect(&app.conninfo).await;
        setup
            .batch_execute(
                "alter table keap_sync.outbox set (autovacuum_enabled = false);
                 insert into keap_sync.outbox (user_key, priority, next_attempt_at)
                 select 'b' || g, 2, now() + interval '1 day' from generate_series(1, 200000) g;
                 update keap_sync.outbox set priority = 1 where user_key in (select 'b' || g from generate_series(1, 300) g);
                 update keap_sync.outbox set parked_at = now() where user_key in (select 'b' || g from generate_series(250, 400) g);
                 update keap_sync.outbox set version = version + 1 where user_key in (select 'b' || g from generate_series(1, 1000) g);
                 delete from keap_sync.outbox where user_key in (select 'b' || g from generate_series(1000, 1999) g);
                 insert into users (email) select 'live' || g || '@example.com' from generate_series(1, 20) g;
                 select * from keap_sync.fold_changes(1000);
                 update users set first_name = 'again' where email like 'live1%';
                 update keap_sync.outbox set parked_at = null where user_key = 'b300';",
            )
            .await
            .expect("set-up");
    }
    let before = outbox_tuples_read(&app).await;
    let out = app.run_cli(&["status", "--json"]);
    assert!(out.status.success(), "status failed: {}", String::from_utf8_lossy(&out.stderr));
    let read = outbox_tuples_read(&app).await - before;
    let status: serde_json::Value = serde_json::from_slice(&out.stdout).expect("status JSON");
    let truth = |kind: &str| format!("select count(*) from keap_sync.outbox where {kind}");
    let want = [
        ("live", app.count(&truth("parked_at is null and priority = 0")).await),
        ("retry", app.count(&truth("parked_at is null and priority = 1")).await),
        ("backfill", app.count(&truth("parked_at is null and priority = 2")).await),
        ("parked", app.count(&truth("parked_at is not null")).await),
    ];
    for (kind, n) in want {
        assert!(n > 0, "the set-up leaves some {kind} changes");
        assert_eq!(status["outbox"][kind].as_i64(), Some(n), "{kind} in {}", status["outbox"]);
    }
    // The update after the fold is still in the change log: live1 and live10..live19.
    assert_eq!(status["outbox"]["captured"].as_i64(), Some(11), "captured in {}", status["outbox"]);
    assert!(status["oldest_pending_age_secs"].as_f64().is_some(), "oldest pending age: {status}");
    // Not zero: the oldest pending change is the first live entry of an index, and the scan
    // steps over the ~2,000 entries the set-up's deletes and kind changes left dead (autovacuum
    // is off here). That depends on the churn since the last vacuum, not on the backlog.
    assert!(
        read < 5_000,
        "`keap-sync status` read {read} outbox tuples to report the depth of a 200,000-row outbox; \
         it must not scan it"
    );
}
