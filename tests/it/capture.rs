//! Capture you can trust: a user whose row cannot be read is parked alone, and the daemon reads
//! nothing but the columns it syncs.

use std::time::Duration;

use keap_sync_testkit::app::{self, spawn_app, spawn_app_with, Options};

/// A `last_name` whose conversion to text raises for one value: a composite type with a cast
/// to text that refuses `bad`, standing in for any value that fails `::text` after a column
/// type change.
const UNREADABLE_LAST_NAME: &str = "
    create type public.surname as (v text);
    create function public.surname_text(s public.surname) returns text
        language plpgsql immutable as $$
        begin
            if s.v = 'bad' then
                raise exception 'surname % cannot be shown', s.v;
            end if;
            return s.v;
        end $$;
    create cast (public.surname as text) with function public.surname_text(public.surname);
    alter table public.users alter column last_name type public.surname using row(last_name)::public.surname;
";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_user_whose_row_cannot_be_read_is_parked_alone_and_the_others_are_delivered() {
    let mut app = spawn_app_with(Options { start_daemon: false, ..Options::default() }).await;
    app.exec(UNREADABLE_LAST_NAME).await;
    app.exec(
        "insert into users (email, first_name, last_name)
         select 'u' || g || '@example.com', 'U' || g, row(case when g = 3 then 'bad' else 'L' || g end)::surname
           from generate_series(1, 6) g",
    )
    .await;
    app.start_daemon().await;
    app::eventually(
        Duration::from_secs(20),
        "the five readable users delivered, the other parked",
        || async {
            app.fake.contacts().len() == 5
                && app.count("select count(*) from keap_sync.outbox where parked_at is not null").await == 1
                && app.count("select count(*) from keap_sync.outbox").await == 1
        },
    )
    .await;
    let row = app
        .db
        .query_one("select user_key, last_error from keap_sync.outbox where parked_at is not null", &[])
        .await
        .expect("the parked row");
    let (key, reason): (String, String) = (row.get(0), row.get(1));
    assert_eq!(key, "3");
    assert!(
        reason.contains("user 3") && reason.contains("last_name"),
        "the reason names user and column: {reason}"
    );
    assert!(reason.contains("cannot be shown"), "the reason says why: {reason}");
    assert!(app.daemons_running(), "the daemon keeps running");

    // Fixed, the user syncs on its next change.
    app.exec("update users set last_name = row('Good')::surname where id = 3").await;
    app.wait_idle().await;
    assert_eq!(app.fake.contacts().len(), 6);
}

fn delete_contacts(c: &mut keap_sync::config::Config) {
    c.delivery.on_delete = keap_sync::config::OnDelete::DeleteContact;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn truncate_with_delete_contact_deletes_every_mapped_contact() {
    let app = spawn_app_with(Options { tweak: delete_contacts, ..Options::default() }).await;
    app.exec("insert into users (email) select 't' || g || '@example.com' from generate_series(1, 5) g")
        .await;
    app.wait_idle().await;
    assert_eq!(app.fake.contacts().len(), 5);

    app.exec("truncate users").await;
    app::eventually(Duration::from_secs(20), "every contact deleted after the TRUNCATE", || async {
        app.fake.contacts().is_empty()
            && app.count("select count(*) from keap_sync.contact_map").await == 0
            && app.count("select count(*) from keap_sync.outbox").await == 0
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn truncate_with_keep_keeps_contacts_and_a_reload_updates_the_same_ones() {
    let app = spawn_app().await;
    app.exec("insert into users (email) select 'k' || g || '@example.com' from generate_series(1, 5) g")
        .await;
    app.wait_idle().await;
    let before: Vec<i64> = {
        let mut ids: Vec<i64> = app.fake.contacts().iter().map(|c| c.id).collect();
        ids.sort();
        ids
    };

    // A TRUNCATE and a reload (as a restore does it): every key is enqueued as gone, then as
    // present again; the contacts stay and are updated, never duplicated.
    app.exec(
        "begin;
         truncate users;
         insert into users (id, email, first_name)
         select g, 'k' || g || '@example.com', 'Reloaded' from generate_series(1, 5) g;
         commit",
    )
    .await;
    app.wait_idle().await;
    let mut after: Vec<i64> = app.fake.contacts().iter().map(|c| c.id).collect();
    after.sort();
    assert_eq!(after, before, "the same contacts");
    assert_eq!(app.contact_calls("DELETE"), 0);
    app.assert_keap_matches_users().await;

    // A TRUNCATE alone, with `keep`: every mapped key is enqueued as gone (seen from inside
    // the truncating transaction), and the contacts stay in Keap.
    app.exec("begin; truncate users").await;
    let gone = app.count("select count(*) from keap_sync.outbox where key_gone").await;
    app.exec("commit").await;
    assert_eq!(gone, 5, "every mapped key enqueued as gone");
    app.wait_idle().await;
    assert_eq!(app.fake.contacts().len(), 5, "kept in Keap");
    assert_eq!(app.contact_calls("DELETE"), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn changes_are_captured_whatever_the_session_replication_role() {
    let app = spawn_app().await;
    // As a logical replication apply worker or `pg_restore --disable-triggers` would write.
    app.exec(
        "set session_replication_role = replica;
         insert into users (email) values ('replica@example.com');
         reset session_replication_role",
    )
    .await;
    app::eventually(Duration::from_secs(10), "the replica-role insert delivered", || async {
        app.fake.contacts().len() == 1
    })
    .await;
}

async fn healthz(port: u16) -> (u16, String) {
    keap_sync_testkit::install_crypto_provider();
    let answer =
        reqwest::get(format!("http://127.0.0.1:{port}/healthz")).await.expect("the metrics listener is up");
    (answer.status().as_u16(), answer.text().await.unwrap_or_default())
}

async fn paused_reason(app: &app::TestApp) -> Option<String> {
    app.db
        .query_opt("select paused_reason from keap_sync.instances where role = 'active'", &[])
        .await
        .expect("instances")
        .and_then(|r| r.get(0))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_disabled_trigger_or_a_renamed_column_shows_in_status_and_healthz() {
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let mut app = spawn_app_with(Options { start_daemon: false, ..Options::default() }).await;
    let mut config = app.config();
    config.metrics_listen = Some(format!("127.0.0.1:{port}").parse().unwrap());
    config.delivery.capture_check = Duration::from_millis(300);
    app.start_daemon_with(config).await;
    app.exec("insert into users (email) values ('a@example.com')").await;
    app.wait_idle().await;
    assert_eq!(healthz(port).await.0, 200);

    app.exec("alter table users disable trigger keap_sync_capture").await;
    app::eventually(Duration::from_secs(10), "the disabled trigger in status", || async {
        paused_reason(&app)
            .await
            .is_some_and(|r| r.contains("keap_sync_capture") && r.contains("keap-sync migrate"))
    })
    .await;
    let (code, body) = healthz(port).await;
    assert_eq!(code, 503, "{body}");
    assert!(body.contains("disabled") && body.contains("keap-sync migrate"), "/healthz: {body}");
    let text = String::from_utf8_lossy(&app.run_cli(&["status"]).stdout).into_owned();
    assert!(text.contains("keap_sync_capture"), "status: {text}");
    assert!(
        app::captured_logs().lines().any(|l| l.contains("capture") && l.contains("disabled")),
        "no log line"
    );

    // `migrate` repairs it, and the daemon sees it.
    let out = app.run_cli(&["migrate"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    app::eventually(Duration::from_secs(10), "healthy again", || async { healthz(port).await.0 == 200 })
        .await;
    app.exec("insert into users (email) values ('b@example.com')").await;
    app.wait_idle().await;

    // A synced column renamed under the running daemon.
    app.exec("alter table users rename column first_name to given").await;
    app::eventually(Duration::from_secs(10), "the renamed column in status", || async {
        paused_reason(&app).await.is_some_and(|r| r.contains("first_name"))
    })
    .await;
    let (code, body) = healthz(port).await;
    assert_eq!(code, 503, "{body}");
    assert!(
        body.contains("first_name") && body.contains("given_name"),
        "/healthz names the config key: {body}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migrate_behind_a_long_transaction_reports_the_holder_and_retries() {
    let app = spawn_app_with(Options { start_daemon: false, ..Options::default() }).await;
    app.exec("drop trigger keap_sync_capture on users").await;
    // A long transaction that wrote users: `create trigger` must wait for it.
    let blocker = app::connect(&app.conninfo).await;
    blocker.batch_execute("begin; update users set plan = plan where false").await.unwrap();
    let holder_pid: i32 = blocker.query_one("select pg_backend_pid()", &[]).await.unwrap().get(0);

    let mut child = app.spawn_command(&app.write_config_file("", ""), &["migrate"]);
    app::eventually(Duration::from_secs(20), "migrate reports what it waits for", || async {
        child.log_text().contains(&format!("held by pid {holder_pid}"))
    })
    .await;
    // Meanwhile the application writes on: migrate does not queue every write behind it.
    let started = std::time::Instant::now();
    app.exec("insert into users (email) values ('during@example.com')").await;
    assert!(
        started.elapsed() < Duration::from_secs(6),
        "an application write waited {:?}",
        started.elapsed()
    );
    blocker.batch_execute("commit").await.unwrap();
    let status = loop_wait(&mut child).await;
    assert!(status.success(), "migrate succeeded once the lock was free: {}", child.log_text());
    assert_eq!(app.count("select count(*) from pg_trigger where tgname = 'keap_sync_capture'").await, 1);
}

async fn loop_wait(child: &mut app::ChildDaemon) -> std::process::ExitStatus {
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        if let Some(status) = child.child.try_wait().expect("wait") {
            return status;
        }
        assert!(std::time::Instant::now() < deadline, "migrate still running: {}", child.log_text());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_daemon_role_with_column_level_select_only_syncs() {
    let mut app = spawn_app_with(Options { start_daemon: false, ..Options::default() }).await;
    // As sql/role.example.sql grants it: the synced columns and the key, not `plan`.
    let role = format!("ks_least_{}", app::rand_suffix());
    app.exec(&format!(
        "create role {role} login;
         grant usage on schema keap_sync to {role};
         grant select, insert, update, delete on all tables in schema keap_sync to {role};
         grant usage, select on all sequences in schema keap_sync to {role};
         revoke insert, update, delete on keap_sync.schema_migrations from {role};
         grant usage on schema public to {role};
         grant select (id, email, first_name, last_name) on public.users to {role};"
    ))
    .await;
    app.insert_preexisting_users(3).await;
    let mut config = app.config();
    let mut database = config.database.clone().expect("a database");
    database.url = keap_sync::Secret::new(format!("{} user={role}", app.conninfo));
    config.database = Some(database);
    app.start_daemon_with_options(
        config,
        keap_sync::RunOptions { backfill: Some(keap_sync::BackfillMode::Resume), ..Default::default() },
    )
    .await;
    app.exec("insert into users (email, first_name, plan) values ('live@example.com', 'Live', 'gold')").await;
    app.exec("update users set last_name = 'Changed' where email = 'pre1@example.com'").await;
    app::eventually(Duration::from_secs(30), "the backfill and the live changes delivered", || async {
        app.fake.contacts().len() == 4 && app.count("select count(*) from keap_sync.outbox").await == 0
    })
    .await;
    app.assert_keap_matches_users().await;
    assert!(app.daemons_running(), "the daemon runs as the least-privilege role");
}

/// The daemon reads keys as `key::text`; the trigger writes `to_jsonb(row) ->> key`. They must
/// agree, or a change would be read as a deleted user.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn key_text_is_the_same_as_the_trigger_writes_for_every_key_type() {
    let app = spawn_app_with(Options { start_daemon: false, ..Options::default() }).await;
    let cases = [
        ("integer", "(-2147483648), (0), (42), (2147483647)"),
        ("bigint", "(-9223372036854775808), (7), (9223372036854775807)"),
        ("uuid", "('A0EEBC99-9C0B-4EF8-BB6D-6BB9BD380A11'), ('00000000-0000-0000-0000-000000000000')"),
        ("text", r#"('plain'), ('quote"s'), ('back\slash'), ('ünïcødé'), (' space '), (''), ('tab	in')"#),
    ];
    for (ty, values) in cases {
        app.exec(&format!("create table keys_{ty} (k {ty}); insert into keys_{ty} values {values}")).await;
        let differ = app
            .count(&format!(
                "select count(*) from keys_{ty} t where pg_catalog.to_jsonb(t) ->> 'k' is distinct from t.k::text"
            ))
            .await;
        assert_eq!(differ, 0, "{ty}: key::text differs from to_jsonb ->> key");
    }
}

/// The other unreadable row: bytes that are not UTF-8 in a `SQL_ASCII` database, which the
/// server passes through unchecked and the driver cannot decode.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_non_utf8_value_in_a_sql_ascii_database_parks_that_user_alone() {
    let mut app = spawn_app_with(Options { start_daemon: false, ..Options::default() }).await;
    let name = format!("ascii_{}", app::rand_suffix() % 1_000_000);
    app.exec(&format!(
        "create database {name} encoding 'SQL_ASCII' lc_collate 'C' lc_ctype 'C' template template0"
    ))
    .await;
    let conninfo = format!("{} dbname={name}", app.conninfo);
    let mut ascii = app::connect(&conninfo).await;
    ascii.batch_execute(app::USERS_DDL).await.expect("users table");
    let mut config = app.config();
    keap_sync::migrate(&mut ascii, &config.users).await.expect("migrate");
    ascii
        .batch_execute(
            r"insert into users (email, first_name)
              select 'a' || g || '@example.com', case when g = 2 then E'Bad\xff' else 'Fine' end
                from generate_series(1, 4) g",
        )
        .await
        .expect("insert");
    let mut database = config.database.clone().expect("a database");
    database.url = keap_sync::Secret::new(conninfo.clone());
    config.database = Some(database);
    app.start_daemon_with(config).await;
    app::eventually(Duration::from_secs(20), "three delivered, the non-UTF-8 one parked", || async {
        let parked: i64 = ascii
            .query_one("select count(*) from keap_sync.outbox where parked_at is not null", &[])
            .await
            .unwrap()
            .get(0);
        let all: i64 = ascii.query_one("select count(*) from keap_sync.outbox", &[]).await.unwrap().get(0);
        app.fake.contacts().len() == 3 && parked == 1 && all == 1
    })
    .await;
    let row = ascii.query_one("select user_key, last_error from keap_sync.outbox", &[]).await.unwrap();
    let (key, reason): (String, String) = (row.get(0), row.get(1));
    assert_eq!(key, "2");
    assert!(reason.contains("user 2") && reason.contains("first_name"), "{reason}");
}

/// The outbox as `(user_key, version, key_gone)`, by key, once the change log is folded into it
/// (the daemon is stopped in these tests).
async fn outbox(app: &app::TestApp) -> Vec<(String, i64, bool)> {
    app.fold().await;
    let client = app::connect(&app.conninfo).await;
    client
        .query("select user_key, version::bigint, key_gone from keap_sync.outbox order by user_key", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_multi_row_statement_enqueues_each_user_once_and_the_daemon_delivers_all() {
    let mut app = spawn_app_with(Options::stopped()).await;
    app.exec(
        "insert into users (id, email) select g, 'm' || g || '@example.com' from generate_series(1, 5) g",
    )
    .await;
    assert_eq!(app.count("select count(*) from keap_sync.change").await, 5, "one log row per user");
    let want: Vec<(String, i64, bool)> = (1..=5).map(|i| (i.to_string(), 1, false)).collect();
    assert_eq!(outbox(&app).await, want, "one insert statement, each user once");
    assert_eq!(app.count("select count(*) from keap_sync.change").await, 0, "the fold empties the log");
    app.exec("begin; update users set first_name = 'Rolled back'; rollback").await;
    assert_eq!(app.count("select count(*) from keap_sync.change").await, 0, "a rollback captures nothing");
    app.exec("update users set first_name = 'F' || id").await;
    let want: Vec<(String, i64, bool)> = (1..=5).map(|i| (i.to_string(), 2, false)).collect();
    assert_eq!(outbox(&app).await, want, "one update statement bumps each user once");
    app.start_daemon().await;
    app.wait_idle().await;
    assert_eq!(app.fake.contacts().len(), 5);
    // The daemon is listening: a later statement is delivered from its one notification.
    app.exec(
        "insert into users (id, email) select g, 'm' || g || '@example.com' from generate_series(6, 8) g",
    )
    .await;
    app.exec("delete from users where id in (6, 7)").await;
    app.wait_idle().await;
    assert_eq!(app.count("select count(*) from keap_sync.contact_map").await, 6);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_update_of_unsynced_columns_only_enqueues_nothing() {
    let app = spawn_app_with(Options::stopped()).await;
    app.insert_users(3).await;
    app.exec("delete from keap_sync.change").await;
    app.exec("update users set plan = 'gold'").await;
    app.exec("update users set email = email, first_name = first_name").await;
    assert_eq!(outbox(&app).await, [], "no synced column changed");
    app.exec("update users set last_name = 'Changed' where email = 'u2@example.com'").await;
    assert_eq!(outbox(&app).await.len(), 1, "a synced column changed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_update_mixing_key_changes_and_same_key_changes_enqueues_the_right_keys() {
    let mut app = spawn_app().await;
    app.exec("insert into users (id, email) values (1, 'k1@example.com'), (2, 'k2@example.com')").await;
    app.wait_idle().await;
    app.stop_daemon().await;
    app.exec("delete from keap_sync.outbox; delete from keap_sync.change").await;
    app.exec("update users set id = case when id = 1 then 100 else id end, first_name = 'New'").await;
    assert_eq!(
        outbox(&app).await,
        [("1".to_owned(), 1, true), ("100".to_owned(), 1, false), ("2".to_owned(), 1, false)],
        "the old key gone, the new key and the same-key user enqueued"
    );
    assert_eq!(app.count("select count(*) from keap_sync.contact_map where user_key = '1'").await, 0);
    assert_eq!(app.count("select count(*) from keap_sync.contact_map where user_key = '100'").await, 1);
    assert_eq!(app.count("select count(*) from keap_sync.contact_map where user_key = '2'").await, 1);
}

/// A delete is captured like any change, and the fold decides from the users table whether the
/// key is gone: a deleted user is queued as gone, one deleted and inserted again as present.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_fold_queues_a_deleted_key_as_gone_and_a_re_inserted_one_as_present() {
    let app = spawn_app_with(Options::stopped()).await;
    app.exec("insert into users (id, email) values (1, 'd1@example.com'), (2, 'd2@example.com')").await;
    assert_eq!(outbox(&app).await, [("1".to_owned(), 1, false), ("2".to_owned(), 1, false)]);
    app.exec("delete from users where id = 1").await;
    app.exec("delete from users where id = 2").await;
    app.exec("insert into users (id, email) values (2, 'd2@example.com')").await;
    assert_eq!(app.count("select count(*) from keap_sync.change").await, 3, "three changes captured");
    assert_eq!(
        outbox(&app).await,
        [("1".to_owned(), 2, true), ("2".to_owned(), 2, false)],
        "one new version per user: 1 gone, 2 present again"
    );
}

/// Runs the fold on a connection of its own and returns `(taken, held)`, failing the test if
/// it does not end within 10 s (a fold that waits for an application's transaction).
pub(crate) async fn fold_on_own_connection(conninfo: &str) -> (i32, i32) {
    let client = app::connect(conninfo).await;
    let row = tokio::time::timeout(
        Duration::from_secs(10),
        client.query_one("select taken, held from keap_sync.fold_changes(1000)", &[]),
    )
    .await
    .expect("the fold waited for the open transaction instead of folding around it")
    .unwrap_or_else(|e| panic!("fold: {:?}", e.as_db_error().map(|d| d.message())));
    (row.get(0), row.get(1))
}

/// A key change writes the outbox from the application's transaction (invariant 13), so while
/// one stays open it holds that user's outbox row. The fold must not wait for it: the other
/// users' changes reach the outbox, the held user's stay in the log until the transaction ends.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_open_key_change_holds_back_only_its_users_changes_from_the_fold() {
    let app = spawn_app_with(Options::stopped()).await;
    app.exec("insert into users (id, email) values (1, 'h1@example.com'), (2, 'h2@example.com')").await;
    app.fold().await;
    app.exec(
        "update users set first_name = 'One' where id = 1; update users set first_name = 'Two' where id = 2",
    )
    .await;
    let held = app::connect(&app.conninfo).await;
    held.batch_execute("begin; update users set id = 100 where id = 1").await.expect("open key change");
    assert_eq!(fold_on_own_connection(&app.conninfo).await, (1, 1), "user 2 folded, user 1 held back");
    assert_eq!(
        app.db
            .query_one("select version::bigint from keap_sync.outbox where user_key = '2'", &[])
            .await
            .unwrap()
            .get::<_, i64>(0),
        2
    );
    assert_eq!(
        app.count("select count(*) from keap_sync.change where user_key = '1'").await,
        1,
        "kept in the log"
    );
    held.batch_execute("commit").await.expect("commit");
    assert_eq!(
        outbox(&app).await,
        [("1".to_owned(), 3, true), ("100".to_owned(), 1, false), ("2".to_owned(), 2, false)],
        "once the key change ends, the held change is folded and the key stays gone"
    );
}

/// A fold that decided from its snapshot that a key is present, then waited for the outbox row
/// of a key change that made it gone, must keep the key change's `key_gone`: its own view is
/// older. Without that, a delivery could map a key that no longer exists (invariant 13).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fold_that_waited_for_a_key_change_keeps_the_key_gone() {
    let app = spawn_app_with(Options::stopped()).await;
    app.exec("insert into users (id, email) values (1, 'r1@example.com')").await;
    // Widen the race window: the fold waits up to 10 s for the row instead of 100 ms.
    app.exec("alter function keap_sync.fold_changes(integer) set lock_timeout = '10s'").await;
    let key_change = app::connect(&app.conninfo).await;
    key_change.batch_execute("begin; update users set id = 100 where id = 1").await.expect("open key change");
    let conninfo = app.conninfo.clone();
    let fold = tokio::spawn(async move { fold_on_own_connection(&conninfo).await });
    app::eventually(Duration::from_secs(10), "the fold to wait for the key change's outbox row", || async {
        app.count(
            "select count(*) from pg_stat_activity
              where datname = current_database() and wait_event_type = 'Lock'
                and query like '%fold_changes%' and pid <> pg_backend_pid()",
        )
        .await
            == 1
    })
    .await;
    key_change.batch_execute("commit").await.expect("commit");
    assert_eq!(fold.await.expect("fold task"), (1, 0));
    let row = app
        .db
        .query_one("select version::bigint, key_gone from keap_sync.outbox where user_key = '1'", &[])
        .await
        .unwrap();
    assert_eq!((row.get::<_, i64>(0), row.get::<_, bool>(1)), (2, true), "the key change's key_gone kept");
}

/// The insert and delete capture functions are `security definer` without a pinned
/// `search_path` (each call would pay for it): they must resolve nothing through the caller's.
/// A caller whose path puts a schema of its own first, holding a `pg_notify` that raises and a
/// type named `text`, still has its writes captured, and nothing of its own runs as the table's
/// owner. Unqualified, `::text` would be that type (the insert fails: no cast) and `pg_notify`
/// that function (the insert fails: it raises).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn capture_resolves_nothing_through_the_callers_search_path() {
    let app = spawn_app_with(Options::stopped()).await;
    app.exec(
        "create schema hostile;
         create function hostile.pg_notify(text, text) returns void language plpgsql
             as $$ begin raise exception 'hostile pg_notify ran'; end $$;
         create type hostile.text as enum ('hostile');",
    )
    .await;
    let caller = app::connect(&app.conninfo).await;
    caller
        .batch_execute(
            "set search_path = hostile, pg_catalog, public;
             insert into public.users (id, email) values (1, 's1@example.com'), (2, 's2@example.com');
             update public.users set first_name = 'Changed' where id = 1;
             delete from public.users where id = 2;",
        )
        .await
        .unwrap_or_else(|e| {
            panic!("a write under a hostile search_path: {:?}", e.as_db_error().map(|d| d.message()))
        });
    assert_eq!(app.count("select count(*) from keap_sync.change").await, 4, "insert ×2, update, delete");
    assert_eq!(outbox(&app).await, [("1".to_owned(), 1, false), ("2".to_owned(), 1, true)]);
}

/// A transaction that changed every key and stays open (a renumbering, say) holds every user's
/// outbox row. The fold finds held rows without waiting for them, so the daemon's loop is not
/// held up for the length of the table (at 100 ms a user, 150 users would be 15 s: the 10 s
/// bound of `fold_on_own_connection` fails the test).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fold_behind_an_open_renumbering_of_every_key_ends_quickly() {
    let app = spawn_app_with(Options::stopped()).await;
    app.insert_users(150).await;
    app.fold().await;
    app.exec("update users set first_name = 'Again'").await;
    let renumbering = app::connect(&app.conninfo).await;
    renumbering.batch_execute("begin; update users set id = id + 1000").await.expect("open renumbering");
    assert_eq!(fold_on_own_connection(&app.conninfo).await, (0, 150), "every user held, none waited for");
    renumbering.batch_execute("rollback").await.expect("rollback");
    assert_eq!(app.fold().await, 150, "every change folded once the transaction ends");
}
