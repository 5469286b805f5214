//! Keap talks back through hooks (issue 29, scope 4): the receiver answers Keap's handshake,
//! queues the ids of a delivery and answers at once; the daemon reads the queued contacts
//! (one v2 listing by ids) into the mirror and the inbound pass writes the Keap-owned columns.
//! The sweep is effectively off here (`sweep_secs = 3600`), so only a hook can bring a change.

use std::time::Duration;

use keap_sync_testkit::app::{self, spawn_app_with, Options, TestApp, HOOK_PATH};
use keap_sync_testkit::fake::HookOptions;
use serde_json::json;

use crate::{free_port, nothing_outbound, wait_settled, writes_since};

const DDL: &str = "create table public.users (
    id                 bigserial primary key,
    email              text,
    first_name         text,
    last_name          text,
    marketing_opt_out  boolean not null default false,
    phone              text,
    notes              text
)";

/// `[inbound]` opt-out and a Keap-owned phone.
const MAPPING: &str = "[inbound]\nemail_opt_out = \"marketing_opt_out\"\n\
                       [contact.phone_numbers.PHONE1]\nnumber = { column = \"phone\", owner = \"keap\" }\n";

/// The app with its receiver on a free port, the sweep effectively off, `extra` appended;
/// returns it and the receiver's URL (secret path included).
async fn hooked_app(extra: &str) -> (TestApp, String) {
    let port = free_port();
    let toml = format!("[mirror]\nsweep_secs = 3600\n[hooks]\nlisten = \"127.0.0.1:{port}\"\n{extra}");
    let toml: &'static str = Box::leak(toml.into_boxed_str());
    let app = spawn_app_with(Options { users_ddl: DDL, toml, ..Options::default() }).await;
    receiving(port).await;
    (app, format!("http://127.0.0.1:{port}/{HOOK_PATH}"))
}

/// Waits until the daemon (started in the background) accepts connections on `port`.
pub(crate) async fn receiving(port: u16) {
    app::eventually(Duration::from_secs(20), "the hook receiver listening", || async {
        tokio::net::TcpStream::connect(("127.0.0.1", port)).await.is_ok()
    })
    .await;
}

/// Subscribes the receiver to `contact.edit` in the fake; the handshake must verify it.
async fn subscribed(app: &TestApp, url: &str) {
    let hook = app.fake.subscribe_hook("contact.edit", url).await;
    assert_eq!(hook.status, "Verified", "the receiver answered the handshake");
}

/// Inserts Ada, waits until her contact exists; returns its id and the requests so far.
async fn ada_synced(app: &TestApp) -> (i64, usize) {
    app.exec("insert into users (id, email, first_name) values (1, 'ada@example.com', 'Ada')").await;
    wait_settled(app).await;
    let id = app.fake.contacts_with_email("ada@example.com")[0].id;
    (id, app.fake.requests().len())
}

/// No listing by update time (a sweep) since `from`: only reads by id.
fn no_sweep_since(app: &TestApp, from: usize) {
    let swept =
        app.fake.requests().into_iter().skip(from).filter(|r| r.query.contains("start_update_time")).count();
    assert_eq!(swept, 0, "a sweep ran; this test wants the hook alone");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unsubscribe_in_keap_reaches_the_column_within_seconds_through_a_hook() {
    let (app, url) = hooked_app(MAPPING).await;
    subscribed(&app, &url).await;
    let (_, before) = ada_synced(&app).await;
    app.fake.set_email_status("ada@example.com", "ListUnsubscribe");
    app::eventually(Duration::from_secs(5), "the opt-out in users.marketing_opt_out", || async {
        app.db.query_one("select marketing_opt_out from users where id = 1", &[]).await.unwrap().get(0)
    })
    .await;
    let read: Vec<_> =
        app.fake.requests().into_iter().skip(before).filter(|r| r.path.ends_with("/v2/contacts")).collect();
    assert!(read.iter().all(|r| r.query.contains("contact_ids")), "read by id: {read:?}");
    no_sweep_since(&app, 0);
    let writes = writes_since(&app, before);
    assert!(writes.is_empty(), "no Keap write: {writes:?}");
    assert_eq!(nothing_outbound(&app).await, 0, "nothing enqueued outbound");
    assert_eq!(app.count("select count(*) from keap_sync.hook_queue").await, 0, "the queue is drained");
    let attempts = app.fake.hook_attempts();
    assert!(!attempts.is_empty() && attempts.iter().all(|a| a.status == Some(200)), "{attempts:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_keap_owned_phone_edited_in_keap_reaches_the_column_through_a_hook() {
    let (app, url) = hooked_app(MAPPING).await;
    subscribed(&app, &url).await;
    let (id, before) = ada_synced(&app).await;
    assert!(app.fake.edit_contact_json(id, |m| {
        m.insert(
            "phone_numbers".into(),
            json!([{"field": "PHONE1", "number": "+1 555 0199", "type": "Mobile"}]),
        );
    }));
    app::eventually(Duration::from_secs(5), "Keap's phone in users.phone", || async {
        let phone: Option<String> =
            app.db.query_one("select phone from users where id = 1", &[]).await.unwrap().get(0);
        phone.as_deref() == Some("+1 555 0199")
    })
    .await;
    no_sweep_since(&app, 0);
    assert!(writes_since(&app, before).is_empty(), "no Keap write");
    assert_eq!(nothing_outbound(&app).await, 0, "nothing enqueued outbound");
}

/// Ada synced with `contact.add` and `contact.edit` subscribed, and her contact in the mirror
/// as a full listing read it (`keap-sync reconcile`), then applied by a hook's read so that
/// nothing is left due for the inbound pass; returns her contact's id.
async fn ada_listed(app: &TestApp, url: &str) -> i64 {
    for key in ["contact.add", "contact.edit"] {
        let hook = app.fake.subscribe_hook(key, url).await;
        assert_eq!(hook.status, "Verified", "the receiver answered the handshake for {key}");
    }
    let (id, _) = ada_synced(app).await;
    crate::wait_mirrored(app, "1").await;
    let file = app.write_config_file("", "");
    let out = cli(app, &file, &["reconcile"]).await;
    assert!(out.status.success(), "{}", text(&out));
    let asked = app.fake.count(|r| r.query.contains("contact_ids"));
    app.fake.fire_hook("contact.edit", &[id]);
    app::eventually(Duration::from_secs(10), "Ada read by the hook and applied", || async {
        app.fake.count(|r| r.query.contains("contact_ids")) > asked
            && app.count("select count(*) from keap_sync.hook_queue").await == 0
            && app.count("select count(*) from keap_sync.mirror where inbound_due").await == 0
    })
    .await;
    id
}

/// The users row of Ada, whole, as text.
async fn ada_row(app: &TestApp) -> String {
    app.db.query_one("select u::text from users u where id = 1", &[]).await.unwrap().get(0)
}

/// The hook attempts since `from` of `event_key` that carried contact `id`.
fn attempts_for(
    app: &TestApp,
    from: usize,
    event_key: &str,
    id: i64,
) -> Vec<keap_sync_testkit::fake::HookAttempt> {
    let all = app.fake.hook_attempts().into_iter().skip(from);
    all.filter(|a| a.event_key == event_key && a.ids.contains(&id)).collect()
}

/// The `PATCH`es of contact `id` since request `from`.
fn patches_since(app: &TestApp, from: usize, id: i64) -> usize {
    let path = format!("/v1/contacts/{id}");
    writes_since(app, from).iter().filter(|r| r.method == "PATCH" && r.path.ends_with(&path)).count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_name_changed_by_the_app_is_sent_once_and_the_hooks_for_our_own_write_cost_nothing() {
    let (app, url) = hooked_app(MAPPING).await;
    let id = ada_listed(&app, &url).await;
    let events = app.count("select count(*) from keap_sync.inbound_event").await;
    // Keap delivers the hook for our write twice: two deliveries, the copy 300 ms later.
    app.fake
        .set_hook_options(HookOptions { resend: Some(Duration::from_millis(300)), ..HookOptions::default() });
    let (before, tries) = (app.fake.requests().len(), app.fake.hook_attempts().len());
    app.exec("update users set first_name = 'Augusta' where id = 1").await;
    wait_settled(&app).await;
    let row = ada_row(&app).await;
    app::eventually(
        Duration::from_secs(10),
        "both deliveries answered 200 and the queue drained",
        || async {
            let echoes = attempts_for(&app, tries, "contact.edit", id);
            echoes.len() == 2
                && echoes.iter().all(|a| a.status == Some(200))
                && app.count("select count(*) from keap_sync.hook_queue").await == 0
        },
    )
    .await;
    assert_eq!(app.fake.contact(id).unwrap().given_name.as_deref(), Some("Augusta"), "the name reached Keap");
    let writes = writes_since(&app, before);
    assert_eq!(writes.len(), 1, "one write, the PATCH: {writes:?}");
    assert_eq!(patches_since(&app, before, id), 1, "one PATCH of Ada's contact: {writes:?}");
    let reads: Vec<_> =
        app.fake.requests().into_iter().skip(before).filter(|r| r.query.contains("contact_ids")).collect();
    assert!(reads.is_empty(), "the hooks for our own write were read from Keap: {reads:?}");
    no_sweep_since(&app, before);
    assert_eq!(app.count("select count(*) from keap_sync.inbound_event").await, events, "nothing came in");
    assert_eq!(ada_row(&app).await, row, "the users row unchanged by the echo");
    assert_eq!(nothing_outbound(&app).await, 0, "nothing enqueued outbound");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hand_edit_in_keap_right_after_our_write_is_still_read_and_applied() {
    let (app, url) = hooked_app(MAPPING).await;
    let id = ada_listed(&app, &url).await;
    let before = app.fake.requests().len();
    app.exec("update users set first_name = 'Augusta' where id = 1").await;
    wait_settled(&app).await;
    assert_eq!(patches_since(&app, before, id), 1, "our write");
    // A person edits the contact in Keap right after it: its hook must not pass for our echo.
    // The name they also change is the app's: read back, it writes nothing to the table.
    assert!(app.fake.edit_contact_json(id, |m| {
        m.insert(
            "phone_numbers".into(),
            json!([{"field": "PHONE1", "number": "+1 555 0142", "type": "Mobile"}]),
        );
        m.insert("given_name".into(), json!("Ada K."));
    }));
    app.fake.set_email_status("ada@example.com", "ListUnsubscribe");
    app::eventually(Duration::from_secs(10), "Keap's phone and opt-out in the users row", || async {
        let r =
            app.db.query_one("select phone, marketing_opt_out from users where id = 1", &[]).await.unwrap();
        r.get::<_, Option<String>>(0).as_deref() == Some("+1 555 0142") && r.get::<_, bool>(1)
    })
    .await;
    assert!(app.fake.requests().iter().skip(before).any(|r| r.query.contains("contact_ids")), "read by id");
    let first: String =
        app.db.query_one("select first_name from users where id = 1", &[]).await.unwrap().get(0);
    assert_eq!(first, "Augusta", "an app-owned name read back from Keap writes nothing");
    let columns = crate::texts(
        &app,
        "select distinct column_name from keap_sync.inbound_event where column_name is not null order by 1",
    )
    .await;
    assert_eq!(columns, ["marketing_opt_out", "phone"], "only the inbound columns came in");
    no_sweep_since(&app, before);
    assert_eq!(writes_since(&app, before).len(), 1, "no Keap write but ours");
    assert_eq!(nothing_outbound(&app).await, 0, "nothing enqueued outbound");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hand_edit_in_keap_just_before_our_write_is_read_though_its_hook_comes_with_our_echo() {
    let (app, url) = hooked_app(MAPPING).await;
    let id = ada_listed(&app, &url).await;
    // Keap's hooks come late (30-60 s): the hand edit's event and our write's go together.
    app.fake.hold_hooks(true);
    let before = app.fake.requests().len();
    assert!(app.fake.edit_contact_json(id, |m| {
        m.insert(
            "phone_numbers".into(),
            json!([{"field": "PHONE1", "number": "+1 555 0143", "type": "Mobile"}]),
        );
    }));
    app.exec("update users set first_name = 'Augusta' where id = 1").await;
    wait_settled(&app).await;
    assert_eq!(patches_since(&app, before, id), 1, "our write");
    app.fake.hold_hooks(false);
    app::eventually(Duration::from_secs(10), "Keap's phone in the users row", || async {
        let phone: Option<String> =
            app.db.query_one("select phone from users where id = 1", &[]).await.unwrap().get(0);
        phone.as_deref() == Some("+1 555 0143")
    })
    .await;
    no_sweep_since(&app, before);
    assert_eq!(writes_since(&app, before).len(), 1, "no Keap write but ours");
}

/// POSTs `body` to `url` with `headers`; (status, `X-Hook-Secret` answered).
async fn post(url: &str, body: Vec<u8>, headers: &[(&str, &str)]) -> (u16, Option<String>) {
    try_post(url, body, headers).await.expect("the receiver answers")
}

/// [`post`], with the client's error when the exchange fails.
async fn try_post(
    url: &str,
    body: Vec<u8>,
    headers: &[(&str, &str)],
) -> Result<(u16, Option<String>), reqwest::Error> {
    keap_sync_testkit::install_crypto_provider();
    let mut req = reqwest::Client::new().post(url).body(body).header("content-type", "application/json");
    for (name, value) in headers {
        req = req.header(*name, *value);
    }
    let answer = req.send().await?;
    let echoed = answer.headers().get("x-hook-secret").map(|v| v.to_str().unwrap().to_owned());
    Ok((answer.status().as_u16(), echoed))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_path_is_404_a_bad_body_400_an_oversized_one_413_and_none_queues_anything() {
    let (app, url) = hooked_app(MAPPING).await;
    let base = url.trim_end_matches(HOOK_PATH).to_owned();
    let delivery = |id: i64| {
        json!({"event_key": "contact.edit", "object_type": "contact", "object_keys": [{"id": id, "timestamp": "x"}]})
            .to_string()
            .into_bytes()
    };
    let handshake = [("x-hook-secret", "s3cr3t-handshake")];
    for wrong in [
        base.clone(),
        format!("{base}{}", &HOOK_PATH[..HOOK_PATH.len() - 1]),
        format!("{url}x"),
        format!("{url}/"),
    ] {
        assert_eq!(post(&wrong, delivery(1), &[]).await, (404, None), "{wrong}");
        assert_eq!(post(&wrong, Vec::new(), &handshake).await, (404, None), "no handshake on {wrong}");
    }
    assert_eq!(post(&url, b"{not json".to_vec(), &[]).await.0, 400);
    assert_eq!(post(&url, br#"{"event_key":"contact.edit"}"#.to_vec(), &[]).await.0, 400);
    let mut huge = br#"{"event_key":"contact.edit","object_type":"contact","object_keys":["#.to_vec();
    while huge.len() <= 1 << 20 {
        huge.extend_from_slice(br#"{"id":1234567,"timestamp":"2026-01-01T00:00:00.000Z"},"#);
    }
    huge.extend_from_slice(br#"{"id":1}]}"#);
    // The receiver answers 413 once the cap is passed and drops the rest: a client still
    // writing the body may see that answer or, if the connection closes first, a broken pipe.
    match try_post(&url, huge, &[]).await {
        Ok((status, _)) => assert_eq!(status, 413),
        Err(e) => assert!(e.is_request() && !e.is_connect(), "refused mid-body, not unreachable: {e}"),
    }
    assert_eq!(app.count("select count(*) from keap_sync.hook_queue").await, 0, "nothing queued");
    // The right path: the handshake is echoed, a delivery queued.
    assert_eq!(post(&url, Vec::new(), &handshake).await, (200, Some("s3cr3t-handshake".into())));
    // A contact Keap does not have: queued, then read (not found) and taken off the queue.
    assert_eq!(post(&url, delivery(999_999), &[]).await.0, 200);
    assert!(!app::captured_logs().contains(HOOK_PATH), "the secret path is never logged");
    app::eventually(Duration::from_secs(10), "the queued id read and taken", || async {
        app.fake.requests().iter().any(|r| r.query.contains("contact_ids"))
            && app.count("select count(*) from keap_sync.hook_queue").await == 0
    })
    .await;
}

/// Keap's final phone and opt-out of contact `id`, as the fake holds them.
fn keap_final(app: &TestApp, id: i64, email: &str) -> (Option<String>, bool) {
    let contact = app.fake.contact_json(id).expect("the contact");
    let phone = contact["phone_numbers"]
        .as_array()
        .and_then(|p| p.first())
        .map(|p| p["number"].as_str().unwrap().to_owned());
    (phone, app.fake.email_status(email) == "ListUnsubscribe")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hundred_contacts_edited_three_times_converge_through_reordered_duplicated_batches() {
    let (app, url) = hooked_app(MAPPING).await;
    subscribed(&app, &url).await;
    app.exec(
        "insert into users (id, email, first_name)
         select g, 'u' || g || '@example.com', 'U' || g from generate_series(1, 200) g",
    )
    .await;
    wait_settled(&app).await;
    let before = app.fake.requests().len();
    let linked: Vec<(i64, i64)> = app
        .db
        .query("select user_key::bigint, contact_id from keap_sync.contact_map order by 1", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    assert_eq!(linked.len(), 200);
    app.fake.set_hook_options(HookOptions {
        batch: 50,
        reorder: true,
        duplicate: 0.2,
        gather: Duration::from_millis(100),
        ..HookOptions::default()
    });
    for round in 1..=3 {
        for (user, id) in &linked {
            let number = format!("+1 555 {user:04} {round}");
            assert!(app.fake.edit_contact_json(*id, |m| {
                m.insert(
                    "phone_numbers".into(),
                    json!([{"field": "PHONE1", "number": number, "type": "Mobile"}]),
                );
            }));
            if round == 2 && user % 3 == 0 {
                app.fake.set_email_status(&format!("u{user}@example.com"), "ListUnsubscribe");
            }
        }
    }
    let rows = || async {
        let rows =
            app.db.query("select id, phone, marketing_opt_out from users order by id", &[]).await.unwrap();
        rows.iter()
            .map(|r| (r.get::<_, i64>(0), r.get::<_, Option<String>>(1), r.get::<_, bool>(2)))
            .collect::<Vec<_>>()
    };
    let want: Vec<(i64, Option<String>, bool)> = linked
        .iter()
        .map(|(user, id)| {
            let (phone, out) = keap_final(&app, *id, &format!("u{user}@example.com"));
            (*user, phone, out)
        })
        .collect();
    assert!(want.iter().all(|(user, phone, _)| phone.as_deref() == Some(&*format!("+1 555 {user:04} 3"))));
    app::eventually(Duration::from_secs(30), "every row equal to Keap's final values", || async {
        rows().await == want
    })
    .await;
    no_sweep_since(&app, 0);
    assert!(writes_since(&app, before).is_empty(), "no Keap write");
    assert_eq!(nothing_outbound(&app).await, 0, "nothing enqueued outbound");
    let attempts = app.fake.hook_attempts();
    let sent: usize = attempts.iter().map(|a| a.ids.len()).sum();
    let events = 3 * 200 + 200 / 3;
    assert!(attempts.len() >= events / 50, "delivered in batches: {}", attempts.len());
    assert!(sent > events, "some events were sent twice: {sent} ids for {events} events");
    // Answer times, printed (`-- --nocapture`). One answer once took 1.04 s under the full
    // suite: the receiver's statement had waited out a deadlock with the daemon's removal of
    // read rows, broken by Postgres after deadlock_timeout (the removals now skip locked rows).
    let mut times: Vec<Duration> = attempts.iter().map(|a| a.elapsed).collect();
    times.sort();
    eprintln!(
        "hook receiver: {} answers, median {:?}, slowest {:?}",
        times.len(),
        times[times.len() / 2],
        times.last()
    );
    for a in &attempts {
        assert_eq!(a.status, Some(200), "every receiver answer is 200: {a:?}");
        assert!(a.elapsed < Duration::from_secs(1), "every answer under a second: {a:?}");
    }
}

/// The app's receiver on a free port, the sweep effectively off, no daemon started yet;
/// returns it, the port and the config file a CLI run reads. A sweep that runs (brought
/// forward by the watchdog) ends its window now (`lag_secs = 0`): with the default lag, a
/// change made in the last minute waits for a later sweep, and whether a first sweep had
/// already set the watermark (then a window is used, not a full listing) depends on timing.
async fn stopped_hooked_app() -> (TestApp, u16, std::path::PathBuf) {
    stopped_hooked_app_with("").await
}

/// [`stopped_hooked_app`] with `hooks` appended to its `[hooks]` table.
async fn stopped_hooked_app_with(hooks: &str) -> (TestApp, u16, std::path::PathBuf) {
    let port = free_port();
    let toml = format!(
        "[mirror]\nsweep_secs = 3600\nlag_secs = 0\n[hooks]\nlisten = \"127.0.0.1:{port}\"\n{hooks}{MAPPING}"
    );
    let toml: &'static str = Box::leak(toml.into_boxed_str());
    let app = spawn_app_with(Options { users_ddl: DDL, toml, ..Options::stopped() }).await;
    let file = app.write_config_file("", "");
    (app, port, file)
}

/// `keap-sync --config FILE hooks ARGS` with the app's environment, off the runtime's threads.
pub(crate) async fn hooks_cli(app: &TestApp, file: &std::path::Path, args: &[&str]) -> std::process::Output {
    let mut all = vec!["hooks"];
    all.extend(args);
    cli(app, file, &all).await
}

/// `keap-sync --config FILE ARGS`; the secret path must be in none of its output.
async fn cli(app: &TestApp, file: &std::path::Path, args: &[&str]) -> std::process::Output {
    let mut all = vec!["--config".to_owned(), file.display().to_string()];
    all.extend(args.iter().map(|a| (*a).to_owned()));
    let env = app.env();
    let out = tokio::task::spawn_blocking(move || {
        std::process::Command::new(app::keap_sync_binary())
            .args(&all)
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .envs(env)
            .output()
            .expect("run keap-sync")
    })
    .await
    .unwrap();
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(
        !stdout.contains(HOOK_PATH) && !stderr.contains(HOOK_PATH),
        "the secret path shown: {stdout}{stderr}"
    );
    out
}

pub(crate) fn text(out: &std::process::Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))
}

/// Our hooks in the fake: (event key, status), sorted.
fn ours(app: &TestApp) -> Vec<(String, String)> {
    let mut ours: Vec<_> = app
        .fake
        .hooks()
        .into_iter()
        .filter(|h| h.hook_url.ends_with(HOOK_PATH))
        .map(|h| (h.event_key, h.status))
        .collect();
    ours.sort();
    ours
}

fn all_verified() -> Vec<(String, String)> {
    ["contact.add", "contact.delete", "contact.edit"]
        .iter()
        .map(|k| ((*k).to_owned(), "Verified".to_owned()))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hooks_install_is_refused_while_the_receiver_is_down_and_idempotent_once_it_answers() {
    let (mut app, port, file) = stopped_hooked_app().await;
    let base = format!("http://127.0.0.1:{port}");
    let out = hooks_cli(&app, &file, &["install", "--base-url", &base]).await;
    assert!(!out.status.success(), "refused: {}", text(&out));
    assert!(text(&out).contains("does not answer a handshake"), "{}", text(&out));
    assert!(app.fake.hooks().is_empty(), "no hook created: {:?}", app.fake.hooks());
    // Keap's event keys are checked first: a missing one is named, nothing subscribed.
    app.start_daemon().await;
    receiving(port).await;
    app.fake.set_hook_event_keys(&["contact.add", "contact.edit"]);
    let out = hooks_cli(&app, &file, &["install", "--base-url", &base]).await;
    assert!(!out.status.success() && text(&out).contains("contact.delete"), "{}", text(&out));
    assert!(app.fake.hooks().is_empty(), "no hook created: {:?}", app.fake.hooks());
    app.fake.set_hook_event_keys(&["contact.add", "contact.edit", "contact.delete", "order.add"]);
    for run in 1..=2 {
        let out = hooks_cli(&app, &file, &["install", "--base-url", &base]).await;
        assert!(out.status.success(), "install #{run}: {}", text(&out));
        assert_eq!(ours(&app), all_verified(), "install #{run}");
        assert_eq!(app.fake.hooks().len(), 3, "exactly 3 hooks after install #{run}");
    }
    // Not https and not loopback: refused before any call.
    let out = hooks_cli(&app, &file, &["install", "--base-url", "http://hooks.example.com"]).await;
    assert!(!out.status.success() && text(&out).contains("https"), "{}", text(&out));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hooks_status_shows_states_masked_and_uninstall_keeps_a_hook_someone_else_made() {
    // The watchdog off: its first pass, late under load, could verify the hook this test makes
    // Inactive before `status` looks (seen once in a full run).
    let (mut app, port, file) = stopped_hooked_app_with("watch_secs = 0\n").await;
    app.start_daemon().await;
    receiving(port).await;
    let theirs = app.fake.subscribe_hook("contact.edit", "http://127.0.0.1:9/someone-elses-receiver").await;
    let out = hooks_cli(&app, &file, &["status"]).await;
    assert!(!out.status.success(), "none of ours yet: {}", text(&out));
    let out = hooks_cli(&app, &file, &["install", "--base-url", &format!("http://127.0.0.1:{port}")]).await;
    assert!(out.status.success(), "{}", text(&out));
    let out = hooks_cli(&app, &file, &["status"]).await;
    assert!(out.status.success(), "{}", text(&out));
    let shown = text(&out);
    for needle in
        ["contact.add", "contact.edit", "contact.delete", "Verified", "<secret path>", "1 other hook"]
    {
        assert!(shown.contains(needle), "{needle:?} in {shown}");
    }
    // An Inactive hook: status says so and fails; verify brings it back.
    let edit =
        app.fake.hooks().into_iter().find(|h| h.event_key == "contact.add" && h.key != theirs.key).unwrap();
    app.fake.set_hook_status(&edit.key, "Inactive");
    let out = hooks_cli(&app, &file, &["status", "--json"]).await;
    assert!(!out.status.success(), "an Inactive hook fails status: {}", text(&out));
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let states: Vec<&str> =
        json["ours"].as_array().unwrap().iter().map(|h| h["status"].as_str().unwrap()).collect();
    assert!(states.contains(&"Inactive") && states.len() == 3, "{json}");
    assert_eq!(json["others"], 1);
    let out = hooks_cli(&app, &file, &["verify"]).await;
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(ours(&app), all_verified());
    let out = hooks_cli(&app, &file, &["uninstall"]).await;
    assert!(out.status.success(), "{}", text(&out));
    assert!(ours(&app).is_empty(), "ours removed");
    assert_eq!(app.fake.hooks(), vec![theirs], "someone else's hook kept");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_receiver_down_past_the_retry_schedule_loses_nothing_and_the_watchdog_verifies_again() {
    let (mut app, port, file) = stopped_hooked_app().await;
    app.start_daemon().await;
    receiving(port).await;
    let out = hooks_cli(&app, &file, &["install", "--base-url", &format!("http://127.0.0.1:{port}")]).await;
    assert!(out.status.success(), "{}", text(&out));
    ada_synced(&app).await;
    // The receiver goes down; Keap's tries (compressed) all fail and the hook goes Inactive.
    app.stop_daemon().await;
    app.fake.set_email_status("ada@example.com", "ListUnsubscribe");
    app::eventually(Duration::from_secs(15), "contact.edit Inactive after the last try", || async {
        ours(&app).contains(&("contact.edit".to_owned(), "Inactive".to_owned()))
    })
    .await;
    // Only the unsubscribe's tries: Ada's create fired `contact.add` too, as Keap does.
    let tries: Vec<_> =
        app.fake.hook_attempts().into_iter().filter(|a| a.event_key == "contact.edit").collect();
    assert!(tries.len() == 4 && tries.iter().all(|a| a.status.is_none()), "4 failed tries: {tries:?}");
    let out = hooks_cli(&app, &file, &["status"]).await;
    assert!(!out.status.success() && text(&out).contains("Inactive"), "{}", text(&out));
    let out = cli(&app, &file, &["status"]).await;
    assert!(
        text(&out).contains("contact.edit Inactive") && text(&out).contains("NOT ALL VERIFIED"),
        "{}",
        text(&out)
    );
    // Back up: the watchdog verifies it again and brings the sweep forward (it is an hour
    // away otherwise), which finds the change no hook brought.
    let before = app.fake.requests().len();
    app.start_daemon().await;
    app::eventually(Duration::from_secs(20), "the opt-out in users and every hook Verified", || async {
        let out: bool =
            app.db.query_one("select marketing_opt_out from users where id = 1", &[]).await.unwrap().get(0);
        out && ours(&app) == all_verified()
    })
    .await;
    let since: Vec<_> = app.fake.requests().into_iter().skip(before).collect();
    assert!(since.iter().any(|r| r.method == "POST" && r.path.ends_with("/verify")), "re-verified");
    assert!(
        since.iter().any(|r| r.path.ends_with("/v2/contacts") && !r.query.contains("contact_ids")),
        "swept"
    );
    app::eventually(Duration::from_secs(10), "status shows every hook Verified", || async {
        let shown = text(&cli(&app, &file, &["status", "--json"]).await);
        shown.matches("\"Verified\"").count() == 3
    })
    .await;
}
