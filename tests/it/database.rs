//! A busy production database: app transactions holding row locks, statements that fail, a
//! session killed under the daemon. A stuck or failed statement costs that delivery, never the
//! others, and never loses a result (ARCHITECTURE.md, "Where concurrency lives").

use std::time::Duration;

use keap_sync_testkit::app::{self, eventually, spawn_app_with, Options, TestApp};
use keap_sync_testkit::fake::{FaultAction, FaultRule, Route};
use tokio_postgres::Client;

/// Test settings: a lock wait gives up after 1 s (the default is 5 s).
fn short_lock_timeout() -> Options {
    Options {
        tweak: |c| {
            if let Some(db) = c.database.as_mut() {
                db.lock_timeout = Duration::from_secs(1);
            }
        },
        ..Options::default()
    }
}

async fn contact_of(app: &TestApp, user: i64) -> i64 {
    app.db
        .query_one("select contact_id from keap_sync.contact_map where user_key = $1", &[&user.to_string()])
        .await
        .expect("mapped")
        .get(0)
}

fn patches_to(app: &TestApp, contact: i64) -> usize {
    let path = format!("/crm/rest/v1/contacts/{contact}");
    app.fake.count(|r| r.method == "PATCH" && r.path == path)
}

async fn pending(app: &TestApp, user: i64) -> bool {
    app.count(&format!("select count(*) from keap_sync.outbox where user_key = '{user}'")).await > 0
}

/// An app transaction that locks `user`'s mapping row and stays open until rolled back.
async fn lock_mapping(app: &TestApp, user: i64) -> Client {
    let locker = app::connect(&app.conninfo).await;
    locker
        .batch_execute(&format!(
            "begin; select * from keap_sync.contact_map where user_key = '{user}' for update"
        ))
        .await
        .expect("lock the mapping row");
    locker
}

/// The daemon's failed transactions in this database so far (a lock or statement timeout
/// rolls back): how hard it hammers a locked row.
async fn rollbacks(app: &TestApp) -> i64 {
    app.db.query_one("select pg_stat_clear_snapshot()", &[]).await.expect("fresh statistics");
    app.count("select xact_rollback from pg_stat_database where datname = current_database()").await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_row_lock_held_by_an_app_transaction_holds_up_that_user_alone() {
    let app = spawn_app_with(short_lock_timeout()).await;
    app.insert_users(4).await;
    app.wait_idle().await;
    let locked = contact_of(&app, 1).await;

    // An idle-in-transaction app session holds user 1's mapping row for 15 s.
    let locker = lock_mapping(&app, 1).await;
    let held_until = tokio::time::Instant::now() + Duration::from_secs(15);
    let rollbacks_before = rollbacks(&app).await;
    app.exec("update users set first_name = 'Locked' where id = 1").await;
    eventually(Duration::from_secs(5), "the locked user's PATCH", || async { patches_to(&app, locked) >= 1 })
        .await;

    // Its completion waits on the lock; the others flow meanwhile.
    app.exec("update users set first_name = 'Free' where id in (2, 3, 4)").await;
    eventually(Duration::from_secs(8), "users 2-4 delivered while user 1's row is locked", || async {
        !pending(&app, 2).await && !pending(&app, 3).await && !pending(&app, 4).await
    })
    .await;
    assert!(tokio::time::Instant::now() < held_until, "the lock was held all along");
    assert!(pending(&app, 1).await, "user 1 cannot be recorded while its row is locked");

    // The lock lasts its 15 s: the daemon backs off rather than hammering the row.
    tokio::time::sleep_until(held_until).await;
    let failed = rollbacks(&app).await - rollbacks_before;
    let repeated = patches_to(&app, locked);
    eprintln!("15 s of lock: {failed} failed statements, {repeated} PATCHes of the locked contact");
    assert!(failed <= 20, "{failed} failed statements in 15 s: the daemon busy-loops on the locked row");
    assert!(repeated <= 3, "{repeated} PATCHes of the locked contact in 15 s");

    locker.batch_execute("rollback").await.expect("release the lock");
    app.wait_idle_for(Duration::from_secs(15)).await;
    assert_eq!(app.fake.contact(locked).expect("contact").given_name.as_deref(), Some("Locked"));
    app.assert_keap_matches_users().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_completion_that_times_out_is_retried_for_that_delivery_alone() {
    let app = spawn_app_with(short_lock_timeout()).await;
    app.insert_users(2).await;
    app.wait_idle().await;
    let (first, second) = (contact_of(&app, 1).await, contact_of(&app, 2).await);

    let locker = lock_mapping(&app, 1).await;
    // User 2's call is in flight (Keap takes 2 s to answer it) while user 1's completion hits
    // the lock timeout.
    app.fake.inject(FaultRule::new(Route::Contacts, FaultAction::Delay(Duration::from_secs(2))).times(1));
    app.exec("update users set first_name = 'InFlight' where id = 2").await;
    eventually(Duration::from_secs(5), "user 2's PATCH in flight", || async {
        patches_to(&app, second) == 1
    })
    .await;
    app.exec("update users set first_name = 'Waited' where id = 1").await;
    eventually(Duration::from_secs(5), "user 1's PATCH", || async { patches_to(&app, first) == 1 }).await;
    // The completion's wait, not the fold's: the fold waits up to 100 ms for user 1's outbox
    // row, which the waiting completion holds, then leaves that user's change in the log.
    let waiting = "select count(*) from pg_locks l join pg_stat_activity a using (pid)
                    where not l.granted and a.application_name = 'keap-sync'
                      and a.datname = current_database()
                      and a.query not like '%fold_changes%'";
    eventually(Duration::from_secs(5), "the completion waiting on the lock", || async {
        app.count(waiting).await > 0
    })
    .await;
    eventually(Duration::from_secs(5), "the lock wait to time out", || async {
        app.count(waiting).await == 0
    })
    .await;
    locker.batch_execute("rollback").await.expect("release the lock");

    app.wait_idle_for(Duration::from_secs(15)).await;
    assert_eq!(patches_to(&app, first), 1, "user 1's result was thrown away and the call repeated");
    assert_eq!(patches_to(&app, second), 1, "user 2's call in flight was aborted and repeated");
    assert_eq!(app.fake.contact(first).expect("contact").given_name.as_deref(), Some("Waited"));
    app.assert_keap_matches_users().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_killed_mid_call_loses_and_duplicates_nothing() {
    let app = spawn_app_with(Options::default()).await;
    // Keap answers slowly, so calls are in flight when the session is killed.
    app.fake.set_latency(Duration::from_millis(700));
    app.insert_users(6).await;
    eventually(Duration::from_secs(5), "calls in flight", || async { app.contact_calls("GET") >= 2 }).await;
    let killed = app
        .count(
            "select count(pg_terminate_backend(pid)) from pg_stat_activity
              where application_name = 'keap-sync' and datname = current_database()
                and pid <> pg_backend_pid()",
        )
        .await;
    assert!(killed >= 2, "the daemon's connections were killed ({killed})");
    app.exec("update users set last_name = 'After' where id = 1").await;

    app.wait_idle_for(Duration::from_secs(25)).await;
    assert_eq!(app.fake.contacts().len(), 6, "one contact per user, none lost or doubled");
    app.assert_keap_matches_users().await;
    let reconnected = app
        .count(
            "select count(*) from pg_stat_activity
              where application_name = 'keap-sync' and datname = current_database()",
        )
        .await;
    assert!(reconnected >= 2, "the daemon reconnected ({reconnected} connections)");
}

fn sixteen_in_flight() -> Options {
    Options { tweak: |c| c.delivery.concurrency = 16, ..Options::default() }
}

/// Deliveries whose calls end together are recorded together: one statement for the results
/// that arrive while the previous one runs, not one each (a statement per delivery was the
/// largest share of the database's work in a drain).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn results_that_arrive_together_are_recorded_in_one_statement() {
    let app = spawn_app_with(sixteen_in_flight()).await;
    app.insert_users(64).await;
    app.wait_idle().await;
    // Each statement that records successes runs one DELETE on the outbox (even when it
    // deletes nothing).
    crate::count_statements(&app, "outbox_deletes", "delete", "keap_sync.outbox").await;
    // Sixteen calls at a time, each answered 50 ms after it was sent: their results arrive
    // within a moment of each other.
    app.fake.set_latency(Duration::from_millis(50));
    app.exec("update users set first_name = first_name || ' again'").await;
    app.wait_idle_for(Duration::from_secs(20)).await;
    let patches = app.contact_calls("PATCH");
    let statements = app.count("select count(*) from public.outbox_deletes").await;
    assert_eq!(patches, 64, "one PATCH per user");
    eprintln!("{statements} statements recorded {patches} deliveries");
    assert!(
        statements <= 32,
        "{statements} statements recorded {patches} deliveries that ended sixteen at a time"
    );
    app.assert_keap_matches_users().await;
}

/// A new user's delivery records three steps: the create before it is sent, the link once Keap
/// answers, and the success. Deliveries that reach a step together share its statement.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn new_users_created_together_are_linked_and_recorded_in_shared_statements() {
    let app = spawn_app_with(Options { start_daemon: false, ..sixteen_in_flight() }).await;
    // A completion runs one DELETE on the outbox (even when it deletes nothing), and a link
    // and a completion one INSERT each on the contact map.
    crate::count_statements(&app, "outbox_deletes", "delete", "keap_sync.outbox").await;
    crate::count_statements(&app, "mapping_inserts", "insert", "keap_sync.contact_map").await;
    app.fake.set_latency(Duration::from_millis(50));
    app.insert_users(64).await;
    let mut app = app;
    app.start_daemon().await;
    app.wait_idle_for(Duration::from_secs(30)).await;
    assert_eq!(app.contact_calls("PUT"), 64, "one create per user");
    let inserts = app.count("select count(*) from public.mapping_inserts").await;
    let completions = app.count("select count(*) from public.outbox_deletes").await;
    eprintln!("{inserts} contact-map statements ({completions} of them completions) for 64 new users");
    assert!(
        inserts - completions <= 32,
        "{} link statements for 64 new users created sixteen at a time",
        inserts - completions
    );
    app.assert_keap_matches_users().await;
}

/// A statement recording several results that fails on one of them (here a lock timeout on
/// a user's mapping row) costs the others nothing: each is recorded alone, and only the locked
/// users wait for their locks. Two users are locked, so that whatever order the results
/// arrive in, one of the locked ones is in a batch with others.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_locked_row_in_a_batch_of_results_holds_up_that_user_alone() {
    let app = spawn_app_with(Options {
        tweak: |c| {
            c.delivery.concurrency = 16;
            if let Some(db) = c.database.as_mut() {
                db.lock_timeout = Duration::from_secs(1);
            }
        },
        ..Options::default()
    })
    .await;
    app.insert_users(16).await;
    app.wait_idle().await;
    let lockers = [lock_mapping(&app, 1).await, lock_mapping(&app, 2).await];
    app.fake.set_latency(Duration::from_millis(50));
    app.exec("update users set first_name = first_name || ' again'").await;
    eventually(Duration::from_secs(8), "users 3-16 recorded while users 1 and 2 are locked", || async {
        app.contact_calls("PATCH") >= 16
            && app
                .count(
                    "select count(*) from (select user_key from keap_sync.outbox
                                            union all select user_key from keap_sync.change) p
                      where user_key not in ('1', '2')",
                )
                .await
                == 0
    })
    .await;
    assert!(pending(&app, 1).await && pending(&app, 2).await, "a locked user cannot be recorded");
    assert!(
        app::captured_logs().contains("recording a batch failed; recording each alone"),
        "a batch with a locked user failed and its results were recorded alone"
    );
    for locker in lockers {
        locker.batch_execute("rollback").await.expect("release the lock");
    }
    app.wait_idle_for(Duration::from_secs(15)).await;
    for user in 3..=16 {
        let contact = contact_of(&app, user).await;
        assert_eq!(
            patches_to(&app, contact),
            1,
            "user {user}'s result was thrown away and its call repeated"
        );
    }
    app.assert_keap_matches_users().await;
}

/// The daemon's pids in this test's database, sorted.
async fn daemon_pids(app: &TestApp) -> Vec<i32> {
    app.db
        .query(
            "select pid from pg_stat_activity
              where application_name = 'keap-sync' and datname = current_database() order by pid",
            &[],
        )
        .await
        .expect("pg_stat_activity")
        .iter()
        .map(|r| r.get(0))
        .collect()
}

/// `idle_session_timeout` (PostgreSQL 14 and later), set for the database or the role, ends a
/// session that waits for a command longer than it. The connection that holds the delivery lock
/// and LISTENs is idle by design: it was ended over and over, and the daemon restarted its
/// session each time (leadership flapped with a standby). Every connection of the daemon now
/// turns the timeout off for itself.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_session_timeout_does_not_end_the_daemons_sessions() {
    let mut app = spawn_app_with(Options::stopped()).await;
    app.exec("do $$ begin execute format('alter database %I set idle_session_timeout = 300', current_database()); end $$")
        .await;
    app.start_daemon().await;
    app.exec("insert into users (email) values ('idle@example.com')").await;
    app.wait_idle().await;
    let pids = daemon_pids(&app).await;
    assert!(!pids.is_empty(), "the daemon is connected");
    // Watch the idle daemon for ten times the timeout: a session ended by it is gone at once.
    let until = tokio::time::Instant::now() + Duration::from_secs(3);
    while tokio::time::Instant::now() < until {
        let now = daemon_pids(&app).await;
        for pid in &pids {
            assert!(
                now.contains(pid),
                "session {pid} of the daemon ended while idle: {pids:?} became {now:?}"
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    app.exec("update users set first_name = 'Still' where email = 'idle@example.com'").await;
    app.wait_idle().await;
    assert_eq!(app.fake.contacts()[0].given_name.as_deref(), Some("Still"));
}

/// An instance whose database sessions this one cannot see is not necessarily dead: across a
/// database fail-over, or under a role whose sessions are hidden, it may still have a call on
/// the wire. Its claims used to be released at the lock holder's next heartbeat, so a second
/// call for the same user could go out beside the first. They are now released once its
/// heartbeat is older than the longest a delivery's calls can take (or at once when its process
/// is certainly gone from this host, which `faults::` covers).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_instance_elsewhere_keeps_its_claims_until_it_cannot_be_calling() {
    let mut app = spawn_app_with(Options::stopped()).await;
    app.exec("insert into users (email) values ('claimed@example.com')").await;
    app.fold().await;
    let ghost = "elsewhere:1:ghost";
    app.exec(&format!(
        "insert into keap_sync.instances (instance, host, pid, role, backend_pid, backend_start)
             values ('{ghost}', 'elsewhere', 1, 'standby', 2147483000, now());
         update keap_sync.outbox set leased_by = '{ghost}', lease_until = now() + interval '10 minutes', attempts = 1"
    ))
    .await;
    let started: String = app.db.query_one("select now()::text", &[]).await.unwrap().get(0);
    app.start_daemon().await;
    // Two heartbeats of ours (every 5 s): a release would have come at the first.
    eventually(Duration::from_secs(20), "two heartbeats of the daemon", || async {
        app.count(&format!(
            "select count(*) from keap_sync.instances
              where instance <> '{ghost}' and last_seen > '{started}'::timestamptz + interval '5.5 s'"
        ))
        .await
            == 1
    })
    .await;
    assert_eq!(
        app.count(&format!("select count(*) from keap_sync.outbox where leased_by = '{ghost}'")).await,
        1,
        "the claim of an instance that may still be calling was released"
    );
    assert_eq!(app.contact_calls("PUT"), 0, "no second call went out");
    // Silent for longer than any call can take: released, and the user is delivered.
    app.exec(&format!(
        "update keap_sync.instances set last_seen = now() - interval '1 hour' where instance = '{ghost}'"
    ))
    .await;
    eventually(Duration::from_secs(20), "the claim released and the user delivered", || async {
        app.fake.contacts().len() == 1
    })
    .await;
}

/// Outbox rows the backend `pid` holds locks on, as `pgrowlocks` reads them.
async fn rows_locked_by(app: &TestApp, pid: i32) -> i64 {
    app.count(&format!("select count(*) from pgrowlocks('keap_sync.outbox') r where {pid} = any (r.pids)"))
        .await
}

/// A backend of the daemon that has been waiting for a lock for over 100 ms, if any.
async fn daemon_waiting_long(app: &TestApp) -> Option<i32> {
    app.db
        .query_opt(
            "select pid from pg_stat_activity
              where application_name = 'keap-sync' and datname = current_database() and wait_event_type = 'Lock'
                and clock_timestamp() - query_start > interval '100 ms'
              limit 1",
            &[],
        )
        .await
        .expect("pg_stat_activity")
        .map(|r| r.get(0))
}

/// The recorder's batch statement took its users' outbox rows in the order the results
/// arrived, and waited for one an application's transaction held while holding the others:
/// with a multi-row key change or a TRUNCATE (which take outbox rows in key order) that is a
/// deadlock, and PostgreSQL may end it by aborting the application's transaction. A batch now
/// waits 1 ms at most (far below `deadlock_timeout`) and then records each step alone, so
/// whenever the daemon is seen waiting for an outbox row it holds no other.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_daemon_never_waits_for_an_outbox_row_while_holding_another() {
    let app = spawn_app_with(Options {
        tweak: |c| {
            c.delivery.concurrency = 16;
            if let Some(db) = c.database.as_mut() {
                db.lock_timeout = Duration::from_secs(2);
            }
        },
        ..Options::default()
    })
    .await;
    app.exec("create extension pgrowlocks").await;
    app.insert_users(16).await;
    app.wait_idle().await;
    app.fake.set_latency(Duration::from_millis(700));
    app.exec("update users set first_name = 'Again'").await;
    // While the calls are on the wire, an application transaction takes user 9's outbox row.
    eventually(Duration::from_secs(10), "user 9 claimed", || async {
        app.count("select count(*) from keap_sync.outbox where user_key = '9' and leased_by is not null")
            .await
            == 1
    })
    .await;
    let holder = app::connect(&app.conninfo).await;
    holder
        .batch_execute("begin; select from keap_sync.outbox where user_key = '9' for update")
        .await
        .expect("hold user 9's outbox row");
    // A batch gives up after 1 ms; a wait this long is a statement that may wait (one step
    // alone, or before the fix, the batch). The connection runs one statement at a time, so
    // whatever that backend holds now, it held while waiting.
    eventually(Duration::from_secs(10), "the daemon waiting for user 9's row", || async {
        daemon_waiting_long(&app).await.is_some()
    })
    .await;
    let waiting = daemon_waiting_long(&app).await.expect("still waiting: its lock_timeout is 2 s");
    let held = rows_locked_by(&app, waiting).await;
    holder.batch_execute("rollback").await.expect("release");
    assert_eq!(held, 0, "the daemon held {held} outbox rows while it waited for user 9's");
    app.wait_idle().await;
    app.assert_keap_matches_users().await;
}

/// A bookkeeping statement that fails every try gives up with an error-level log line naming
/// the user, and the change is delivered again after its lease (README, "Postgres faults").
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bookkeeping_statement_that_gives_up_logs_an_error_naming_the_user() {
    let app = spawn_app_with(short_lock_timeout()).await;
    // A key no other test uses, so this test's line is told apart in the process's log.
    let user = 7_310_031_i64;
    app.exec(&format!("insert into users (id, email) values ({user}, 'gives-up@example.com')")).await;
    app.wait_idle().await;
    let locked = contact_of(&app, user).await;

    // The completion's statement waits 1 s on the lock each try; four tries and it gives up.
    let locker = lock_mapping(&app, user).await;
    app.exec(&format!("update users set first_name = 'GaveUp' where id = {user}")).await;
    let wanted = |l: &&str| l.contains("ERROR") && l.contains(&format!("user={user}"));
    eventually(Duration::from_secs(20), "an error-level line naming the user", || async {
        app::captured_logs().lines().any(|l| wanted(&l))
    })
    .await;
    let logs = app::captured_logs();
    let line = logs.lines().find(wanted).expect("the line");
    assert!(line.contains("could not record a delivery result after retrying"), "{line}");
    let tries = logs
        .lines()
        .filter(|l| {
            l.contains("WARN") && l.contains(&format!("user={user}")) && l.contains("trying it again")
        })
        .count();
    assert!(tries >= 1, "the statement was tried again before it gave up");

    // Nothing is lost: once the lock is gone the change is delivered again.
    locker.batch_execute("rollback").await.expect("release the lock");
    app.wait_idle_for(Duration::from_secs(30)).await;
    assert_eq!(app.fake.contact(locked).expect("contact").given_name.as_deref(), Some("GaveUp"));
}
