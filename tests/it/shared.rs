//! A property both sides may change (issue 29, scope 1; invariants 17 and 18):
//! `owner = "shared"` with `prefer = "app" | "keap"`. A change on one side reaches the other;
//! the same property changed on both sides before either was synced is settled by `prefer`,
//! recorded as one conflict, and then nothing moves: no further call, no table write, over
//! many sweeps (the "two quiet minutes", compressed: the sweep runs every second).

use std::time::Duration;

use keap_sync_testkit::app::{self, spawn_app_with, Options, TestApp};
use serde_json::{json, Value};

use crate::{nothing_outbound, wait_settled, writes_since};

const DDL: &str = "create table public.users (
    id          bigserial primary key,
    email       text,
    first_name  text,
    last_name   text,
    job         text
)";

async fn shared_app(prefer: &str) -> TestApp {
    let toml = format!(
        "[mirror]\nsweep_secs = 1\nlag_secs = 0\noverlap_secs = 1\n\
         [contact]\njob_title = {{ column = \"job\", owner = \"shared\", prefer = \"{prefer}\" }}\n"
    );
    spawn_app_with(Options { users_ddl: DDL, toml: Box::leak(toml.into_boxed_str()), ..Options::default() })
        .await
}

/// Inserts Ada, an engineer, and waits until her contact exists and the mirror has her; her
/// contact's id and the number of requests so far.
async fn ada_synced(app: &TestApp) -> (i64, usize) {
    let (id, requests) = ada_inserted(app).await;
    assert_eq!(keap_job(app, id).as_deref(), Some("Engineer"), "the first sync sends the shared property");
    (id, requests)
}

/// [`ada_synced`] for any mapping.
async fn ada_inserted(app: &TestApp) -> (i64, usize) {
    app.exec(
        "insert into users (id, email, first_name, job) values (1, 'ada@example.com', 'Ada', 'Engineer')",
    )
    .await;
    wait_settled(app).await;
    crate::wait_mirrored(app, "1").await;
    let id = app.fake.contacts_with_email("ada@example.com")[0].id;
    (id, app.fake.requests().len())
}

async fn job(app: &TestApp) -> Option<String> {
    app.db.query_one("select job from users where id = 1", &[]).await.unwrap().get(0)
}

fn keap_job(app: &TestApp, id: i64) -> Option<String> {
    let contact = app.fake.contact(id).unwrap();
    contact.extra.get("job_title").and_then(Value::as_str).map(str::to_owned)
}

/// Sets the job title in Keap as a person would in Keap's web app.
fn edit_in_keap(app: &TestApp, id: i64, title: &str) {
    assert!(app.fake.edit_contact_json(id, |m| {
        m.insert("job_title".into(), json!(title));
    }));
}

async fn conflicts(app: &TestApp) -> Vec<(String, String, Option<String>, Option<String>)> {
    let rows = app
        .db
        .query(
            "select column_name, winner, app_value, keap_value from keap_sync.conflict
              where user_key = '1' order by id",
            &[],
        )
        .await
        .unwrap();
    rows.iter().map(|r| (r.get(0), r.get(1), r.get(2), r.get(3))).collect()
}

/// Changes the job on both sides before either is synced: the row's update stays uncommitted
/// (so not captured, and not visible to the daemon) while Keap's edit is made.
async fn edit_both(app: &TestApp, id: i64) {
    app.db.batch_execute("begin; update users set job = 'Manager' where id = 1").await.unwrap();
    edit_in_keap(app, id, "Director");
    app.db.batch_execute("commit").await.unwrap();
}

/// Waits for `n` more sweeps of the daemon (its v2 listings), and for the outbox to settle.
async fn sweeps(app: &TestApp, n: usize) {
    let from = app.fake.requests().len();
    app::eventually(Duration::from_secs(20), "more sweeps", || async {
        app.fake.requests().iter().skip(from).filter(|r| r.path.contains("/v2/contacts")).count() >= n
    })
    .await;
    wait_settled(app).await;
}

/// The calls to Keap since request `from` other than the sweeps' listings (and token refreshes).
fn calls_but_sweeps(app: &TestApp, from: usize) -> Vec<String> {
    let requests = app.fake.requests().into_iter().skip(from);
    let other = requests.filter(|r| !r.path.contains("/v2/contacts") && !r.path.ends_with("/token"));
    other.map(|r| format!("{} {}", r.method, r.path)).collect()
}

/// Both sides converge on `want`, with exactly one conflict recorded, won by `winner`.
async fn converged(app: &TestApp, id: i64, want: &str, winner: &str) {
    converged_on(app, || keap_job(app, id), want, winner).await;
}

/// [`converged`], with Keap's side read by `keap`.
async fn converged_on(app: &TestApp, keap: impl Fn() -> Option<String>, want: &str, winner: &str) {
    app::eventually(Duration::from_secs(20), "both sides hold the preferred value, one conflict", || async {
        job(app).await.as_deref() == Some(want)
            && keap().as_deref() == Some(want)
            && !conflicts(app).await.is_empty()
    })
    .await;
    let recorded = conflicts(app).await;
    let expected =
        ("job".to_owned(), winner.to_owned(), Some("Manager".to_owned()), Some("Director".to_owned()));
    assert_eq!(recorded, vec![expected], "one conflict, with both sides' values and the winner");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn edited_on_both_sides_keap_wins_where_preferred_with_one_conflict_and_then_quiet() {
    let app = shared_app("keap").await;
    let (id, before) = ada_synced(&app).await;
    edit_both(&app, id).await;
    converged(&app, id, "Director", "keap").await;
    let settled = app.fake.requests().len();
    sweeps(&app, 5).await;
    assert_eq!(calls_but_sweeps(&app, settled), Vec::<String>::new(), "quiet: only the sweeps call Keap");
    assert_eq!(job(&app).await.as_deref(), Some("Director"));
    assert_eq!(keap_job(&app, id).as_deref(), Some("Director"));
    assert_eq!(conflicts(&app).await.len(), 1, "no second conflict");
    let writes = writes_since(&app, before);
    assert!(writes.is_empty(), "Keap's value wins: nothing is written to Keap: {writes:?}");
    assert_eq!(nothing_outbound(&app).await, 0);
    // `status` shows it, in text and JSON.
    let config = app.write_config_file("", "");
    let text = app.run_cli(&["--config", config.to_str().unwrap(), "status"]);
    let text = String::from_utf8_lossy(&text.stdout);
    assert!(text.contains("conflicts over shared properties: 1 (1 in the last day"), "{text}");
    let json = app.run_cli(&["--config", config.to_str().unwrap(), "status", "--json"]);
    let json: Value = serde_json::from_slice(&json.stdout).expect("status --json");
    assert_eq!(
        (json["conflicts"]["total"].as_i64(), json["conflicts"]["last_day"].as_i64()),
        (Some(1), Some(1))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn edited_on_both_sides_the_app_wins_where_preferred_with_one_conflict_and_then_quiet() {
    let app = shared_app("app").await;
    let (id, before) = ada_synced(&app).await;
    edit_both(&app, id).await;
    converged(&app, id, "Manager", "app").await;
    let settled = app.fake.requests().len();
    sweeps(&app, 5).await;
    assert_eq!(calls_but_sweeps(&app, settled), Vec::<String>::new(), "quiet: only the sweeps call Keap");
    assert_eq!(job(&app).await.as_deref(), Some("Manager"));
    assert_eq!(keap_job(&app, id).as_deref(), Some("Manager"));
    assert_eq!(conflicts(&app).await.len(), 1, "no second conflict");
    let writes = writes_since(&app, before);
    assert_eq!(writes.len(), 1, "one PATCH sends the app's value: {writes:?}");
    assert!(writes[0].query.contains("update_mask=job_title"), "{}", writes[0].query);
    assert_eq!(nothing_outbound(&app).await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_change_on_one_side_reaches_the_other_with_no_conflict_and_no_echo() {
    let app = shared_app("app").await;
    let (id, before) = ada_synced(&app).await;
    // Keap's side alone: into the column, not captured, nothing written back to Keap.
    edit_in_keap(&app, id, "Architect");
    app::eventually(Duration::from_secs(20), "Keap's title in users.job", || async {
        job(&app).await.as_deref() == Some("Architect")
    })
    .await;
    sweeps(&app, 3).await;
    assert_eq!(nothing_outbound(&app).await, 0, "nothing left to send");
    // The mark itself: an update with keap_sync.origin = 'keap' is not captured, another is.
    for (origin, captured) in [("keap", 0), ("", 1)] {
        app.db
            .batch_execute(&format!(
                "begin; select set_config('keap_sync.origin', '{origin}', true);
                 update users set job = 'Marked' where id = 1"
            ))
            .await
            .unwrap();
        let logged = app.count("select count(*) from keap_sync.change").await;
        app.db.batch_execute("rollback").await.unwrap();
        assert_eq!(logged, captured, "origin {origin:?}: captured {logged}");
    }
    assert!(writes_since(&app, before).is_empty(), "no Keap write: {:?}", writes_since(&app, before));
    // The app's side alone, later: one PATCH of it.
    let mid = app.fake.requests().len();
    app.exec("update users set job = 'Lead' where id = 1").await;
    wait_settled(&app).await;
    assert_eq!(keap_job(&app, id).as_deref(), Some("Lead"));
    sweeps(&app, 3).await;
    let writes = writes_since(&app, mid);
    assert_eq!(writes.len(), 1, "one PATCH: {writes:?}");
    assert_eq!(job(&app).await.as_deref(), Some("Lead"), "our own write does not come back");
    assert!(conflicts(&app).await.is_empty(), "changes one after the other are no conflict");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_first_name_shared_under_users_follows_a_correction_in_keap() {
    let toml = "[mirror]\nsweep_secs = 1\nlag_secs = 0\noverlap_secs = 1\n\
                [users]\ngiven_name = { column = \"first_name\", owner = \"shared\", prefer = \"app\" }\n";
    let app = spawn_app_with(Options { users_ddl: DDL, toml, ..Options::default() }).await;
    let (id, before) = ada_inserted(&app).await;
    assert!(app.fake.edit_contact_json(id, |m| {
        m.insert("given_name".into(), json!("Augusta"));
    }));
    app::eventually(Duration::from_secs(20), "Keap's correction in users.first_name", || async {
        let row = app.db.query_one("select first_name from users where id = 1", &[]).await.unwrap();
        row.get::<_, Option<String>>(0).as_deref() == Some("Augusta")
    })
    .await;
    sweeps(&app, 3).await;
    assert!(writes_since(&app, before).is_empty(), "no Keap write: {:?}", writes_since(&app, before));
    assert_eq!(nothing_outbound(&app).await, 0);
    assert!(conflicts(&app).await.is_empty());
}

/// `reconcile --apply` repairs drift by delivering again, having cleared keap-sync's record of
/// what Keap holds; a shared property keeps its base, so Keap's correction made while no daemon
/// ran is taken into the column, not overwritten with the row's older value.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconcile_apply_keeps_a_shared_propertys_base_and_takes_keaps_correction() {
    let mut app = shared_app("app").await;
    let (id, _) = ada_synced(&app).await;
    app.stop_daemon().await;
    edit_in_keap(&app, id, "Architect");
    let before = app.fake.requests().len();
    let options = keap_sync::ReconcileOptions { apply: true, ..Default::default() };
    let report = keap_sync::reconcile(&app.config(), &[], options, &mut |_| {}).await.expect("reconcile");
    assert_eq!(report.queued, 1, "{report:?}");
    app.start_daemon().await;
    app::eventually(Duration::from_secs(20), "Keap's correction in users.job", || async {
        job(&app).await.as_deref() == Some("Architect")
    })
    .await;
    wait_settled(&app).await;
    assert_eq!(keap_job(&app, id).as_deref(), Some("Architect"), "Keap's correction stands");
    let writes = writes_since(&app, before);
    assert!(
        writes.iter().all(|w| !w.query.contains("job_title") && !w.body.contains("job_title")),
        "the row's older title is not sent: {writes:?}"
    );
    assert!(conflicts(&app).await.is_empty(), "one side changed: no conflict");
}

/// The job mapped to the custom field "Role" (named by name) instead of `job_title`, shared;
/// the app and the id of the field in Keap's model.
async fn shared_custom_app(prefer: &str) -> (TestApp, i64) {
    let toml = format!(
        "[mirror]\nsweep_secs = 1\nlag_secs = 0\noverlap_secs = 1\n\
         [[contact.custom_fields]]\nname = \"Role\"\n\
         value = {{ column = \"job\", owner = \"shared\", prefer = \"{prefer}\" }}\n"
    );
    let toml = Box::leak(toml.into_boxed_str());
    let mut app =
        spawn_app_with(Options { users_ddl: DDL, toml, start_daemon: false, ..Options::default() }).await;
    let role = app.fake.add_custom_field("Role", "Text");
    app.start_daemon().await;
    (app, role)
}

/// The content of custom field `field` on contact `id` in Keap.
fn keap_custom(app: &TestApp, id: i64, field: i64) -> Option<String> {
    let contact = app.fake.contact_json(id)?;
    let fields = contact.get("custom_fields")?.as_array()?.clone();
    let item = fields.into_iter().find(|f| f.get("id") == Some(&json!(field)))?;
    item.get("content")?.as_str().map(str::to_owned)
}

/// Sets custom field `field` in Keap as a person would in Keap's web app.
fn edit_custom_in_keap(app: &TestApp, id: i64, field: i64, content: &str) {
    assert!(app.fake.edit_contact_json(id, |m| {
        m.insert("custom_fields".into(), json!([{"id": field, "content": content}]));
    }));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_custom_field_edited_on_both_sides_keap_wins_where_preferred_with_one_conflict_and_then_quiet() {
    let (app, role) = shared_custom_app("keap").await;
    let (id, before) = ada_inserted(&app).await;
    assert_eq!(keap_custom(&app, id, role).as_deref(), Some("Engineer"), "the first sync sends it");
    app.db.batch_execute("begin; update users set job = 'Manager' where id = 1").await.unwrap();
    edit_custom_in_keap(&app, id, role, "Director");
    app.db.batch_execute("commit").await.unwrap();
    converged_on(&app, || keap_custom(&app, id, role), "Director", "keap").await;
    let settled = app.fake.requests().len();
    sweeps(&app, 5).await;
    assert_eq!(calls_but_sweeps(&app, settled), Vec::<String>::new(), "quiet: only the sweeps call Keap");
    assert_eq!(job(&app).await.as_deref(), Some("Director"));
    assert_eq!(keap_custom(&app, id, role).as_deref(), Some("Director"));
    assert_eq!(conflicts(&app).await.len(), 1, "no second conflict");
    let writes = writes_since(&app, before);
    assert!(writes.is_empty(), "Keap's value wins: nothing is written to Keap: {writes:?}");
    assert_eq!(nothing_outbound(&app).await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_custom_field_changed_in_keap_alone_reaches_its_column_with_no_conflict_and_no_echo() {
    let (app, role) = shared_custom_app("app").await;
    let (id, before) = ada_inserted(&app).await;
    edit_custom_in_keap(&app, id, role, "Architect");
    app::eventually(Duration::from_secs(20), "Keap's role in users.job", || async {
        job(&app).await.as_deref() == Some("Architect")
    })
    .await;
    sweeps(&app, 3).await;
    assert!(writes_since(&app, before).is_empty(), "no Keap write: {:?}", writes_since(&app, before));
    assert_eq!(nothing_outbound(&app).await, 0, "the inbound write was captured as a change to send");
    assert!(conflicts(&app).await.is_empty(), "one side changed: no conflict");
}
