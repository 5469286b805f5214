//! keap-sync's mirror of Keap (`keap_sync.mirror`): the full listing through the v2 API.
//!
//! Run alone with `cargo test --test it mirror`.

use keap_sync::{Class, Difference, Drift, ReconcileOptions, Report};
use std::time::Duration;

use keap_sync_testkit::app::{self, spawn_app, spawn_app_with, Options};
use keap_sync_testkit::fake::{FaultAction, FaultRule, Route};
use serde_json::json;

/// A full listing of 10,000 contacts takes 10 list calls of 1,000, and the mirror then holds
/// what Keap holds: every contact, its addresses lower-cased, the mapped names and its tags. A
/// second listing, after contacts were deleted and edited in Keap, removes and updates them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_listing_of_10000_contacts_takes_10_calls_and_mirrors_keap() {
    let app = spawn_app_with(Options::stopped()).await;
    let vip = app.fake.create_tag("VIP");
    let mut ids = Vec::new();
    for i in 0..10_000 {
        let c = app.fake.seed_contact_json(json!({
            "given_name": format!("G{i}"), "family_name": "Family",
            "email_addresses": [{"field": "EMAIL1", "email": format!("Person{i}@Example.com")},
                                {"field": "EMAIL2", "email": format!("other{i}@example.com")}],
        }));
        if i % 100 == 0 {
            app.fake.apply_tag(c.id, vip);
        }
        ids.push(c.id);
    }
    let lists = |app: &keap_sync_testkit::app::TestApp| app.fake.count(|r| r.path.ends_with("/v2/contacts"));

    let listing = keap_sync::refresh_mirror(&app.config()).await.expect("the listing");

    assert_eq!((listing.pages, listing.contacts, listing.removed), (10, 10_000, 0));
    assert_eq!(lists(&app), 10, "one list call per 1,000 contacts");
    let row = app
        .db
        .query_one(
            "select emails, email1, contact->>'given_name', contact->>'family_name', tag_ids
               from keap_sync.mirror where contact_id = $1",
            &[&ids[4200]],
        )
        .await
        .expect("contact 4200 in the mirror");
    assert_eq!(row.get::<_, Vec<String>>(0), ["person4200@example.com", "other4200@example.com"]);
    assert_eq!(row.get::<_, Option<String>>(1).as_deref(), Some("person4200@example.com"));
    assert_eq!((row.get::<_, String>(2), row.get::<_, String>(3)), ("G4200".into(), "Family".into()));
    assert_eq!(row.get::<_, Vec<i64>>(4), [vip]);
    assert_eq!(app.count("select count(*) from keap_sync.mirror").await, 10_000);
    assert_eq!(
        app.count("select count(*) from keap_sync.mirror where tag_ids = array[]::bigint[]").await,
        9_900
    );

    for id in &ids[..3] {
        app.fake.delete_contact(*id);
    }
    app.fake.edit_contact(ids[5000], |c| c.given_name = Some("Edited".into()));
    let again = keap_sync::refresh_mirror(&app.config()).await.expect("the second listing");
    assert_eq!((again.pages, again.contacts, again.removed), (10, 9_997, 3));
    assert_eq!(app.count("select count(*) from keap_sync.mirror").await, 9_997);
    let edited: String = app
        .db
        .query_one("select contact->>'given_name' from keap_sync.mirror where contact_id = $1", &[&ids[5000]])
        .await
        .unwrap()
        .get(0);
    assert_eq!(edited, "Edited");
    let state = app.db.query_one("select listing_token is null and listed_at is not null and watermark >= listed_at from keap_sync.mirror_state", &[]).await.unwrap();
    assert!(state.get::<_, bool>(0), "the listing completed and the watermark reached its start");
}

/// `reconcile` with the users not in sync collected, in the order they were handed on; checks
/// that the report's counts are theirs.
async fn reconcile_collected(
    app: &keap_sync_testkit::app::TestApp,
    keys: &[String],
    options: ReconcileOptions,
) -> (Report, Vec<Drift>) {
    let mut found = Vec::new();
    let report = keap_sync::reconcile(&app.config(), keys, options, &mut |d: Drift| found.push(d))
        .await
        .expect("reconcile");
    assert_eq!(report.drifted(), found.len() as u64, "{report:?}");
    for class in Class::ALL {
        let n = found.iter().filter(|d| d.class == class).count() as u64;
        assert_eq!(report.counts.get(&class).copied().unwrap_or(0), n, "{class:?} in {report:?}");
    }
    (report, found)
}

/// The contact-side tables and the users table, as one hash: what reconcile must not change.
const SNAPSHOT: &str = "select md5(string_agg(t, '|' order by t)) from (
    select o::text as t from keap_sync.outbox o union all select m::text from keap_sync.contact_map m
    union all select c::text from keap_sync.change c union all select u::text from public.users u) s";

/// `reconcile` over 1,000 synced users after hand edits in Keap reports each in its class,
/// makes no write call and changes no table but the mirror; `--apply` queues the repairable
/// ones, the daemon repairs them, and a second run reports only what needs a person.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconcile_reports_hand_edits_by_class_and_apply_repairs_them() {
    let mut app =
        spawn_app_with(Options { toml: "[[tags.from]]\nsql = \"true\"\ntag = 77\n", ..Options::default() })
            .await;
    app.fake.create_tag_with_id(77, "Member");
    app.insert_users(1000).await;
    app.wait_idle().await;
    app.stop_daemon().await;
    let contact = |key: &str| {
        let app = &app;
        let key = key.to_owned();
        async move {
            let id: i64 = app
                .db
                .query_one("select contact_id from keap_sync.contact_map where user_key = $1", &[&key])
                .await
                .unwrap()
                .get(0);
            id
        }
    };
    let (c1, c2, c3, c5, c6) =
        (contact("1").await, contact("2").await, contact("3").await, contact("5").await, contact("6").await);
    app.fake.edit_contact(c1, |c| c.given_name = Some("Edited in Keap".into()));
    assert!(app.fake.remove_tag(c2, 77));
    app.fake.delete_contact(c3);
    let email4: String = app.db.query_one("select email from users where id = 4", &[]).await.unwrap().get(0);
    let duplicate = app.fake.seed_contact_json(
        json!({"given_name": "Dup", "email_addresses": [{"field": "EMAIL1", "email": email4}]}),
    );
    // Users 5 and 6 merged in Keap: 6's contact is gone, its address now 5's EMAIL2.
    let email6: String = app.db.query_one("select email from users where id = 6", &[]).await.unwrap().get(0);
    app.fake.delete_contact(c6);
    app.fake.edit_contact_json(c5, |m| {
        m["email_addresses"].as_array_mut().unwrap().push(json!({"field": "EMAIL2", "email": email6}));
    });
    let before = app.db.query_one(SNAPSHOT, &[]).await.unwrap().get::<_, Option<String>>(0);
    let writes_before = app.fake.count(|r| r.method != "GET" && !r.path.ends_with("/token"));

    let (report, drift) = reconcile_collected(&app, &[], ReconcileOptions::default()).await;

    assert_eq!(
        app.fake.count(|r| r.method != "GET" && !r.path.ends_with("/token")),
        writes_before,
        "no write call"
    );
    assert_eq!(
        app.db.query_one(SNAPSHOT, &[]).await.unwrap().get::<_, Option<String>>(0),
        before,
        "no table changed"
    );
    assert_eq!((report.users, report.in_sync), (1000, 995), "{drift:#?}");
    let class = |key: &str| drift.iter().find(|d| d.user == key).map(|d| (d.class, d.differs.clone()));
    assert_eq!(class("1"), Some((Class::Differs, vec!["given_name".to_owned()])));
    assert_eq!(class("2"), Some((Class::Differs, vec!["tag 77".to_owned()])));
    assert_eq!(class("3").map(|c| c.0), Some(Class::ContactGone));
    assert_eq!(
        class("4"),
        Some((
            Class::Duplicates,
            vec![format!("contact {}", contact("4").await), format!("contact {}", duplicate.id)]
        ))
    );
    assert_eq!(class("6").map(|c| c.0), Some(Class::ContactGone));

    assert!(drift.iter().all(|d| d.values.is_empty()), "no value unless asked");
    let only_1 = ["1".to_owned()];
    let asked = ReconcileOptions { show_values: true, ..Default::default() };
    let (_, shown) = reconcile_collected(&app, &only_1, asked).await;
    assert_eq!(
        shown[0].values,
        [Difference { path: "given_name".into(), table: json!("F1"), keap: json!("Edited in Keap") }]
    );
    // `status` shows the mirror's freshness and the counts, never a key or a value.
    let config = app.write_config_file("", "");
    let out = app.run_cli(&["--config", config.to_str().unwrap(), "status"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("mirror of Keap: 999 contacts")
            && text.contains("1000 users: 2 contact gone, 2 differs, 1 duplicates")
            && !text.contains("@example.com"),
        "{text}"
    );
    let (applied, applied_drift) =
        reconcile_collected(&app, &[], ReconcileOptions { apply: true, ..Default::default() }).await;
    assert_eq!(applied.queued, 4, "users 1, 2, 3 and 6; user 4 needs a person: {applied_drift:#?}");
    app.start_daemon().await;
    let settled = "select (select count(*) from keap_sync.outbox where parked_at is null)
                        + (select count(*) from keap_sync.change)";
    app::eventually(Duration::from_secs(30), "the repairs to be delivered (user 6 parks)", || async {
        app.count(settled).await == 0
    })
    .await;
    let (_, after) = reconcile_collected(&app, &[], ReconcileOptions::default()).await;
    let left: Vec<(String, Class)> = after.iter().map(|d| (d.user.clone(), d.class)).collect();
    // User 6's address is only another contact's EMAIL2 now: delivery parks it for a person.
    assert_eq!(left, [("4".to_owned(), Class::Duplicates), ("6".to_owned(), Class::Parked)]);
    assert_eq!(app.fake.contact_json(c1).unwrap()["given_name"], "F1", "the table's value is back");
    assert!(app.fake.contact_tags(c2).contains(&77));
    assert_eq!(
        app.fake
            .contacts_with_email(
                &app.db
                    .query_one("select email from users where id = 3", &[])
                    .await
                    .unwrap()
                    .get::<_, String>(0)
            )
            .len(),
        1
    );
}

/// The `reconcile` command prints each user not in sync as it is found, between the listing's
/// line and the counts; with `--json` its output is one JSON document: the listing, the
/// `drift` array in key order, then the counts (by class too).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_reconcile_command_streams_its_report_and_json_is_one_document() {
    let mut app = spawn_app().await;
    app.insert_users(30).await;
    app.wait_idle().await;
    app.stop_daemon().await;
    let (c1, c2) = (linked(&app, "1").await.unwrap(), linked(&app, "2").await.unwrap());
    app.fake.edit_contact(c1, |c| c.given_name = Some("Edited in Keap".into()));
    app.fake.delete_contact(c2);
    app.exec("insert into users (email, first_name, last_name) values ('new@example.com', 'New', 'N')").await;
    let config = app.write_config_file("", "");
    let config = config.to_str().unwrap();

    let out = app.run_cli(&["--config", config, "reconcile", "--json"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8(out.stdout).unwrap();
    let doc: serde_json::Value =
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("not one JSON document ({e}):\n{text}"));
    // The daemon mirrored the 30 contacts it made; the listing no longer sees user 2's.
    assert_eq!(doc["listing"], json!({"pages": 1, "contacts": 29, "removed": 1}), "{text}");
    assert_eq!(
        (doc["users"].as_u64(), doc["in_sync"].as_u64(), doc["queued"].as_u64()),
        (Some(31), Some(28), Some(0))
    );
    assert_eq!(
        doc["drift"],
        json!([
            {"user": "1", "class": "differs", "contact_id": c1, "differs": ["given_name"]},
            {"user": "2", "class": "contact_gone", "contact_id": c2},
            {"user": "31", "class": "no_contact"},
        ]),
        "{text}"
    );
    assert_eq!(doc["counts"], json!({"differs": 1, "contact_gone": 1, "no_contact": 1}));

    let out = app.run_cli(&["--config", config, "reconcile"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8(out.stdout).unwrap();
    assert_eq!(
        text.lines().collect::<Vec<_>>(),
        [
            "reconcile: mirror refreshed: 29 contacts in 1 list calls, 0 gone from Keap",
            &format!("user 1 (contact {c1}): differs in Keap: given_name"),
            &format!("user 2 (contact {c2}): contact gone from Keap"),
            "user 31: no contact yet",
            "reconcile: 31 users, 28 in sync, 3 not: 1 differs, 1 contact gone, 1 no contact",
        ]
    );
}

/// With `[mirror] reconcile_hours` on, the active daemon runs the drift report by itself when
/// idle: hand edits in Keap (a name changed, a contact deleted, which only a full listing
/// sees) show in `status --json` as counts by class, its log line gives the counts without a
/// key or a value, and it makes no write call and changes no table but the mirror.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_daemon_runs_the_drift_report_on_a_schedule_and_writes_nothing() {
    let app = spawn_app_with(Options {
        // The file says hours; a test cannot wait one.
        tweak: |c| c.mirror.reconcile = Some(Duration::from_millis(200)),
        ..Options::default()
    })
    .await;
    app.insert_users(20).await;
    app.wait_idle().await;
    let (c1, c2) = (linked(&app, "1").await.unwrap(), linked(&app, "2").await.unwrap());
    let writes = || app.fake.count(|r| r.method != "GET" && !r.path.ends_with("/token"));
    let (writes_before, before) =
        (writes(), app.db.query_one(SNAPSHOT, &[]).await.unwrap().get::<_, String>(0));

    app.fake.edit_contact(c1, |c| c.given_name = Some("Edited in Keap".into()));
    app.fake.delete_contact(c2);
    let counted =
        "select coalesce(reconciled_users = 20 and drift = '{\"differs\": 1, \"contact_gone\": 1}', false)
                     from keap_sync.mirror_state";
    app::eventually(Duration::from_secs(20), "a scheduled report to count the hand edits", || async {
        app.db.query_one(counted, &[]).await.unwrap().get::<_, bool>(0)
    })
    .await;

    let config = app.write_config_file("", "");
    let out = app.run_cli(&["--config", config.to_str().unwrap(), "status", "--json"]);
    let status: serde_json::Value = serde_json::from_slice(&out.stdout).expect("status --json");
    assert_eq!(status["mirror"]["drift"], json!({"differs": 1, "contact_gone": 1}), "{status}");
    assert_eq!(status["mirror"]["reconciled_users"], 20);
    assert_eq!(writes(), writes_before, "no write call");
    assert_eq!(app.db.query_one(SNAPSHOT, &[]).await.unwrap().get::<_, String>(0), before, "nothing queued");
    let logs = app::captured_logs();
    let lines: Vec<&str> = logs.lines().filter(|l| l.contains("drift report: users compared")).collect();
    assert!(
        lines
            .iter()
            .any(|l| l.contains("users=20") && l.contains("differs=1") && l.contains("contact_gone=1")),
        "{lines:#?}"
    );
    assert!(lines.iter().all(|l| !l.contains('@') && !l.contains("Edited")), "{lines:#?}");
}

/// The daemon's sweep: contacts edited in Keap reach the mirror within one sweep interval plus
/// the lag, listed in one call (a window on Keap's update time, not a full listing).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn edits_in_keap_reach_the_mirror_within_a_sweep_in_one_list_call() {
    let toml = "[mirror]\nsweep_secs = 1\nlag_secs = 0\noverlap_secs = 1\n";
    let app = spawn_app_with(Options { toml, ..Options::default() }).await;
    let ids: Vec<i64> = (0..500)
        .map(|i| {
            let email = format!("k{i}@example.com");
            app.fake
                .seed_contact_json(
                    json!({"given_name": "Keap", "email_addresses": [{"field": "EMAIL1", "email": email}]}),
                )
                .id
        })
        .collect();
    app::eventually(
        Duration::from_secs(20),
        "the first sweep (a full listing) to fill the mirror",
        || async { app.count("select count(*) from keap_sync.mirror").await == 500 },
    )
    .await;
    let lists = || app.fake.count(|r| r.path.ends_with("/v2/contacts"));
    let before = lists();
    for (i, id) in ids.iter().take(100).enumerate() {
        app.fake.edit_contact(*id, |c| c.given_name = Some(format!("Edited {i}")));
    }
    app::eventually(
        Duration::from_secs(5),
        "the edits to reach the mirror (sweep every 1 s, lag 0)",
        || async {
            app.count("select count(*) from keap_sync.mirror where contact->>'given_name' like 'Edited %'")
                .await
                == 100
        },
    )
    .await;
    let calls = lists() - before;
    assert!(
        (1..=2).contains(&calls),
        "{calls} list calls for one sweep's window (one more may have been under way)"
    );
    assert_eq!(app.count("select count(*) from keap_sync.mirror").await, 500, "a sweep adds, never removes");
}

/// A listing cut short resumes from the page after the last one stored, and only the
/// resumed run's completion removes contacts from the mirror.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_listing_cut_short_resumes_where_it_stopped() {
    let app = spawn_app_with(Options::stopped()).await;
    for i in 0..3_500 {
        let email = format!("r{i}@example.com");
        app.fake.seed_contact_json(
            json!({"given_name": "R", "email_addresses": [{"field": "EMAIL1", "email": email}]}),
        );
    }
    // The third page answers 500: two pages (2,000 contacts) are stored, the listing stops.
    app.fake.inject(
        FaultRule::new(
            Route::Contacts,
            FaultAction::Status(500, r#"{"message":"Internal Server Error"}"#.into()),
        )
        .after(2)
        .times(1),
    );
    let failed = keap_sync::refresh_mirror(&app.config()).await;
    assert!(failed.is_err(), "the listing stopped at the 500");
    assert_eq!(app.count("select count(*) from keap_sync.mirror").await, 2_000);
    let lists = || app.fake.count(|r| r.path.ends_with("/v2/contacts"));
    let before = lists();
    let resumed = keap_sync::refresh_mirror(&app.config()).await.expect("the resumed listing");
    assert_eq!((resumed.pages, resumed.contacts, resumed.removed), (2, 1_500, 0), "pages 3 and 4 only");
    assert_eq!(lists() - before, 2);
    assert_eq!(app.count("select count(*) from keap_sync.mirror").await, 3_500);
}

/// A listing beside a busy daemon may meet Keap's 429 (the fake sends no `Retry-After`): the
/// page is asked again after a pause and the listing finishes, instead of failing the command.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_throttled_page_is_asked_again_and_the_listing_finishes() {
    let app = spawn_app_with(Options::stopped()).await;
    for i in 0..1_500 {
        let email = format!("t{i}@example.com");
        app.fake.seed_contact_json(
            json!({"given_name": "T", "email_addresses": [{"field": "EMAIL1", "email": email}]}),
        );
    }
    app.fake.inject(
        FaultRule::new(Route::Contacts, FaultAction::Status(429, r#"{"message":"Quota Exceeded"}"#.into()))
            .after(1)
            .times(2),
    );
    let listing = keap_sync::refresh_mirror(&app.config()).await.expect("the listing finishes");
    assert_eq!((listing.pages, listing.contacts), (2, 1_500));
    assert_eq!(app.fake.count(|r| r.path.ends_with("/v2/contacts")), 4, "page 2 asked three times");
    assert_eq!(app.count("select count(*) from keap_sync.mirror").await, 1_500);
}

/// Seeds a contact whose EMAIL1 is `email`, with other addresses and a phone of its own.
fn seed_known(app: &keap_sync_testkit::app::TestApp, email: &str, given: &str, n: usize) -> i64 {
    app.fake
        .seed_contact_json(json!({
            "given_name": given, "family_name": format!("L{n}"),
            "email_addresses": [{"field": "EMAIL1", "email": email},
                                {"field": "EMAIL2", "email": format!("home{n}@example.net")},
                                {"field": "EMAIL3", "email": format!("work{n}@example.org")}],
            "phone_numbers": [{"field": "PHONE1", "number": format!("555-{n:04}")}],
        }))
        .id
}

/// Asserts that contact `id` still holds the addresses and phone [`seed_known`] gave it.
fn assert_kept(app: &keap_sync_testkit::app::TestApp, id: i64, n: usize) {
    let c = app.fake.contact_json(id).unwrap_or_else(|| panic!("contact {id} gone"));
    let slot = |field: &str| {
        c["email_addresses"]
            .as_array()
            .and_then(|a| a.iter().find(|e| e["field"] == field))
            .map(|e| e["email"].as_str().unwrap_or_default().to_owned())
    };
    assert_eq!(slot("EMAIL2").as_deref(), Some(format!("home{n}@example.net").as_str()), "contact {id}: {c}");
    assert_eq!(slot("EMAIL3").as_deref(), Some(format!("work{n}@example.org").as_str()), "contact {id}: {c}");
    assert_eq!(c["phone_numbers"][0]["number"], format!("555-{n:04}"), "contact {id}: {c}");
}

/// Lookups by email (`GET /v1/contacts?email=…`) the fake has seen.
fn lookups(app: &keap_sync_testkit::app::TestApp) -> usize {
    app.fake.count(|r| r.method == "GET" && r.path.ends_with("/v1/contacts"))
}

/// The contact a user is linked to.
async fn linked(app: &keap_sync_testkit::app::TestApp, key: &str) -> Option<i64> {
    app.db
        .query_opt("select contact_id from keap_sync.contact_map where user_key = $1", &[&key])
        .await
        .unwrap()
        .map(|r| r.get(0))
}

/// A backfill of 5,000 users into a Keap holding 3,000 contacts, 2,000 of them with a user's
/// address: one listing, then one contact call per user (a create, or the patch or read that
/// links a contact found in the mirror), never a lookup by email; no duplicate, every match
/// linked, and what those contacts hold that keap-sync does not own (EMAIL2, EMAIL3, phones) kept.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backfill_by_the_mirror_makes_one_call_per_user_and_keeps_what_keap_holds() {
    let mut app = spawn_app_with(Options::stopped()).await;
    app.insert_preexisting_users(5_000).await;
    let mut matched = Vec::new();
    for n in 1..=2_000 {
        // Half of them already hold the user's names, half an older family name.
        let id = seed_known(&app, &format!("pre{n}@example.com"), &format!("F{n}"), n);
        if n % 2 == 1 {
            app.fake.edit_contact(id, |c| c.family_name = Some("Older".into()));
        }
        matched.push((n, id));
    }
    for n in 0..1_000 {
        app.fake.seed_contact_json(
            json!({"email_addresses": [{"field": "EMAIL1", "email": format!("stranger{n}@example.com")}]}),
        );
    }
    let options =
        keap_sync::RunOptions { backfill: Some(keap_sync::BackfillMode::Resume), ..Default::default() };
    app.start_daemon_with_options(app.config(), options).await;
    app::eventually(Duration::from_secs(120), "the backfill done", || async {
        app.count("select count(*) from keap_sync.backfill where state = 'done'").await == 1
    })
    .await;
    app.wait_idle().await;

    let contact_calls = app.fake.count(|r| r.path.starts_with("/crm/rest/v1/contacts"));
    let list_calls = app.fake.count(|r| r.path.ends_with("/v2/contacts"));
    eprintln!("backfill of 5,000 users: {contact_calls} contact calls, {list_calls} list calls");
    assert_eq!(lookups(&app), 0, "no lookup by email");
    assert!(contact_calls <= 5_000, "{contact_calls} contact calls for 5,000 users");
    assert!(list_calls <= 20, "{list_calls} list calls");
    assert_eq!(app.fake.contacts().len(), 6_000, "3,000 contacts made, none twice");
    assert_eq!(app.count("select count(*) from keap_sync.contact_map").await, 5_000);
    for (n, id) in matched {
        assert_eq!(linked(&app, &n.to_string()).await, Some(id), "user {n} linked to its contact");
        assert_kept(&app, id, n);
        assert_eq!(app.fake.contact(id).unwrap().family_name.as_deref(), Some(format!("L{n}").as_str()));
    }
    for n in [2_001, 3_500, 5_000] {
        assert_eq!(app.fake.contacts_with_email(&format!("pre{n}@example.com")).len(), 1);
    }
}

/// A contact made in Keap after the mirror's listing, with a new user's address, is found by
/// the listing of what changed since (one list call), linked and patched: not duplicated,
/// and its other addresses and phone kept. No lookup by email is made.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_contact_made_in_keap_after_the_listing_is_linked_not_duplicated() {
    let mut app = spawn_app_with(Options::stopped()).await;
    keap_sync::refresh_mirror(&app.config()).await.expect("the listing");
    let late = seed_known(&app, "late@example.com", "Someone", 7);
    let lists_before = app.fake.count(|r| r.path.ends_with("/v2/contacts"));
    app.start_daemon().await;

    app.exec("insert into users (email, first_name, last_name) values ('late@example.com', 'Late', 'L7')")
        .await;
    app.wait_idle().await;

    assert_eq!(app.fake.contacts_with_email("late@example.com").len(), 1, "no duplicate");
    let key: i64 = app.db.query_one("select id from users", &[]).await.unwrap().get(0);
    assert_eq!(linked(&app, &key.to_string()).await, Some(late));
    assert_eq!(app.fake.contact(late).unwrap().given_name.as_deref(), Some("Late"));
    assert_kept(&app, late, 7);
    assert_eq!(lookups(&app), 0, "answered by the mirror");
    assert_eq!(
        app.fake.count(|r| r.path.ends_with("/v2/contacts")) - lists_before,
        1,
        "one listing of what changed"
    );
    assert_eq!(app.contact_calls("PATCH") + app.contact_calls("PUT"), 1);
}

/// The mirror is only a cache (invariant 20). A contact it still holds but Keap deleted is
/// read before a user is linked to it (Keap's 404 removes it from the mirror, and the user
/// gets a contact of its own); an address a linked user gave up is free for a new user, who
/// gets a contact of its own, not the other user's; and the contact of a user keap-sync made
/// a moment ago is known, so a second user with that address is parked, never written over it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stale_mirror_never_links_a_deleted_contact_nor_writes_over_another_users() {
    let mut app = spawn_app_with(Options::stopped()).await;
    let ghost = app.fake.seed_contact_json(json!({"given_name": "Ghost", "family_name": "G",
        "email_addresses": [{"field": "EMAIL1", "email": "ghost@example.com"}]}));
    app.exec("insert into users (email, first_name, last_name) values ('ann@example.com', 'Ann', 'A')").await;
    app.start_daemon().await;
    app.wait_idle().await;
    let ann = app.db.query_one("select id::text from users", &[]).await.unwrap().get::<_, String>(0);
    let ann_contact = linked(&app, &ann).await.expect("ann linked");
    keap_sync::refresh_mirror(&app.config()).await.expect("the listing");
    app.fake.delete_contact(ghost.id);

    // Ann moves to a new address; new users sign up with her old one and with the ghost's.
    app.exec("update users set email = 'ann.new@example.com' where id::text = '1'").await;
    app.wait_idle().await;
    app.exec(
        "insert into users (email, first_name, last_name) values
            ('ann@example.com', 'Other', 'O'), ('ghost@example.com', 'New', 'N')",
    )
    .await;
    app.wait_idle().await;
    // Then a twin of the user just made, its address differing in case alone.
    app.exec("insert into users (email, first_name, last_name) values ('ANN@example.com', 'Twin', 'T')")
        .await;
    app::eventually(Duration::from_secs(30), "the twin parked", || async {
        app.count("select count(*) from keap_sync.outbox where parked_at is not null").await == 1
    })
    .await;

    assert_eq!(app.fake.contact(ann_contact).unwrap().email1(), Some("ann.new@example.com"));
    assert_eq!(app.fake.contact(ann_contact).unwrap().given_name.as_deref(), Some("Ann"), "not written over");
    let other = app.fake.contacts_with_email("ann@example.com");
    assert_eq!(other.len(), 1, "a contact of its own for Ann's old address");
    assert_ne!(other[0].id, ann_contact);
    assert_eq!(other[0].given_name.as_deref(), Some("Other"));
    let new = app.fake.contacts_with_email("ghost@example.com");
    assert_eq!(new.len(), 1);
    assert_ne!(new[0].id, ghost.id, "not linked to the deleted contact");
    assert_eq!(
        app.count(&format!("select count(*) from keap_sync.mirror where contact_id = {}", ghost.id)).await,
        0
    );
}
