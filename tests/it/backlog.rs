//! A busy production database: changes locked by open application transactions, and backlogs
//! of hundreds of thousands of changes (a Keap outage, a backfill). The daemon must neither
//! spin on a row it cannot claim nor count the whole outbox to report its depth.

use std::time::Duration;

use keap_sync_testkit::app::{self, spawn_app_with, Options, TestApp};
use tokio_postgres::Client;

fn stopped() -> Options {
    Options { start_daemon: false, ..Options::default() }
}

/// Counts every UPDATE statement on the outbox (a claim is one, even when it claims nothing)
/// in an insert-only table, so the counting itself takes no lock a claim could wait on.
async fn count_outbox_updates(app: &TestApp) {
    app.exec(
        "create table public.outbox_updates (at timestamptz not null default clock_timestamp());
         create function public.count_outbox_update() returns trigger language plpgsql as $$
         begin
             insert into public.outbox_updates default values;
             return null;
         end $$;
         create trigger count_outbox_update after update on keap_sync.outbox
             for each statement execute function public.count_outbox_update();",
    )
    .await;
}

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

/// An application transaction that changed a queued user and stays open holds that user's
/// outbox row: the claim skips it (`skip locked`), and the row is due. The daemon must not
/// re-claim in a loop for as long as the transaction stays open, and once it commits, its
/// NOTIFY gets the change delivered at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_due_row_locked_by_an_open_transaction_does_not_make_the_daemon_spin() {
    let mut app = spawn_app_with(stopped()).await;
    app.exec("insert into users (email, first_name) values ('held@example.com', 'Held')").await;
    count_outbox_updates(&app).await;
    // The application's transaction: the trigger's upsert locks the queued row until commit.
    let held = app::connect(&app.conninfo).await;
    held.batch_execute("begin; update users set first_name = 'Held again' where email = 'held@example.com'")
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
