//! Capture in the shapes of Postgres users have: sessions that a pool reuses, key columns of
//! types outside `pg_catalog`, and key types whose text form depends on the session.

use std::time::Duration;

use keap_sync_testkit::app::{self, spawn_app_with, Options};

use crate::capture::fold_on_own_connection;

/// PL/pgSQL keeps the plan of the update trigger's join of the transition tables from its first
/// call in a session. Planned for one row, it was a nested loop, and a 20,000-row update in the
/// same session then compared every old row with every new one: 13 s instead of 0.1 s, holding
/// the application's row locks. A pool makes "a one-row update first" the normal case.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bulk_update_after_a_one_row_update_in_the_same_session_stays_linear() {
    let app = spawn_app_with(Options::stopped()).await;
    app.exec("insert into users (email) select 'b' || g || '@example.com' from generate_series(1, 20000) g")
        .await;
    let pooled = app::connect(&app.conninfo).await;
    pooled.batch_execute("update users set first_name = 'One' where id = 1").await.expect("one-row update");
    // Linear, this takes about 0.1 s even on a loaded machine; the nested loop took 13 s.
    pooled
        .batch_execute("set statement_timeout = '5s'; update users set first_name = 'Everyone'")
        .await
        .unwrap_or_else(|e| {
            panic!(
                "the bulk update after a one-row update in the same session: {:?}",
                e.as_db_error().map(|d| d.message())
            )
        });
    assert_eq!(app.count("select count(*) from keap_sync.change").await, 20_000 + 20_000 + 1);
}

/// A key column whose type lives outside `pg_catalog` (an extension's type, a domain) must be
/// folded and delivered: the generated SQL used to name the type unqualified under the fold's
/// pinned `search_path`, so every fold failed and changes piled up in the log.
async fn a_key_of_a_type_outside_pg_catalog_is_folded_and_delivered(ddl: &'static str, keys: &[&str]) {
    let app = spawn_app_with(Options { users_ddl: ddl, ..Options::default() }).await;
    let values: Vec<String> =
        keys.iter().map(|k| format!("('{k}', '{}@example.com')", k.to_lowercase())).collect();
    app.exec(&format!("insert into users (id, email) values {}", values.join(", "))).await;
    app::eventually(Duration::from_secs(20), "every user delivered", || async {
        app.fake.contacts().len() == keys.len()
            && app.count("select count(*) from keap_sync.change").await == 0
    })
    .await;
    app.wait_idle().await;
    app.exec(&format!("update users set first_name = 'Again' where id = '{}'", keys[0])).await;
    app::eventually(Duration::from_secs(20), "the update delivered", || async {
        app.fake.contacts().iter().any(|c| c.given_name.as_deref() == Some("Again"))
    })
    .await;
    let mut emails: Vec<String> =
        app.fake.contacts().iter().filter_map(|c| c.email1().map(str::to_owned)).collect();
    emails.sort();
    let mut want: Vec<String> = keys.iter().map(|k| format!("{}@example.com", k.to_lowercase())).collect();
    want.sort();
    assert_eq!(emails, want, "one contact per user");
    assert_eq!(app.count("select count(*) from keap_sync.contact_map").await, keys.len() as i64);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_citext_key_is_folded_and_delivered() {
    a_key_of_a_type_outside_pg_catalog_is_folded_and_delivered(
        "create extension citext;
         create table public.users (id public.citext primary key, email text, first_name text,
                                    last_name text, plan text not null default 'free')",
        &["Ann", "bob"],
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_of_a_domain_is_folded_and_delivered() {
    a_key_of_a_type_outside_pg_catalog_is_folded_and_delivered(
        "create domain public.user_ref as text check (value <> '');
         create table public.users (id public.user_ref primary key, email text, first_name text,
                                    last_name text, plan text not null default 'free')",
        &["u-1", "u-2"],
    )
    .await;
}

/// A key's text form is what the change log and the outbox hold, and the daemon reads the row
/// back by it. Dates, times, intervals, money and floats print differently under another
/// `DateStyle`, `IntervalStyle`, `TimeZone`, `lc_monetary` or `extra_float_digits`, so the
/// daemon might never find the row: `migrate` refuses them, naming the column, its type and the
/// way out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migrate_refuses_a_key_whose_text_depends_on_the_session() {
    let app = spawn_app_with(Options::stopped()).await;
    for ty in [
        "date",
        "timestamp with time zone",
        "timestamp without time zone",
        "interval",
        "money",
        "double precision",
        "real",
        "time without time zone",
    ] {
        let table = format!("users_by_{}", ty.replace(' ', "_"));
        app.exec(&format!("create domain public.{table}_key as {ty}; create table public.{table} (k public.{table}_key primary key, email text)"))
            .await;
        let mut config = app.config();
        config.users.table = table.clone();
        config.users.key = "k".into();
        let mut client = app::connect(&app.conninfo).await;
        let err = keap_sync::migrate(&mut client, &config.users)
            .await
            .expect_err(&format!("migrate accepted a {ty} key"))
            .to_string();
        assert!(
            err.contains("users.key")
                && err.contains("column k ")
                && err.contains(ty)
                && err.contains("text"),
            "the refusal names the key, the column, the type and the way out: {err}"
        );
    }
    // The types that do round-trip are accepted.
    for ty in ["integer", "bigint", "smallint", "numeric", "uuid", "text", "character varying(40)"] {
        let table = format!("users_ok_{}", ty.split(&[' ', '('][..]).next().unwrap());
        app.exec(&format!(
            "create table public.{table} (k {ty} primary key, email text, first_name text, last_name text)"
        ))
        .await;
        let mut config = app.config();
        config.users.table = table;
        config.users.key = "k".into();
        let mut client = app::connect(&app.conninfo).await;
        keap_sync::migrate(&mut client, &config.users).await.unwrap_or_else(|e| panic!("a {ty} key: {e}"));
    }
}

/// Rows of `keap_sync.change` read by sequential scans so far, as the statistics say.
async fn change_log_rows_read(app: &app::TestApp) -> i64 {
    app.count(
        "select coalesce(seq_tup_read, 0) from pg_stat_user_tables
          where schemaname = 'keap_sync' and relname = 'change'",
    )
    .await
}

/// `status`, and the daemon's heartbeat before each fold, counted the whole change log. After an
/// outage (or with the fold broken) it can hold millions of rows: past `statement_timeout` the
/// daemon's session failed at every heartbeat and never folded. The count now reads a bounded
/// part of the log and says "at least".
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_reads_a_bounded_part_of_a_large_change_log() {
    let app = spawn_app_with(Options::stopped()).await;
    app.exec("insert into keap_sync.change (user_key) select g::text from generate_series(1, 250000) g")
        .await;
    let before = change_log_rows_read(&app).await;
    let out = app.run_cli(&["status"]);
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "status: {text}{}", String::from_utf8_lossy(&out.stderr));
    assert!(text.contains("at least 100000 changes"), "status says the log holds at least the limit: {text}");
    // The CLI's backend reports its statistics when it exits.
    app::eventually(Duration::from_secs(10), "the status session's statistics", || async {
        change_log_rows_read(&app).await > before
    })
    .await;
    let read = change_log_rows_read(&app).await - before;
    assert!(read <= 100_001, "status read {read} rows of a 250,000-row change log");
}

/// Logical replication's apply worker fires row triggers only, never statement triggers: on a
/// subscriber, the statement-level capture saw none of the inserts, updates and deletes the
/// subscription applied, while the capture check stayed green. A row trigger enabled for
/// `replica` mode now captures what the apply worker writes (the key-change and truncate
/// triggers fire `always`). A real publication and subscription, in one cluster.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn changes_applied_by_a_logical_replication_subscription_are_captured() {
    let mut app = spawn_app_with(Options {
        private_cluster: true,
        tweak: |c| c.delivery.on_delete = keap_sync::config::OnDelete::DeleteContact,
        ..Options::stopped()
    })
    .await;
    let cluster = app.cluster();
    app.exec("alter system set wal_level = logical").await;
    tokio::task::spawn_blocking(move || cluster.restart())
        .await
        .unwrap()
        .expect("restart, wal_level = logical");
    app.db = app::connect(&app.conninfo).await;

    // The publisher: another database of the cluster, with the same table and one user.
    let publisher_conninfo = cluster.fresh_database("pub").await.expect("publisher database");
    let publisher = app::connect(&publisher_conninfo).await;
    publisher
        .batch_execute(&format!(
            "{};
             insert into users (id, email) values (1, 'copied@example.com');
             create publication keap_pub for table users;",
            app::USERS_DDL
        ))
        .await
        .expect("publisher");
    publisher
        .batch_execute("select pg_create_logical_replication_slot('keap_sub', 'pgoutput')")
        .await
        .expect("slot");
    // In one cluster the slot must exist before the subscription (it cannot create it).
    app.exec(&format!(
        "create subscription keap_sub connection '{}' publication keap_pub
             with (create_slot = false, slot_name = 'keap_sub')",
        publisher_conninfo.replace('\'', "''")
    ))
    .await;
    app.start_daemon().await;
    // `None`: no contact with that email; `Some(name)`: its given name.
    let given_name = |email: &str| {
        app.fake.contacts().into_iter().find(|c| c.email1() == Some(email)).map(|c| c.given_name)
    };
    app::eventually(Duration::from_secs(30), "the initial copy delivered", || async {
        given_name("copied@example.com").is_some()
    })
    .await;

    publisher.batch_execute("insert into users (id, email) values (2, 'applied@example.com')").await.unwrap();
    app::eventually(Duration::from_secs(30), "the applied insert delivered", || async {
        given_name("applied@example.com").is_some()
    })
    .await;
    publisher.batch_execute("update users set first_name = 'Applied' where id = 2").await.unwrap();
    app::eventually(Duration::from_secs(30), "the applied update delivered", || async {
        given_name("applied@example.com") == Some(Some("Applied".to_owned()))
    })
    .await;
    publisher.batch_execute("delete from users where id = 2").await.unwrap();
    app::eventually(Duration::from_secs(30), "the applied delete delivered", || async {
        given_name("applied@example.com").is_none()
    })
    .await;
    publisher.batch_execute("truncate users").await.unwrap();
    app::eventually(Duration::from_secs(30), "the applied truncate delivered", || async {
        app.fake.contacts().is_empty()
    })
    .await;
    app.stop_daemon().await;
    app.exec("alter subscription keap_sub disable").await;
}

/// An open transaction that changed the keys of the 150 users who sort first holds their
/// outbox rows. The fold used to wait 5 ms for each in key order and stop after 100 of them, so
/// the users after them were never folded while it lived (and each try held the daemon's
/// connection for 0.6 s). A held row is now found without waiting, and everyone else is folded.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_fold_does_not_starve_behind_many_held_users() {
    let app = spawn_app_with(Options::stopped()).await;
    app.exec(
        "insert into users (id, email) select g, 'h' || g || '@example.com'
           from generate_series(1000, 1149) g union all
         select g, 'f' || g || '@example.com' from generate_series(2000, 2049) g",
    )
    .await;
    app.fold().await;
    app.exec("update users set first_name = 'Again'").await;
    let renumbering = app::connect(&app.conninfo).await;
    renumbering
        .batch_execute("begin; update users set id = id + 10000 where id < 2000")
        .await
        .expect("open key change of the first 150 users");
    let (taken, held) = fold_on_own_connection(&app.conninfo).await;
    assert_eq!((taken, held), (50, 150), "the 50 free users folded, the 150 held ones left in the log");
    assert_eq!(
        app.count("select count(*) from keap_sync.change where user_key >= '2000'").await,
        0,
        "no change of a free user is left behind"
    );
    renumbering.batch_execute("rollback").await.expect("rollback");
    assert_eq!(app.fold().await, 150, "the held changes are folded once the transaction ends");
}

/// Two folds at once (two instances during a fail-over): one decided from an older snapshot
/// that a deleted user was gone and wrote after the other, newer one had seen the user back;
/// the newer fold then kept the older one's `key_gone`, so a present user stayed marked gone.
/// Folds now take turns, and the later one sees what the earlier one wrote.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn overlapping_folds_leave_a_present_user_present() {
    let app = spawn_app_with(Options::stopped()).await;
    app.exec("insert into users (id, email) values (1, 'o1@example.com')").await;
    app.fold().await;
    app.exec("delete from users where id = 1").await;
    // The earlier fold: its snapshot predates the user's return (repeatable read pins it).
    let older = app::connect(&app.conninfo).await;
    older
        .batch_execute("begin isolation level repeatable read; select count(*) from users")
        .await
        .expect("older snapshot");
    app.exec("insert into users (id, email) values (1, 'o1@example.com')").await;
    let row = older
        .query_one("select taken, held from keap_sync.fold_changes(1000)", &[])
        .await
        .expect("older fold");
    assert_eq!((row.get::<_, i32>(0), row.get::<_, i32>(1)), (1, 0), "the older fold took the delete");
    // The newer fold sees the user back; let it wait long enough for the older one's commit.
    app.exec("alter function keap_sync.fold_changes(integer) set lock_timeout = '10s'").await;
    let conninfo = app.conninfo.clone();
    let newer = tokio::spawn(async move { fold_on_own_connection(&conninfo).await });
    app::eventually(Duration::from_secs(10), "the newer fold to wait for the older one", || async {
        app.count(
            "select count(*) from pg_stat_activity
              where datname = current_database() and wait_event_type in ('Lock', 'advisory')
                and query like '%fold_changes%' and pid <> pg_backend_pid()",
        )
        .await
            == 1
    })
    .await;
    older.batch_execute("commit").await.expect("commit the older fold");
    assert_eq!(newer.await.expect("newer fold").0, 1, "the newer fold took the insert");
    let gone: bool = app
        .db
        .query_one("select key_gone from keap_sync.outbox where user_key = '1'", &[])
        .await
        .expect("outbox row")
        .get(0);
    assert!(!gone, "user 1 exists, but its outbox row says the key is gone");
}

/// A users table partitioned by its key.
const PARTITIONED_USERS: &str = "create table public.users (
    id bigint primary key, email text, first_name text, last_name text, plan text not null default 'free'
) partition by range (id);
create table public.users_low partition of public.users for values from (minvalue) to (1000);
create table public.users_high partition of public.users for values from (1000) to (maxvalue);";

/// The contact id mapped to user `key`, if any.
async fn mapped(app: &app::TestApp, key: &str) -> Option<i64> {
    app.db
        .query_opt("select contact_id from keap_sync.contact_map where user_key = $1", &[&key])
        .await
        .expect("contact_map")
        .map(|r| r.get(0))
}

/// A partitioned users table: statement triggers on the parent do not fire for a write to a
/// partition, nor for a TRUNCATE of one, and an update that moves a row to another partition
/// fires no update row trigger, so a key change across partitions was lost. Each is captured.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_to_partitions_and_moves_between_them_are_captured() {
    let app = spawn_app_with(Options {
        users_ddl: PARTITIONED_USERS,
        tweak: |c| c.delivery.on_delete = keap_sync::config::OnDelete::DeleteContact,
        ..Options::default()
    })
    .await;
    app.exec("insert into users (id, email) values (1, 'one@example.com'), (2000, 'two@example.com')").await;
    app.wait_idle().await;
    let one = mapped(&app, "1").await.expect("user 1 delivered");

    // Straight into a partition.
    app.exec("insert into users_low (id, email) values (3, 'three@example.com')").await;
    app::eventually(Duration::from_secs(20), "an insert into a partition delivered", || async {
        mapped(&app, "3").await.is_some()
    })
    .await;
    app.exec("update users_high set first_name = 'Direct' where id = 2000").await;
    app::eventually(Duration::from_secs(20), "an update of a partition delivered", || async {
        app.fake.contacts().iter().any(|c| c.given_name.as_deref() == Some("Direct"))
    })
    .await;

    // A key change that moves the row to the other partition keeps the user's contact.
    app.exec("update users set id = 1500, first_name = 'Moved' where id = 1").await;
    app::eventually(Duration::from_secs(20), "the moved user delivered under its new key", || async {
        app.fake.contact(one).is_some_and(|c| c.given_name.as_deref() == Some("Moved"))
            && mapped(&app, "1500").await == Some(one)
            && mapped(&app, "1").await.is_none()
    })
    .await;
    app.wait_idle().await;
    assert_eq!(app.fake.contacts().len(), 3, "no contact created or deleted by the move");

    // A TRUNCATE of one partition, and a delete from the other.
    app.exec("truncate users_high").await;
    app.exec("delete from users_low where id = 3").await;
    app::eventually(Duration::from_secs(20), "the truncated and deleted users' contacts deleted", || async {
        app.fake.contacts().is_empty()
    })
    .await;
}

/// A key change onto the key of a user deleted before the daemon handled that deletion: the
/// new key still had the deleted user's mapping, so the renamed user's data went to the deleted
/// user's contact, and the renamed user's own contact, left under the old key, was handled as
/// deleted (here: deleted). Each contact now stays with its own: the renamed user's follows it,
/// and the deleted user's gets the deletion.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_change_onto_a_deleted_users_key_keeps_each_contact_with_its_own() {
    let mut app = spawn_app_with(Options {
        tweak: |c| c.delivery.on_delete = keap_sync::config::OnDelete::DeleteContact,
        ..Options::default()
    })
    .await;
    app.exec(
        "insert into users (id, email, first_name) values (1, 'ann@example.com', 'Ann'), (2, 'bob@example.com', 'Bob')",
    )
    .await;
    app.wait_idle().await;
    let (ann, bob) = (mapped(&app, "1").await.expect("Ann"), mapped(&app, "2").await.expect("Bob"));
    app.stop_daemon().await;
    app.exec("delete from users where id = 2").await;
    app.exec("update users set id = 2, first_name = 'Ann B.' where id = 1").await;
    app.start_daemon().await;
    app.wait_idle().await;
    assert_eq!(mapped(&app, "2").await, Some(ann), "Ann's contact follows her to key 2");
    let kept = app.fake.contact(ann).expect("Ann's contact kept");
    assert_eq!((kept.email1(), kept.given_name.as_deref()), (Some("ann@example.com"), Some("Ann B.")));
    assert!(app.fake.contact(bob).is_none(), "Bob's contact got Bob's deletion");
    assert_eq!(app.fake.contacts().len(), 1);
}
