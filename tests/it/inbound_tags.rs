//! Keap talks back: tags (issue 29, "membership of tags in a category → `users.keap_tags
//! text[]`"). `[inbound] tags` names a tag category; its column holds the sorted names of the
//! contact's tags of that category, `{}` when none, written by the inbound pass after a sweep
//! (or a hook's read): no Keap write, nothing enqueued outbound (invariants 17, 18, 21), each
//! value kept in `keap_sync.inbound_event`. Names come from Keap's tag list, read again when a
//! contact carries an id the daemon does not know.

use std::time::Duration;

use keap_sync::config::Config;
use keap_sync_testkit::app::{self, spawn_app_with, Options, TestApp, HOOK_PATH};

use crate::{free_port, nothing_outbound, wait_settled, writes_since};

const DDL: &str = "create table public.users (
    id          bigserial primary key,
    email       text,
    first_name  text,
    last_name   text,
    keap_tags   text[],
    notes       text
)";

/// Sweeps every second, to the moment; the "Churn signals" category lands in `keap_tags`.
const TOML: &str = "[mirror]\nsweep_secs = 1\nlag_secs = 0\noverlap_secs = 1\n\
                    [inbound]\ntags = { column = \"keap_tags\", category = \"Churn signals\" }\n";

/// Inserts Ada, waits until her contact exists and the mirror has her; returns her contact's
/// id and the number of requests so far.
async fn ada_synced(app: &TestApp) -> (i64, usize) {
    app.exec("insert into users (id, email, first_name) values (1, 'ada@example.com', 'Ada')").await;
    wait_settled(app).await;
    crate::wait_mirrored(app, "1").await;
    let id = app.fake.contacts_with_email("ada@example.com")[0].id;
    (id, app.fake.requests().len())
}

async fn keap_tags(app: &TestApp) -> Option<Vec<String>> {
    app.db.query_one("select keap_tags from users where id = 1", &[]).await.unwrap().get(0)
}

/// Waits until `users.keap_tags` of Ada is `want`.
async fn wait_tags(app: &TestApp, want: &[&str]) {
    app::eventually(Duration::from_secs(10), &format!("keap_tags = {want:?}"), || async {
        keap_tags(app).await.is_some_and(|t| t == want)
    })
    .await;
}

/// The values recorded for Ada's `keap_tags` that changed the row, in order.
async fn changed_events(app: &TestApp) -> Vec<String> {
    app.db
        .query(
            "select value::text from keap_sync.inbound_event
              where user_key = '1' and column_name = 'keap_tags' and changed order by id",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tag_of_the_category_reaches_the_column_within_a_sweep_and_its_removal_leaves_it_empty() {
    let app = spawn_app_with(Options { users_ddl: DDL, toml: TOML, ..Options::default() }).await;
    let churn = app.fake.create_tag_category("Churn signals");
    let events = app.fake.create_tag_category("Events");
    let risk = app.fake.create_tag_in("Churn risk", churn);
    let at_risk = app.fake.create_tag_in("At risk", churn);
    let webinar = app.fake.create_tag_in("Webinar attended", events);
    let loose = app.fake.create_tag("No category");
    let (id, before) = ada_synced(&app).await;
    // No tag of the category yet: Keap's word that none is applied is written as `{}`.
    wait_tags(&app, &[]).await;
    for tag in [risk, webinar, at_risk, loose] {
        assert!(app.fake.apply_tag_by_hand(id, tag));
    }
    wait_tags(&app, &["At risk", "Churn risk"]).await;
    for tag in [risk, at_risk] {
        assert!(app.fake.remove_tag_by_hand(id, tag));
    }
    wait_tags(&app, &[]).await;
    assert_eq!(changed_events(&app).await, ["[]", "[\"At risk\", \"Churn risk\"]", "[]"], "history");
    // Two more sweeps: nothing written, sent, queued or recorded again.
    let (recorded, swept) =
        (app.count("select count(*) from keap_sync.inbound_event").await, app.fake.requests().len());
    app::eventually(Duration::from_secs(10), "two more sweeps", || async {
        app.fake.requests().iter().skip(swept).filter(|r| r.path.ends_with("/v2/contacts")).count() >= 2
    })
    .await;
    let writes = writes_since(&app, before);
    assert!(writes.is_empty(), "no Keap write: {writes:?}");
    assert_eq!(nothing_outbound(&app).await, 0, "the inbound write was captured as a change to send");
    assert_eq!(app.count("select count(*) from keap_sync.inbound_event").await, recorded, "no event twice");
    let row = app.db.query_one("select email, first_name, notes from users where id = 1", &[]).await.unwrap();
    let kept: (String, String, Option<String>) = (row.get(0), row.get(1), row.get(2));
    assert_eq!(kept, ("ada@example.com".into(), "Ada".into(), None), "no other column touched");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tag_created_in_keap_after_the_start_lands_with_its_name() {
    let app = spawn_app_with(Options { users_ddl: DDL, toml: TOML, ..Options::default() }).await;
    let churn = app.fake.create_tag_category("Churn signals");
    let risk = app.fake.create_tag_in("Churn risk", churn);
    let (id, before) = ada_synced(&app).await;
    assert!(app.fake.apply_tag_by_hand(id, risk));
    wait_tags(&app, &["Churn risk"]).await;
    let lists = |app: &TestApp| app.fake.count(|r| r.method == "GET" && r.path.ends_with("/v1/tags"));
    let read = lists(&app);
    assert!(read >= 1, "the tag list was read");
    // A tag made in Keap now: its id is new to the daemon, which reads the list again.
    let trial = app.fake.create_tag_in("Cancelled trial", churn);
    assert!(app.fake.apply_tag_by_hand(id, trial));
    wait_tags(&app, &["Cancelled trial", "Churn risk"]).await;
    assert_eq!(lists(&app), read + 1, "one more read of the tag list");
    // Never an id in place of a name, at any step.
    let values: Vec<String> = app
        .db
        .query("select value::text from keap_sync.inbound_event where column_name = 'keap_tags'", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert!(values.iter().all(|v| !v.contains(&trial.to_string())), "{values:?}");
    // Sweeps go on; with every id known, the list is not read again.
    let swept = app.fake.requests().len();
    app::eventually(Duration::from_secs(10), "two more sweeps", || async {
        app.fake.requests().iter().skip(swept).filter(|r| r.path.ends_with("/v2/contacts")).count() >= 2
    })
    .await;
    assert_eq!(lists(&app), read + 1, "the list is read only for an unknown id");
    assert!(writes_since(&app, before).is_empty(), "no Keap write");
    assert_eq!(nothing_outbound(&app).await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tags_column_that_is_not_a_text_array_is_refused_with_the_fix() {
    let app = spawn_app_with(Options { users_ddl: DDL, start_daemon: false, ..Options::default() }).await;
    let env = app.env();
    let config =
        Config::from_toml("[inbound]\ntags = { column = \"notes\", category = \"Churn signals\" }\n", &|k| {
            env.get(k).cloned()
        })
        .unwrap();
    let mut db = app::connect(&app.conninfo).await;
    let err = keap_sync::migrate(&mut db, &config.users).await.unwrap_err().to_string();
    assert!(err.contains("inbound.tags") && err.contains("notes is text") && err.contains("text[]"), "{err}");
    let err =
        keap_sync::Daemon::build(config, keap_sync::RunOptions::default()).await.err().expect("refused");
    assert!(err.to_string().contains("text[]"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hooks_install_subscribes_the_tag_events_and_a_tag_arrives_through_a_hook() {
    let port = free_port();
    let toml = format!(
        "[mirror]\nsweep_secs = 3600\nlag_secs = 0\n[hooks]\nlisten = \"127.0.0.1:{port}\"\n\
         [inbound]\ntags = {{ column = \"keap_tags\", category = \"Churn signals\" }}\n"
    );
    let toml: &'static str = Box::leak(toml.into_boxed_str());
    let mut app = spawn_app_with(Options { users_ddl: DDL, toml, ..Options::stopped() }).await;
    let file = app.write_config_file("", "");
    let churn = app.fake.create_tag_category("Churn signals");
    let risk = app.fake.create_tag_in("Churn risk", churn);
    app.start_daemon().await;
    crate::hooks::receiving(port).await;
    let base = format!("http://127.0.0.1:{port}");
    // Keap without the tag events: the missing one is named, nothing subscribed.
    app.fake.set_hook_event_keys(&["contact.add", "contact.edit", "contact.delete", "contactGroup.applied"]);
    let out = crate::hooks::hooks_cli(&app, &file, &["install", "--base-url", &base]).await;
    let said = crate::hooks::text(&out);
    assert!(!out.status.success() && said.contains("contactGroup.removed"), "{said}");
    assert!(app.fake.hooks().is_empty(), "no hook created: {:?}", app.fake.hooks());
    app.fake.set_hook_event_keys(&[
        "contact.add",
        "contact.edit",
        "contact.delete",
        "contactGroup.applied",
        "contactGroup.removed",
    ]);
    let out = crate::hooks::hooks_cli(&app, &file, &["install", "--base-url", &base]).await;
    assert!(out.status.success(), "{}", crate::hooks::text(&out));
    let mut keys: Vec<String> = app
        .fake
        .hooks()
        .into_iter()
        .filter(|h| h.hook_url.ends_with(HOOK_PATH))
        .map(|h| h.event_key)
        .collect();
    keys.sort();
    assert_eq!(
        keys,
        ["contact.add", "contact.delete", "contact.edit", "contactGroup.applied", "contactGroup.removed"]
    );
    let (id, before) = ada_synced(&app).await;
    let swept = app.fake.count(|r| r.query.contains("start_update_time"));
    assert!(app.fake.apply_tag_by_hand(id, risk));
    wait_tags(&app, &["Churn risk"]).await;
    assert_eq!(app.fake.count(|r| r.query.contains("start_update_time")), swept, "the hook, not a sweep");
    let writes = writes_since(&app, before);
    assert!(writes.is_empty(), "no Keap write: {writes:?}");
    assert_eq!(nothing_outbound(&app).await, 0);
}
