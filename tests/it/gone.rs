//! Deletes and merges in Keap (issue 29, scope 5; design invariants 20, 21): a linked contact
//! a hook names and Keap's listing no longer returns is asked of Keap by id; only Keap's 404
//! unlinks the user (recorded in `keap_sync.contact_gone`, `[inbound] contact_gone_at`
//! stamped), and the user is linked again by email or created, never duplicated. No users row
//! is ever deleted, and no column of it but the stamp is written. The sweep is effectively off
//! here (`sweep_secs = 3600`), so only a hook can bring a change.

use std::time::Duration;

use keap_sync_testkit::app::{self, spawn_app_with, Options, TestApp, HOOK_PATH};

use crate::{free_port, wait_settled};

const DDL: &str = "create table public.users (
    id                    bigserial primary key,
    email                 text,
    first_name            text,
    last_name             text,
    keap_contact_gone_at  timestamptz
)";

/// The users rows, every column but the stamp, in key order.
const ROWS: &str = "select coalesce(jsonb_agg(to_jsonb(u) - 'keap_contact_gone_at' order by id), '[]')::text
                      from users u";

/// The app with its receiver on a free port, the sweep effectively off and the stamp column
/// configured, subscribed to `contact.delete` and `contact.edit` in the fake.
async fn hooked_app() -> TestApp {
    let port = free_port();
    let toml = format!(
        "[mirror]\nsweep_secs = 3600\n[hooks]\nlisten = \"127.0.0.1:{port}\"\n\
         [inbound]\ncontact_gone_at = \"keap_contact_gone_at\"\n"
    );
    let toml: &'static str = Box::leak(toml.into_boxed_str());
    let app = spawn_app_with(Options { users_ddl: DDL, toml, ..Options::default() }).await;
    app::eventually(Duration::from_secs(20), "the hook receiver listening", || async {
        tokio::net::TcpStream::connect(("127.0.0.1", port)).await.is_ok()
    })
    .await;
    let url = format!("http://127.0.0.1:{port}/{HOOK_PATH}");
    for key in ["contact.delete", "contact.edit"] {
        let hook = app.fake.subscribe_hook(key, &url).await;
        assert_eq!(hook.status, "Verified", "the receiver answered the handshake for {key}");
    }
    app
}

/// The contact user `key` is linked to, if any.
async fn linked(app: &TestApp, key: &str) -> Option<i64> {
    let sql = "select contact_id from keap_sync.contact_map where user_key = $1";
    app.db.query_opt(sql, &[&key]).await.unwrap().map(|r| r.get(0))
}

/// The stamp of user `id`.
async fn stamp(app: &TestApp, id: i64) -> Option<std::time::SystemTime> {
    let row = app.db.query_one("select keap_contact_gone_at from users where id = $1", &[&id]).await.unwrap();
    row.get(0)
}

/// Waits until `keap_sync.contact_gone` records contact `contact` of user `key`.
async fn recorded_gone(app: &TestApp, contact: i64, key: &str) {
    app::eventually(Duration::from_secs(20), "the contact recorded gone", || async {
        app.count(&format!(
            "select count(*) from keap_sync.contact_gone where contact_id = {contact} and user_key = '{key}'"
        ))
        .await
            == 1
    })
    .await;
}

/// The users rows as [`ROWS`] reads them.
async fn rows(app: &TestApp) -> String {
    app.db.query_one(ROWS, &[]).await.unwrap().get(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_contact_deleted_in_keap_is_unlinked_recorded_stamped_and_relinked_without_a_duplicate() {
    let app = hooked_app().await;
    app.exec("insert into users (id, email, first_name) values (1, 'ada@example.com', 'Ada')").await;
    wait_settled(&app).await;
    let first = linked(&app, "1").await.expect("Ada linked");
    let before = rows(&app).await;
    assert!(stamp(&app, 1).await.is_none());

    assert!(app.fake.delete_contact(first));
    recorded_gone(&app, first, "1").await;
    let asked = app.fake.count(|r| r.method == "GET" && r.path.ends_with(&format!("/v1/contacts/{first}")));
    assert!(asked >= 1, "Keap was asked for the contact by id before the unlink");
    assert!(stamp(&app, 1).await.is_some(), "the stamp column is set");
    assert_eq!(
        app.count(&format!("select count(*) from keap_sync.mirror where contact_id = {first}")).await,
        0
    );
    wait_settled(&app).await;
    assert_eq!(rows(&app).await, before, "no users row deleted or changed but the stamp");

    app.exec("update users set first_name = 'Ada B' where id = 1").await;
    wait_settled(&app).await;
    let contacts = app.fake.contacts_with_email("ada@example.com");
    assert_eq!(contacts.len(), 1, "exactly one contact for Ada: {contacts:?}");
    assert_ne!(contacts[0].id, first);
    assert_eq!(contacts[0].given_name.as_deref(), Some("Ada B"));
    assert_eq!(linked(&app, "1").await, Some(contacts[0].id), "linked to the new contact");
    assert_eq!(app.count("select count(*) from users").await, 1);
    assert!(stamp(&app, 1).await.is_some(), "the stamp is left as it is after the relink");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_contacts_merged_in_keap_unlink_the_merged_away_user_and_duplicate_nobody() {
    let app = hooked_app().await;
    app.exec(
        "insert into users (id, email, first_name) values
             (1, 'ada@example.com', 'Ada'), (2, 'bea@example.com', 'Bea')",
    )
    .await;
    wait_settled(&app).await;
    let (a, b) = (linked(&app, "1").await.unwrap(), linked(&app, "2").await.unwrap());
    let before = rows(&app).await;

    assert!(app.fake.merge_contacts(a, b));
    let kept = app.fake.contact(a).expect("A's contact kept");
    assert!(kept.email_addresses.iter().any(|e| e.email.as_deref() == Some("bea@example.com")));
    recorded_gone(&app, b, "2").await;
    wait_settled(&app).await;

    assert_eq!(rows(&app).await, before, "no users row deleted or changed but the stamp");
    assert!(stamp(&app, 2).await.is_some(), "B's stamp set");
    assert!(stamp(&app, 1).await.is_none(), "A's contact is not gone: no stamp");
    assert_eq!(linked(&app, "1").await, Some(a), "A stays linked to the surviving contact");
    // B's address lives only in EMAIL2 of A's contact: Keap's lookup finds it there, and the
    // rules of `link_or_create` park B for a person rather than link or duplicate.
    assert_eq!(linked(&app, "2").await, None, "B is not linked to A's contact");
    let parked: Option<String> = app
        .db
        .query_one(
            "select last_error from keap_sync.outbox where user_key = '2' and parked_at is not null",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert!(parked.is_some_and(|e| e.contains(&a.to_string())), "B parked, naming A's contact");
    assert_eq!(app.fake.contacts_with_email("bea@example.com").len(), 1, "no contact created for B");

    app.exec("update users set first_name = 'Ada B' where id = 1").await;
    wait_settled(&app).await;
    let ada = app.fake.contacts_with_email("ada@example.com");
    assert_eq!(ada.iter().map(|c| c.id).collect::<Vec<_>>(), vec![a], "no duplicate for A");
    assert_eq!(ada[0].given_name.as_deref(), Some("Ada B"));
    assert_eq!(app.fake.contacts().len(), 1, "one contact in Keap");
    assert_eq!(app.count("select count(*) from users").await, 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_listing_that_misses_a_linked_contact_unlinks_nothing_while_keap_still_has_it() {
    let app = hooked_app().await;
    app.exec("insert into users (id, email, first_name) values (1, 'ada@example.com', 'Ada')").await;
    wait_settled(&app).await;
    let id = linked(&app, "1").await.expect("Ada linked");
    let before = rows(&app).await;

    app.fake.hide_from_listings(id, true);
    let asked = |app: &TestApp| {
        app.fake.count(|r| r.method == "GET" && r.path.ends_with(&format!("/v1/contacts/{id}")))
    };
    let asked_before = asked(&app);
    app.fake.fire_hook("contact.edit", &[id]);
    app::eventually(Duration::from_secs(20), "Keap asked for the contact the listing missed", || async {
        asked(&app) > asked_before
            && app.count("select count(*) from keap_sync.gone_check").await == 0
            && app.count("select count(*) from keap_sync.hook_queue").await == 0
    })
    .await;

    assert_eq!(linked(&app, "1").await, Some(id), "still linked");
    assert_eq!(app.count("select count(*) from keap_sync.contact_gone").await, 0, "nothing recorded gone");
    assert!(stamp(&app, 1).await.is_none(), "no stamp");
    assert_eq!(rows(&app).await, before);
    assert_eq!(app.count("select count(*) from keap_sync.outbox").await, 0, "nothing queued");
}

/// At most one Keap call per contact in flight, across both directions (invariant 18): while
/// a delivery of the user holds a live lease, the contact it suspects gone is not asked of
/// Keap; once the lease is gone, it is.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_contact_whose_user_is_being_delivered_is_not_asked_of_keap_until_the_delivery_ends() {
    let app = hooked_app().await;
    app.exec(
        "insert into users (id, email, first_name) values (1, 'ada@example.com', 'Ada'), (2, 'bob@example.com', 'Bob')",
    )
    .await;
    wait_settled(&app).await;
    let (ada, bob) = (linked(&app, "1").await.unwrap(), linked(&app, "2").await.unwrap());
    // A delivery of Ada in flight elsewhere: a live lease on her outbox row.
    app.exec(
        "insert into keap_sync.outbox (user_key, leased_by, lease_until)
         values ('1', 'another instance', now() + interval '1 hour')",
    )
    .await;
    assert!(app.fake.delete_contact(ada));
    app::eventually(Duration::from_secs(20), "Ada's contact suspected gone", || async {
        app.count(&format!("select count(*) from keap_sync.gone_check where contact_id = {ada}")).await == 1
    })
    .await;
    // Two more passes of the hook queue (each read of Bob's edits is followed by the gone checks).
    for name in ["Bob B", "Bob C"] {
        assert!(app.fake.edit_contact(bob, |c| c.given_name = Some(name.into())));
        app::eventually(Duration::from_secs(20), "Bob's edit read through the hook", || async {
            app.count(&format!(
                "select count(*) from keap_sync.mirror where contact_id = {bob} and contact->>'given_name' = '{name}'"
            ))
            .await
                == 1
        })
        .await;
    }
    let asked = |app: &TestApp| {
        app.fake.count(|r| r.method == "GET" && r.path.ends_with(&format!("/v1/contacts/{ada}")))
    };
    assert_eq!(asked(&app), 0, "Ada's contact is not asked while her delivery holds its lease");
    app.exec("delete from keap_sync.outbox where user_key = '1'").await;
    recorded_gone(&app, ada, "1").await;
    assert!(asked(&app) >= 1, "asked once the lease is gone");
}
