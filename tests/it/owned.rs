//! Ownership (issue 29, scope 1; invariant 17): a mapped property with `owner = "keap"` flows
//! only from Keap. A phone edited in Keap reaches `users.phone` within a sweep, costs no Keap
//! write and enqueues nothing (invariant 18); the app changing that column sends nothing, and
//! an app-owned change of the same row goes out without it; a new user's create leaves it out;
//! an empty value in Keap blanks nothing (invariant 21).

use std::time::Duration;

use keap_sync::config::Config;
use keap_sync_testkit::app::{self, spawn_app_with, Options, TestApp};
use serde_json::{json, Value};

use crate::{nothing_outbound, wait_settled, writes_since};

const DDL: &str = "create table public.users (
    id          bigserial primary key,
    email       text,
    first_name  text,
    last_name   text,
    middle      text,
    phone       text,
    country     char(3),
    notes       text
)";

/// Sweeps every second, to the moment; PHONE1's number is Keap's, the middle name the app's.
const TOML: &str = "[mirror]\nsweep_secs = 1\nlag_secs = 0\noverlap_secs = 1\n\
                    [contact]\nmiddle_name = \"middle\"\n\
                    [contact.phone_numbers.PHONE1]\nnumber = { column = \"phone\", owner = \"keap\" }\n";

async fn owned_app() -> TestApp {
    spawn_app_with(Options { users_ddl: DDL, toml: TOML, ..Options::default() }).await
}

/// Inserts Ada with the app's own phone, waits until her contact exists and the mirror has
/// her, and returns her contact's id and the number of requests so far.
async fn ada_synced(app: &TestApp) -> (i64, usize) {
    app.exec(
        "insert into users (id, email, first_name, middle, phone)
         values (1, 'ada@example.com', 'Ada', 'M', '+44 20 0000 0001')",
    )
    .await;
    wait_settled(app).await;
    crate::wait_mirrored(app, "1").await;
    let id = app.fake.contacts_with_email("ada@example.com")[0].id;
    (id, app.fake.requests().len())
}

async fn phone(app: &TestApp) -> Option<String> {
    app.db.query_one("select phone from users where id = 1", &[]).await.unwrap().get(0)
}

/// Sets Keap's PHONE1 of contact `id` as a person would in Keap's web app (its update time moves).
fn edit_phone(app: &TestApp, id: i64, phones: Value) {
    assert!(app.fake.edit_contact_json(id, |m| {
        m.insert("phone_numbers".into(), phones);
    }));
}

/// Waits for a sweep that stored Keap's current PHONE1 list of Ada's contact (`phones`), then
/// for one more sweep, so that the inbound pass after that store has run.
async fn swept(app: &TestApp, phones: &Value) {
    let want = json!({ "phone_numbers": phones }).to_string();
    app::eventually(Duration::from_secs(10), "a sweep stored Keap's phones", || async {
        let rows = app
            .db
            .query("select contact from keap_sync.mirror where email1 = 'ada@example.com'", &[])
            .await
            .unwrap();
        let stored: Option<Value> = rows.first().map(|r| r.get(0));
        let want: Value = serde_json::from_str(&want).unwrap();
        stored.is_some_and(|c| c.get("phone_numbers").unwrap_or(&json!([])) == &want["phone_numbers"])
    })
    .await;
    let from = app.fake.requests().len();
    app::eventually(Duration::from_secs(10), "one more sweep", || async {
        app.fake.requests().iter().skip(from).filter(|r| r.path.contains("/v2/contacts")).count() >= 2
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_phone_edited_in_keap_reaches_the_column_within_a_sweep_with_no_write_and_no_echo() {
    let app = owned_app().await;
    let (id, before) = ada_synced(&app).await;
    app::eventually(Duration::from_secs(10), "a sweep", || async {
        app.fake.requests().iter().any(|r| r.path.contains("/v2/contacts"))
    })
    .await;
    let listed = app.fake.requests().into_iter().rfind(|r| r.path.contains("/v2/contacts")).unwrap();
    assert!(listed.query.contains("phone_numbers"), "the listing asks for Keap's phones: {}", listed.query);
    edit_phone(&app, id, json!([{"field": "PHONE1", "number": "+1 555 0199", "type": "Mobile"}]));
    app::eventually(Duration::from_secs(10), "Keap's phone in users.phone", || async {
        phone(&app).await.as_deref() == Some("+1 555 0199")
    })
    .await;
    assert_eq!(nothing_outbound(&app).await, 0, "the inbound write was captured as a change to send");
    let events = app
        .count(
            "select count(*) from keap_sync.inbound_event
              where user_key = '1' and column_name = 'phone' and value = '\"+1 555 0199\"' and changed",
        )
        .await;
    assert_eq!(events, 1, "what came in is kept as history");
    // An empty number, then no PHONE1 at all, in Keap: nothing is blanked.
    let empty = json!([{"field": "PHONE1", "number": ""}]);
    edit_phone(&app, id, empty.clone());
    swept(&app, &empty).await;
    edit_phone(&app, id, json!([]));
    swept(&app, &json!([])).await;
    assert_eq!(phone(&app).await.as_deref(), Some("+1 555 0199"), "an empty value in Keap writes nothing");
    let writes = writes_since(&app, before);
    assert!(writes.is_empty(), "no Keap write: {writes:?}");
    assert_eq!(nothing_outbound(&app).await, 0);
    let row =
        app.db.query_one("select email, first_name, middle from users where id = 1", &[]).await.unwrap();
    let kept: (String, String, String) = (row.get(0), row.get(1), row.get(2));
    assert_eq!(kept, ("ada@example.com".into(), "Ada".into(), "M".into()), "no other column touched");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_app_changing_a_keap_owned_column_sends_nothing_and_its_other_changes_leave_it_out() {
    let app = owned_app().await;
    let (id, before) = ada_synced(&app).await;
    // Within the transaction, so the daemon cannot have folded it yet: nothing was captured.
    app.db.batch_execute("begin; update users set phone = '+1 555 0000' where id = 1").await.unwrap();
    let captured = app.count("select count(*) from keap_sync.change").await;
    app.db.batch_execute("commit").await.unwrap();
    assert_eq!(captured, 0, "a change of a Keap-owned column is not watched");
    // The app-owned column of the same row, together with the phone again: one patch, no phone.
    app.exec("update users set middle = 'Q', phone = '+1 555 0001' where id = 1").await;
    wait_settled(&app).await;
    let writes = writes_since(&app, before);
    assert_eq!(writes.len(), 1, "one call, for the middle name: {writes:?}");
    let patch = &writes[0];
    assert_eq!(
        (patch.method.as_str(), patch.path.as_str()),
        ("PATCH", format!("/crm/rest/v1/contacts/{id}").as_str())
    );
    assert!(patch.query.contains("update_mask=middle_name"), "{}", patch.query);
    assert!(!patch.query.contains("phone") && !patch.body.contains("phone"), "{patch:?}");
    let c = app.fake.contact_json(id).unwrap();
    assert_eq!(c["middle_name"], json!("Q"));
    assert_eq!(c["phone_numbers"], json!([]), "Keap's phone untouched: {c}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_users_create_does_not_carry_the_keap_owned_property() {
    let app = owned_app().await;
    let (id, _) = ada_synced(&app).await;
    let create = app
        .fake
        .requests()
        .into_iter()
        .find(|r| r.method == "PUT" && r.path.ends_with("/v1/contacts"))
        .expect("the create");
    assert!(create.body.contains("\"middle_name\":\"M\""), "{}", create.body);
    assert!(!create.body.contains("phone"), "the create carries Keap's property: {}", create.body);
    assert_eq!(app.fake.contact_json(id).unwrap()["phone_numbers"], json!([]));
    // Keap has no phone: the app's value stays (nothing is blanked).
    assert_eq!(phone(&app).await.as_deref(), Some("+44 20 0000 0001"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn owner_keap_on_an_sql_expression_a_fixed_length_or_an_outbound_read_column_is_refused() {
    let app = spawn_app_with(Options { users_ddl: DDL, start_daemon: false, ..Options::default() }).await;
    let env = app.env();
    let load = |toml: &str| Config::from_toml(toml, &|k| env.get(k).cloned());
    let err = load("[contact]\njob_title = { sql = \"upper(notes)\", owner = \"keap\" }\n").unwrap_err();
    let err = err.to_string();
    assert!(
        err.contains("contact.job_title")
            && err.contains("owner = \"keap\" needs a column")
            && err.contains("SQL"),
        "{err}"
    );
    let err =
        load("[contact]\njob_title = { column = \"notes\", owner = \"Keap\" }\n").unwrap_err().to_string();
    assert!(err.contains("\"app\"") && err.contains("\"keap\""), "names the valid owners: {err}");
    // Found when the mapping meets the table: a char(3) column, and a column an outbound SQL
    // expression reads.
    let mut db = app::connect(&app.conninfo).await;
    let fixed =
        load("[contact.addresses.BILLING]\ncountry_code = { column = \"country\", owner = \"keap\" }\n");
    let err = keap_sync::migrate(&mut db, &fixed.unwrap().users).await.unwrap_err().to_string();
    assert!(err.contains("contact.addresses.BILLING.country_code") && err.contains("text column"), "{err}");
    let read = load(
        "[contact]\njob_title = { column = \"notes\", owner = \"keap\" }\nspouse_name = { sql = \"upper(notes)\" }\n",
    );
    let err = keap_sync::migrate(&mut db, &read.unwrap().users).await.unwrap_err().to_string();
    assert!(err.contains("contact.job_title") && err.contains("one owner"), "{err}");
}

const SLOTS_DDL: &str = "create table public.users (
    id          bigserial primary key,
    email       text,
    first_name  text,
    last_name   text,
    middle      text,
    work_email  text,
    plan        text
)";

/// EMAIL2 and the custom field "Plan" (named by name) are Keap's, the middle name the app's.
const SLOTS_TOML: &str = "[mirror]\nsweep_secs = 1\nlag_secs = 0\noverlap_secs = 1\n\
                          [contact]\nmiddle_name = \"middle\"\n\
                          [contact.email_addresses]\nEMAIL2 = { column = \"work_email\", owner = \"keap\" }\n\
                          [[contact.custom_fields]]\nname = \"Plan\"\nvalue = { column = \"plan\", owner = \"keap\" }\n";

/// The app with Keap-owned EMAIL2 and custom field, Keap's model having "Plan"; its id.
async fn slots_app() -> (TestApp, i64) {
    let mut app = spawn_app_with(Options {
        users_ddl: SLOTS_DDL,
        toml: SLOTS_TOML,
        start_daemon: false,
        ..Options::default()
    })
    .await;
    let plan = app.fake.add_custom_field("Plan", "Text");
    app.start_daemon().await;
    (app, plan)
}

/// Inserts Ada with the app's own EMAIL2 and plan, waits until her contact exists and the
/// mirror has her; her contact's id and the number of requests so far.
async fn ada_with_slots(app: &TestApp) -> (i64, usize) {
    app.exec(
        "insert into users (id, email, first_name, middle, work_email, plan)
         values (1, 'ada@example.com', 'Ada', 'M', 'ada@app.example', 'Basic')",
    )
    .await;
    wait_settled(app).await;
    crate::wait_mirrored(app, "1").await;
    let id = app.fake.contacts_with_email("ada@example.com")[0].id;
    (id, app.fake.requests().len())
}

async fn column(app: &TestApp, name: &str) -> Option<String> {
    let sql = format!("select {name} from users where id = 1");
    app.db.query_one(&sql, &[]).await.unwrap().get(0)
}

/// The last listing the daemon's sweep asked Keap for, once there is one.
async fn a_listing(app: &TestApp) -> String {
    app::eventually(Duration::from_secs(10), "a sweep", || async {
        app.fake.requests().iter().any(|r| r.path.contains("/v2/contacts"))
    })
    .await;
    app.fake.requests().into_iter().rfind(|r| r.path.contains("/v2/contacts")).unwrap().query
}

/// The rows recorded in `keap_sync.inbound_event` for `column` with `value`, that changed the row.
async fn events(app: &TestApp, column: &str, value: &str) -> i64 {
    let value = json!(value).to_string().replace('\'', "''");
    app.count(&format!(
        "select count(*) from keap_sync.inbound_event
          where user_key = '1' and column_name = '{column}' and value = '{value}' and changed"
    ))
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_keap_owned_email2_edited_in_keap_reaches_its_column_within_a_sweep_with_no_write_and_no_echo() {
    let (app, _) = slots_app().await;
    let (id, before) = ada_with_slots(&app).await;
    assert!(a_listing(&app).await.contains("email_addresses"));
    assert!(app.fake.edit_contact_json(id, |m| {
        m.insert(
            "email_addresses".into(),
            json!([{"field": "EMAIL1", "email": "ada@example.com"}, {"field": "EMAIL2", "email": "Ada@Work.example"}]),
        );
    }));
    app::eventually(Duration::from_secs(10), "Keap's EMAIL2 in users.work_email", || async {
        column(&app, "work_email").await.as_deref() == Some("Ada@Work.example")
    })
    .await;
    assert_eq!(nothing_outbound(&app).await, 0, "the inbound write was captured as a change to send");
    assert_eq!(events(&app, "work_email", "Ada@Work.example").await, 1, "what came in is kept as history");
    let writes = writes_since(&app, before);
    assert!(writes.is_empty(), "no Keap write: {writes:?}");
    assert_eq!(
        (column(&app, "email").await, column(&app, "plan").await, column(&app, "middle").await),
        (Some("ada@example.com".into()), Some("Basic".into()), Some("M".into())),
        "no other column touched"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_keap_owned_custom_field_named_by_name_reaches_its_column_within_a_sweep_with_no_write_and_no_echo()
{
    let (app, plan) = slots_app().await;
    let (id, before) = ada_with_slots(&app).await;
    let listing = a_listing(&app).await;
    assert!(listing.contains("custom_fields"), "the listing asks for Keap's custom fields: {listing}");
    assert!(app.fake.edit_contact_json(id, |m| {
        m.insert("custom_fields".into(), json!([{"id": plan, "content": "Enterprise"}]));
    }));
    app::eventually(Duration::from_secs(10), "Keap's Plan in users.plan", || async {
        column(&app, "plan").await.as_deref() == Some("Enterprise")
    })
    .await;
    assert_eq!(nothing_outbound(&app).await, 0, "the inbound write was captured as a change to send");
    assert_eq!(events(&app, "plan", "Enterprise").await, 1, "what came in is kept as history");
    // Keap's field emptied: nothing is blanked.
    assert!(app.fake.edit_contact_json(id, |m| {
        m.insert("custom_fields".into(), json!([{"id": plan, "content": ""}]));
    }));
    let from = app.fake.requests().len();
    app::eventually(Duration::from_secs(10), "two more sweeps", || async {
        app.fake.requests().iter().skip(from).filter(|r| r.path.contains("/v2/contacts")).count() >= 2
    })
    .await;
    assert_eq!(
        column(&app, "plan").await.as_deref(),
        Some("Enterprise"),
        "an empty value in Keap writes nothing"
    );
    let writes = writes_since(&app, before);
    assert!(writes.is_empty(), "no Keap write: {writes:?}");
    assert_eq!(nothing_outbound(&app).await, 0);
    assert_eq!(
        column(&app, "work_email").await.as_deref(),
        Some("ada@app.example"),
        "no other column touched"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_app_changing_a_keap_owned_email2_or_custom_field_sends_nothing() {
    let (app, _) = slots_app().await;
    let (id, before) = ada_with_slots(&app).await;
    let create = app.fake.requests().into_iter().find(|r| r.method == "PUT").expect("the create");
    assert!(
        !create.body.contains("ada@app.example") && !create.body.contains("custom_fields"),
        "the create carries Keap's properties: {}",
        create.body
    );
    app.db
        .batch_execute("begin; update users set work_email = 'x@app.example', plan = 'Pro' where id = 1")
        .await
        .unwrap();
    let captured = app.count("select count(*) from keap_sync.change").await;
    app.db.batch_execute("commit").await.unwrap();
    assert_eq!(captured, 0, "a change of a Keap-owned column is not watched");
    app.exec("update users set middle = 'Q', work_email = 'y@app.example', plan = 'Max' where id = 1").await;
    wait_settled(&app).await;
    let writes = writes_since(&app, before);
    assert_eq!(writes.len(), 1, "one call, for the middle name: {writes:?}");
    assert!(writes[0].query.contains("update_mask=middle_name"), "{}", writes[0].query);
    assert!(
        !writes[0].query.contains("email_addresses") && !writes[0].query.contains("custom_fields"),
        "{:?}",
        writes[0]
    );
    assert!(!writes[0].body.contains("app.example") && !writes[0].body.contains("Max"), "{:?}", writes[0]);
    let c = app.fake.contact_json(id).unwrap();
    assert_eq!(c["middle_name"], json!("Q"));
    let emails: Vec<&str> =
        c["email_addresses"].as_array().unwrap().iter().filter_map(|e| e["email"].as_str()).collect();
    assert_eq!(emails, ["ada@example.com"], "Keap's addresses untouched: {c}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_keap_owned_custom_field_keaps_model_lacks_is_refused_at_start_up_naming_its_key() {
    let app = spawn_app_with(Options {
        users_ddl: SLOTS_DDL,
        toml: SLOTS_TOML,
        start_daemon: false,
        ..Options::default()
    })
    .await;
    let err = match keap_sync::Daemon::build(app.config(), keap_sync::RunOptions::default()).await {
        Ok(_) => panic!("a daemon started with a Keap-owned custom field Keap does not have"),
        Err(e) => e.to_string(),
    };
    assert!(err.contains("contact.custom_fields[0]") && err.contains("Plan"), "{err}");
}
