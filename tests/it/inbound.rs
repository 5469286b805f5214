//! Keap talks back, first part (issue 29): `[inbound]` columns written from the mirror by the
//! daemon's sweep. Email marketability is Keap's (invariant 17): an unsubscribe in Keap reaches
//! `users.marketing_opt_out` within a sweep, costs no Keap write and enqueues nothing outbound
//! (invariant 18); the users table is only ever updated in the inbound columns (invariant 21).

use std::time::Duration;

use keap_sync::config::Config;
use keap_sync_testkit::app::{self, spawn_app_with, Options, TestApp};

use crate::{nothing_outbound, wait_settled, writes_since};

const DDL: &str = "create table public.users (
    id                 bigserial primary key,
    email              text,
    first_name         text,
    last_name          text,
    marketing_opt_out  boolean not null default false,
    notes              text
)";

/// Sweeps every second, to the moment; the opt-out lands in `marketing_opt_out`.
const TOML: &str = "[mirror]\nsweep_secs = 1\nlag_secs = 0\noverlap_secs = 1\n\
                    [inbound]\nemail_opt_out = \"marketing_opt_out\"\n";

/// The same sweeps, no `[inbound]`.
const NO_INBOUND_TOML: &str = "[mirror]\nsweep_secs = 1\nlag_secs = 0\noverlap_secs = 1\n";

async fn inbound_app(toml: &'static str) -> TestApp {
    spawn_app_with(Options { users_ddl: DDL, toml, ..Options::default() }).await
}

/// Inserts Ada, waits until her contact exists and the mirror has her, and returns the number
/// of requests so far.
async fn ada_synced(app: &TestApp) -> usize {
    app.exec("insert into users (id, email, first_name) values (1, 'ada@example.com', 'Ada')").await;
    wait_settled(app).await;
    crate::wait_mirrored(app, "1").await;
    app.fake.requests().len()
}

async fn opt_out(app: &TestApp) -> bool {
    app.db.query_one("select marketing_opt_out from users where id = 1", &[]).await.unwrap().get(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unsubscribe_in_keap_reaches_the_column_within_a_sweep_with_no_write_and_no_echo() {
    let app = inbound_app(TOML).await;
    let before = ada_synced(&app).await;
    assert!(!opt_out(&app).await);
    app.fake.set_email_status("ada@example.com", "ListUnsubscribe");
    app::eventually(Duration::from_secs(10), "the opt-out in users.marketing_opt_out", || async {
        opt_out(&app).await
    })
    .await;
    // The inbound write is in the same transaction as any capture it caused: none.
    assert_eq!(nothing_outbound(&app).await, 0, "the inbound write was captured as a change to send");
    let changed = app
        .count(
            "select count(*) from keap_sync.inbound_event
              where user_key = '1' and column_name = 'marketing_opt_out' and value = 'true' and changed",
        )
        .await;
    assert_eq!(changed, 1, "what came in is kept as history");
    // Two more sweeps: still nothing sent, nothing queued, nothing recorded again.
    let events = app.count("select count(*) from keap_sync.inbound_event").await;
    let swept = app.fake.requests().len();
    app::eventually(Duration::from_secs(10), "two more sweeps", || async {
        app.fake.requests().iter().skip(swept).filter(|r| r.path.contains("/v2/contacts")).count() >= 2
    })
    .await;
    let writes = writes_since(&app, before);
    assert!(writes.is_empty(), "no Keap write: {writes:?}");
    assert_eq!(nothing_outbound(&app).await, 0);
    assert_eq!(app.count("select count(*) from keap_sync.inbound_event").await, events, "no event twice");
    let row = app.db.query_one("select email, first_name, notes from users where id = 1", &[]).await.unwrap();
    let kept: (String, String, Option<String>) = (row.get(0), row.get(1), row.get(2));
    assert_eq!(kept, ("ada@example.com".into(), "Ada".into(), None), "no other column touched");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn opting_in_again_in_keap_sets_the_column_back_to_false() {
    let app = inbound_app(TOML).await;
    let before = ada_synced(&app).await;
    app.fake.set_email_status("ada@example.com", "Manual");
    app::eventually(Duration::from_secs(10), "the opt-out in", || async { opt_out(&app).await }).await;
    app.fake.set_email_status("ada@example.com", "SingleOptIn");
    app::eventually(Duration::from_secs(10), "marketable again", || async { !opt_out(&app).await }).await;
    let writes = writes_since(&app, before);
    assert!(writes.is_empty(), "no Keap write: {writes:?}");
    assert_eq!(nothing_outbound(&app).await, 0);
    let values = crate::texts(
        &app,
        "select value::text from keap_sync.inbound_event where user_key = '1' and changed order by id",
    )
    .await;
    assert_eq!(values, ["true", "false"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_an_inbound_section_the_users_table_is_never_written() {
    let app = inbound_app(NO_INBOUND_TOML).await;
    let before = ada_synced(&app).await;
    // The app's own value, which Keap's marketable status would turn to false with [inbound].
    app.exec("update users set marketing_opt_out = true where id = 1").await;
    app.fake.set_email_status("ada@example.com", "SingleOptIn");
    app::eventually(Duration::from_secs(10), "a sweep stored the new status", || async {
        app.count(
            "select count(*) from keap_sync.mirror
              where contact @> '{\"email_addresses\": [{\"field\": \"EMAIL1\", \"email_opt_status\": \"SINGLE_OPT_IN\"}]}'",
        )
        .await
            == 1
    })
    .await;
    // One more sweep after that store, for a pass that would run after it.
    let swept = app.fake.requests().len();
    app::eventually(Duration::from_secs(10), "one more sweep", || async {
        app.fake.requests().iter().skip(swept).any(|r| r.path.contains("/v2/contacts"))
    })
    .await;
    assert!(opt_out(&app).await, "the column stays as the app set it");
    assert_eq!(app.count("select count(*) from keap_sync.inbound_event").await, 0);
    let writes = writes_since(&app, before);
    assert!(writes.is_empty(), "no Keap write: {writes:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_column_mapped_both_ways_is_refused_naming_both() {
    let app = spawn_app_with(Options { users_ddl: DDL, start_daemon: false, ..Options::default() }).await;
    let env = app.env();
    let load = |toml: &str| Config::from_toml(toml, &|k| env.get(k).cloned());
    let both =
        "[contact]\njob_title = \"marketing_opt_out\"\n[inbound]\nemail_opt_out = \"marketing_opt_out\"\n";
    let err = load(both).unwrap_err().to_string();
    assert!(
        err.contains("inbound.email_opt_out")
            && err.contains("contact.job_title")
            && err.contains("one owner"),
        "{err}"
    );
    // Read inside an outbound SQL expression: found when the mapping meets the table.
    let in_sql = "[[tags.from]]\nsql = \"not marketing_opt_out\"\ntag = \"Newsletter\"\n\
                  [inbound]\nemail_opt_out = \"marketing_opt_out\"\n";
    let config = load(in_sql).expect("the config alone cannot see inside SQL");
    let mut db = app::connect(&app.conninfo).await;
    let err = keap_sync::migrate(&mut db, &config.users).await.unwrap_err().to_string();
    assert!(err.contains("inbound.email_opt_out") && err.contains("SQL expression"), "{err}");
    let err =
        keap_sync::Daemon::build(config, keap_sync::RunOptions::default()).await.err().expect("refused");
    assert!(err.to_string().contains("one owner"), "{err}");
    // And a column of the wrong type, with the fix.
    let config = load("[inbound]\nemail_opt_out = \"notes\"\n").unwrap();
    let err = keap_sync::migrate(&mut db, &config.users).await.unwrap_err().to_string();
    assert!(
        err.contains("inbound.email_opt_out") && err.contains("notes is text") && err.contains("boolean"),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_role_without_update_on_the_column_gets_the_grant_to_run_and_deliveries_go_on() {
    let mut app =
        spawn_app_with(Options { users_ddl: DDL, toml: TOML, start_daemon: false, ..Options::default() })
            .await;
    // As sql/role.example.sql grants it, but without the inbound columns' grant.
    let role = format!("ks_inbound_{}", app::rand_suffix());
    app.exec(&format!(
        "create role {role} login;
         grant usage on schema keap_sync to {role};
         grant select, insert, update, delete on all tables in schema keap_sync to {role};
         grant usage, select on all sequences in schema keap_sync to {role};
         grant usage on schema public to {role};
         grant select (id, email, first_name, last_name) on public.users to {role};"
    ))
    .await;
    let mut config = app.config();
    let mut database = config.database.clone().expect("a database");
    database.url = keap_sync::Secret::new(format!("{} user={role}", app.conninfo));
    config.database = Some(database);
    app.start_daemon_with(config).await;
    ada_synced(&app).await;
    app.fake.set_email_status("ada@example.com", "ListUnsubscribe");
    let grant = format!("grant select (\"marketing_opt_out\"), update (\"marketing_opt_out\") on \"public\".\"users\" to {role}");
    app::eventually(Duration::from_secs(10), "the refusal logged with its grant", || async {
        app::captured_logs().lines().any(|l| l.contains(&grant) && l.contains("inbound.email_opt_out"))
    })
    .await;
    assert!(!opt_out(&app).await);
    // Deliveries go on.
    app.exec("insert into users (id, email, first_name) values (2, 'bob@example.com', 'Bob')").await;
    wait_settled(&app).await;
    assert_eq!(app.fake.contacts().len(), 2, "Bob delivered");
    assert!(app.daemons_running());
    // The grant fixes it without a restart: the due rows are applied at the next sweep.
    app.exec(&grant).await;
    app::eventually(Duration::from_secs(10), "the opt-out in once granted", || async { opt_out(&app).await })
        .await;
}

/// The last value history recorded of `property` for Ada's contact, and how many it recorded.
async fn history(app: &TestApp, property: &str) -> (Option<serde_json::Value>, i64) {
    let row = app
        .db
        .query_one(
            "select (select value from keap_sync.inbound_event
                      where user_key = '1' and property = $1 order by id desc limit 1),
                    (select count(*) from keap_sync.inbound_event where user_key = '1' and property = $1)",
            &[&property],
        )
        .await
        .unwrap();
    (row.get(0), row.get(1))
}

/// Everything that came in is kept, whether or not a column receives it: a hand edit of a
/// property the application owns (no column receives it; the row keeps the app's value), the
/// email status and the tags, each recorded once per value, with no Keap write.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn what_came_in_is_kept_as_history_whether_or_not_a_column_receives_it() {
    let app = inbound_app(TOML).await;
    let before = ada_synced(&app).await;
    let id = app.fake.contacts_with_email("ada@example.com")[0].id;
    app::eventually(Duration::from_secs(10), "Ada's first values on record", || async {
        history(&app, "given_name").await.0 == Some(serde_json::json!("Ada"))
    })
    .await;
    assert!(app.fake.edit_contact(id, |c| c.given_name = Some("Augusta".into())));
    app.fake.set_email_status("ada@example.com", "ListUnsubscribe");
    let tag = app.fake.create_tag("Webinar attended");
    assert!(app.fake.apply_tag_by_hand(id, tag));
    app::eventually(Duration::from_secs(10), "the hand edit, the status and the tag on record", || async {
        history(&app, "given_name").await.0 == Some(serde_json::json!("Augusta"))
            && history(&app, "tag_ids").await.0 == Some(serde_json::json!([tag]))
            && history(&app, "email1_status").await.1 >= 2
    })
    .await;
    let counts = (history(&app, "given_name").await.1, history(&app, "tag_ids").await.1);
    let swept = app.fake.requests().len();
    app::eventually(Duration::from_secs(10), "two more sweeps", || async {
        app.fake.requests().iter().skip(swept).filter(|r| r.path.contains("/v2/contacts")).count() >= 2
    })
    .await;
    assert_eq!(
        (history(&app, "given_name").await.1, history(&app, "tag_ids").await.1),
        counts,
        "once per value"
    );
    assert_eq!(counts.0, 2, "Ada, then Augusta");
    let first: String =
        app.db.query_one("select first_name from users where id = 1", &[]).await.unwrap().get(0);
    assert_eq!(first, "Ada", "history writes no column");
    assert!(writes_since(&app, before).is_empty(), "no Keap write");
}
