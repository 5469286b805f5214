//! Nothing in Keap is destroyed or duplicated (ARCHITECTURE.md, invariants 12–14): a user keeps
//! its one contact through a key change in flight and through a lost create followed by an email
//! change; two users never share a contact; what the marketing team keeps in Keap (other email
//! slots, fields we do not sync) survives every sync. The fake replaces arrays whole when they
//! are written, the strictest reading of Keap's documentation.

use std::time::Duration;

use keap_sync::config::OnDelete;
use keap_sync_testkit::app::{self, spawn_app_with, Options, TestApp};
use keap_sync_testkit::fake::{
    Contact, ContactWrite, EmailAddress, EmailField, FaultAction, FaultRule, RecordedRequest, Route,
};

use crate::parked_reason;

fn email(address: &str, field: EmailField) -> EmailAddress {
    EmailAddress { email: Some(address.to_owned()), field }
}

fn slots(c: &Contact) -> Vec<(EmailField, String)> {
    c.email_addresses.iter().map(|e| (e.field, e.email.clone().unwrap_or_default())).collect()
}

async fn mapped_keys(app: &TestApp, contact_id: i64) -> Vec<String> {
    let rows = app
        .db
        .query("select user_key from keap_sync.contact_map where contact_id = $1 order by 1", &[&contact_id])
        .await
        .expect("contact map");
    rows.iter().map(|r| r.get(0)).collect()
}

fn contact_writes(app: &TestApp) -> Vec<RecordedRequest> {
    app.fake.requests().into_iter().filter(|r| r.method == "PATCH" || r.method == "PUT").collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_change_while_the_first_create_is_in_flight_keeps_the_one_contact() {
    let mut app = spawn_app_with(Options {
        tweak: |c| c.delivery.on_delete = OnDelete::DeleteContact,
        ..Options::default()
    })
    .await;
    app.fake.set_latency(Duration::from_millis(300));
    app.exec("insert into users (id, email, first_name) values (1, 'renamed@example.com', 'Rena')").await;
    app::eventually(Duration::from_secs(10), "the first call for user 1 to be in flight", || async {
        app.fake.count(|r| r.path.starts_with("/crm/rest/v1/contacts")) >= 1
    })
    .await;
    app.exec("update users set id = 1000 where id = 1").await;
    app.wait_idle().await;
    app.stop_daemon().await;

    let contacts = app.fake.contacts_with_email("renamed@example.com");
    assert_eq!(contacts.len(), 1, "one contact, not deleted and not duplicated: {contacts:?}");
    assert_eq!(mapped_keys(&app, contacts[0].id).await, ["1000"], "only the live key maps to it");
    assert_eq!(app.count("select count(*) from keap_sync.contact_map where user_key = '1'").await, 0);
    assert_eq!(app.contact_calls("DELETE"), 0, "a renamed user's contact is never deleted");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_create_then_an_email_change_still_makes_one_contact() {
    let mut app = spawn_app_with(Options {
        // A retry far enough away that the email can change first.
        tweak: |c| c.delivery.retry_base = Duration::from_secs(600),
        ..Options::default()
    })
    .await;
    app.fake.inject(FaultRule::new(Route::Upsert, FaultAction::DropAfterCommit).times(1));
    app.exec("insert into users (id, email, first_name) values (7, 'first@example.com', 'Lost')").await;
    app::eventually(
        Duration::from_secs(10),
        "the create's reply to be lost and a retry scheduled",
        || async {
            app.count("select count(*) from keap_sync.outbox where user_key = '7' and last_error is not null")
                .await
                == 1
        },
    )
    .await;
    assert_eq!(app.fake.contacts().len(), 1, "Keap created the contact; its answer was lost");

    app.exec("update users set email = 'second@example.com' where id = 7").await;
    // The retry comes due.
    app.exec("update keap_sync.outbox set next_attempt_at = now() where user_key = '7'").await;
    app.wait_idle().await;
    app.stop_daemon().await;

    let contacts = app.fake.contacts();
    assert_eq!(
        contacts.len(),
        1,
        "the retry found the contact it created instead of making another: {contacts:?}"
    );
    assert_eq!(contacts[0].email1(), Some("second@example.com"));
    assert_eq!(mapped_keys(&app, contacts[0].id).await, ["7"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_users_with_one_email_never_share_a_contact() {
    let mut app = spawn_app_with(Options::default()).await;
    app.exec("insert into users (id, email, first_name, last_name) values (1, 'shared@example.com', 'Ann', 'First')")
        .await;
    app.wait_idle().await;
    app.exec("insert into users (id, email, first_name, last_name) values (2, 'shared@example.com', 'Bob', 'Second')")
        .await;
    app::eventually(Duration::from_secs(10), "the second user to be parked", || async {
        app.count("select count(*) from keap_sync.outbox where user_key = '2' and parked_at is not null")
            .await
            == 1
    })
    .await;
    app.stop_daemon().await;

    let contacts = app.fake.contacts();
    assert_eq!(contacts.len(), 1);
    assert_eq!(
        (contacts[0].given_name.as_deref(), contacts[0].family_name.as_deref()),
        (Some("Ann"), Some("First")),
        "the second user did not overwrite the first one's contact"
    );
    assert_eq!(mapped_keys(&app, contacts[0].id).await, ["1"]);
    let reason: String = app
        .db
        .query_one("select last_error from keap_sync.outbox where user_key = '2'", &[])
        .await
        .unwrap()
        .get(0);
    assert!(reason.contains("user 1"), "the message names the other user: {reason}");
    let unique = "insert into keap_sync.contact_map (user_key, contact_id, fingerprint) \
                  select '2', contact_id, '' from keap_sync.contact_map where user_key = '1'";
    let refused =
        app.db.batch_execute(unique).await.expect_err("the schema refuses a second key for one contact");
    let refused = refused.as_db_error().unwrap_or_else(|| panic!("a database error: {refused}"));
    assert_eq!(refused.code(), &tokio_postgres::error::SqlState::UNIQUE_VIOLATION, "{refused}");
    assert_eq!(refused.constraint(), Some("contact_map_contact_idx"), "{refused}");
}

/// Two new users with one email, delivered at the same moment: their creates are recorded in
/// one batch statement, which the email's uniqueness among creates in flight fails as a whole;
/// recorded alone, one create goes ahead and the other waits, then finds the contact linked to
/// the first user and is parked. One contact, never two (invariant 14).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_new_users_with_one_email_at_once_make_one_contact() {
    let app = spawn_app_with(Options::default()).await;
    // Both lookups are answered (empty) before either create is recorded.
    app.fake.set_latency(Duration::from_millis(50));
    app.exec(
        "insert into users (id, email, first_name, last_name)
         values (1, 'shared@example.com', 'Ann', 'First'), (2, 'shared@example.com', 'Bob', 'Second')",
    )
    .await;
    app::eventually(Duration::from_secs(15), "one of the two users to be parked", || async {
        app.count("select count(*) from keap_sync.outbox where parked_at is not null").await == 1
            && app.count("select count(*) from keap_sync.contact_map").await == 1
    })
    .await;
    let contacts = app.fake.contacts_with_email("shared@example.com");
    assert_eq!(contacts.len(), 1, "one contact for one email: {contacts:?}");
    let calls: Vec<String> = app
        .fake
        .requests()
        .iter()
        .map(|r| format!("{} {}?{} {} {}", r.method, r.path, r.query, r.status, r.body))
        .collect();
    assert_eq!(app.contact_calls("PUT"), 1, "one create was sent: {calls:?}");
    let reason: String = app
        .db
        .query_one("select last_error from keap_sync.outbox where parked_at is not null", &[])
        .await
        .unwrap()
        .get(0);
    assert!(reason.contains("already linked to user"), "the parked one says why: {reason}");
    let owner: String =
        app.db.query_one("select user_key from keap_sync.contact_map", &[]).await.unwrap().get(0);
    let name = if owner == "1" { "Ann" } else { "Bob" };
    assert_eq!(contacts[0].given_name.as_deref(), Some(name), "the contact holds its own user's values");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn other_email_slots_and_unsynced_fields_survive_every_sync() {
    let mut app = spawn_app_with(Options {
        // last_name is not synced: the family name belongs to whoever edits it in Keap.
        tweak: |c| c.users.family_name = None,
        ..Options::default()
    })
    .await;
    let seeded = app.fake.seed_contact(ContactWrite {
        given_name: Some("Old".into()),
        family_name: Some("From Marketing".into()),
        email_addresses: Some(vec![
            email("ada@example.com", EmailField::Email1),
            email("ada.work@example.com", EmailField::Email2),
        ]),
        duplicate_option: None,
    });
    app.exec("insert into users (id, email, first_name, last_name) values (1, 'ada@example.com', 'Ada', 'Lovelace')")
        .await;
    app.wait_idle().await;
    let linked = app.fake.contact(seeded.id).expect("the existing contact");
    assert_eq!(mapped_keys(&app, seeded.id).await, ["1"], "the existing contact was linked");
    assert_eq!(linked.given_name.as_deref(), Some("Ada"));
    assert_eq!(linked.family_name.as_deref(), Some("From Marketing"), "a field we do not sync is untouched");
    assert_eq!(
        slots(&linked),
        [(EmailField::Email1, "ada@example.com".into()), (EmailField::Email2, "ada.work@example.com".into())]
    );

    // Someone adds EMAIL3 in Keap by hand; then the app renames the user.
    app.fake.edit_contact(seeded.id, |c| {
        c.email_addresses.push(email("ada.home@example.com", EmailField::Email3))
    });
    let writes_before = contact_writes(&app).len();
    app.exec("update users set first_name = 'Augusta', last_name = 'King' where id = 1").await;
    app.wait_idle().await;
    let writes = contact_writes(&app);
    assert_eq!(writes.len(), writes_before + 1, "one write for one change");
    let patch = writes.last().unwrap();
    assert_eq!(patch.method, "PATCH");
    assert_eq!(patch.query, "update_mask=given_name", "only the changed, synced property");
    assert_eq!(patch.body, r#"{"given_name":"Augusta"}"#);

    // A new EMAIL1: the array is written, with the other slots as Keap holds them.
    app.exec("update users set email = 'augusta@example.com' where id = 1").await;
    app.wait_idle().await;
    app.stop_daemon().await;
    let c = app.fake.contact(seeded.id).expect("the same contact");
    assert_eq!(
        slots(&c),
        [
            (EmailField::Email1, "augusta@example.com".into()),
            (EmailField::Email2, "ada.work@example.com".into()),
            (EmailField::Email3, "ada.home@example.com".into())
        ]
    );
    assert_eq!(c.family_name.as_deref(), Some("From Marketing"));
    assert_eq!(app.fake.contacts().len(), 1);
}

/// Installs that mapped two users to one contact before the unique index existed: migration
/// 0005 keeps the earliest mapping and parks the other user with a message naming the first.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_migration_parks_users_that_shared_a_contact() {
    let conninfo = app::cluster().fresh_database("m").await.expect("database");
    let mut db = app::connect(&conninfo).await;
    db.batch_execute(app::USERS_DDL).await.unwrap();
    // The schema as migrations 0001-0004 left it, recorded as `keap-sync migrate` records them.
    db.batch_execute(
        "create schema keap_sync;
         create table keap_sync.schema_migrations (version integer primary key, name text not null,
             checksum text not null, applied_at timestamptz not null default now());",
    )
    .await
    .unwrap();
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/sql");
    for (version, name) in [
        (1, "0001_core.sql"),
        (2, "0002_priorities_and_failures.sql"),
        (3, "0003_backfill_and_instances.sql"),
        (4, "0004_key_change_keeps_contact.sql"),
    ] {
        let sql = std::fs::read_to_string(format!("{dir}/{name}")).unwrap();
        db.batch_execute(&sql).await.unwrap();
        db.execute(
            "insert into keap_sync.schema_migrations (version, name, checksum)
             values ($1, $2, encode(sha256(convert_to($3, 'UTF8')), 'hex'))",
            &[&version, &name, &sql],
        )
        .await
        .unwrap();
    }
    db.batch_execute(
        "insert into keap_sync.contact_map (user_key, contact_id, fingerprint, synced_at) values
             ('1', 1001, 'f', now() - interval '2 days'),
             ('2', 1001, 'f', now() - interval '1 day'),
             ('3', 1002, 'f', now())",
    )
    .await
    .unwrap();

    let env = |k: &str| (k == "DATABASE_URL").then(|| conninfo.clone());
    let config = keap_sync::config::Config::from_env(&env).unwrap();
    let report = keap_sync::migrate(&mut db, &config.users).await.expect("migrate");
    assert!(report.applied.iter().any(|m| m.starts_with("0005")), "{report:?}");

    let mapped: Vec<(String, i64)> = db
        .query("select user_key, contact_id from keap_sync.contact_map order by 1", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    assert_eq!(
        mapped,
        [("1".to_owned(), 1001), ("3".to_owned(), 1002)],
        "the earliest mapping keeps the contact"
    );
    let parked: Vec<(String, String)> = db
        .query("select user_key, last_error from keap_sync.outbox where parked_at is not null", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    assert_eq!(parked.len(), 1, "{parked:?}");
    assert_eq!(parked[0].0, "2");
    assert!(parked[0].1.contains("contact 1001") && parked[0].1.contains("user 1"), "{}", parked[0].1);
}

/// 0012 repairs the guard: in-doubt creates that 0005's index let in twice for one email keep
/// it on one row, the others are cleared, and the new index refuses a second one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_migration_keeps_one_in_doubt_create_per_email() {
    let conninfo = app::cluster().fresh_database("guard").await.unwrap();
    let db = app::connect(&conninfo).await;
    let body = |email: &str, name: &str| {
        format!(
            r#"'{{"email_addresses": [{{"email": "{email}", "field": "EMAIL1"}}], "given_name": "{name}"}}'"#
        )
    };
    crate::migrate_up_to(
        &db,
        "_create_email_guard.sql",
        &format!(
            "insert into keap_sync.outbox (user_key, create_sent) values
                 ('1', {}), ('2', {}), ('3', {}), ('4', null)",
            body("Same@example.com", "A"),
            body("same@example.com", "B"),
            body("other@example.com", "C"),
        ),
    )
    .await;
    let kept: Vec<String> = db
        .query("select user_key from keap_sync.outbox where create_sent is not null order by 1", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(kept, ["1", "3"], "one in-doubt create per email, the lowest key's");
    let second = format!(
        "update keap_sync.outbox set create_sent = {} where user_key = '4'",
        body("SAME@example.com", "D")
    );
    let refused = db.batch_execute(&second).await.expect_err("a second create in flight for one email");
    assert_eq!(refused.code(), Some(&tokio_postgres::error::SqlState::UNIQUE_VIOLATION));
}

/// Keap's `?email=` filter is undocumented; the fake plays the widest reading (any of
/// EMAIL1..3, part of an address, every match). A contact holding the user's address only in EMAIL2 or EMAIL3 may be
/// someone else's (a spouse, an assistant): it is never adopted, overwritten or deleted, and
/// the user is parked naming it, its slot and the way out. A contact whose EMAIL1 is the address
/// (in any case) is adopted, even when a lower id holds it in another slot.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_a_contact_whose_email1_is_the_address_is_adopted() {
    let mut app = spawn_app_with(Options {
        tweak: |c| c.delivery.on_delete = OnDelete::DeleteContact,
        ..Options::default()
    })
    .await;
    let stranger = app.fake.seed_contact(ContactWrite {
        given_name: Some("Stranger".into()),
        family_name: None,
        email_addresses: Some(vec![
            email("stranger@example.com", EmailField::Email1),
            email("ada@example.com", EmailField::Email2),
        ]),
        duplicate_option: None,
    });
    app.exec("insert into users (id, email, first_name) values (1, 'ada@example.com', 'Ada')").await;
    app::eventually(Duration::from_secs(10), "user 1 to be parked or linked", || async {
        parked_reason(&app, "1").await.is_some()
            || app.count("select count(*) from keap_sync.contact_map where user_key = '1'").await == 1
    })
    .await;
    assert_eq!(
        mapped_keys(&app, stranger.id).await,
        Vec::<String>::new(),
        "a stranger's contact was adopted"
    );
    let reason = parked_reason(&app, "1").await.expect("user 1 is parked");
    for needle in [format!("contact {}", stranger.id), "EMAIL2".into(), "failures retry 1".into()] {
        assert!(reason.contains(&needle), "the reason names {needle}: {reason}");
    }
    assert_eq!(app.contact_calls("PUT") + app.contact_calls("PATCH"), 0, "nothing was written");
    let kept = app.fake.contact(stranger.id).expect("the stranger's contact");
    assert_eq!(kept.given_name.as_deref(), Some("Stranger"));
    assert_eq!(slots(&kept), slots(&stranger));

    // Deleting the user (with on_delete = delete_contact) deletes nothing it never owned.
    app.exec("delete from users where id = 1").await;
    app.wait_idle().await;
    assert!(app.fake.contact(stranger.id).is_some(), "a contact keap-sync never owned was deleted");

    // A lower id holding the address in EMAIL3, a higher one in EMAIL1 (another case): the
    // EMAIL1 one is the user's.
    let other = app.fake.seed_contact(ContactWrite {
        given_name: Some("Other".into()),
        family_name: None,
        email_addresses: Some(vec![
            email("other@example.com", EmailField::Email1),
            email("bob@example.com", EmailField::Email3),
        ]),
        duplicate_option: None,
    });
    let own = app.fake.seed_contact(ContactWrite {
        given_name: Some("Robert".into()),
        family_name: None,
        email_addresses: Some(vec![email("Bob@Example.com", EmailField::Email1)]),
        duplicate_option: None,
    });
    assert!(other.id < own.id);
    app.exec("insert into users (id, email, first_name) values (2, 'bob@example.com', 'Bob')").await;
    app.wait_idle().await;
    app.stop_daemon().await;
    assert_eq!(mapped_keys(&app, own.id).await, ["2"], "the contact whose EMAIL1 is the address");
    assert_eq!(mapped_keys(&app, other.id).await, Vec::<String>::new());
    assert_eq!(app.fake.contact(own.id).unwrap().given_name.as_deref(), Some("Bob"));
    assert_eq!(app.fake.contact(other.id).unwrap().given_name.as_deref(), Some("Other"));
    assert_eq!(app.fake.contacts().len(), 3, "no contact created");
}

/// A user parked because its contact is linked to another user clears by itself once that
/// link is gone (here: the other user is deleted), as its message says, without a
/// `failures retry`, and takes over the contact.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_park_on_a_contact_taken_by_another_user_clears_when_that_link_is_gone() {
    let mut app = spawn_app_with(Options::default()).await;
    app.exec("insert into users (id, email, first_name) values (1, 'shared@example.com', 'Ann')").await;
    app.wait_idle().await;
    app.exec("insert into users (id, email, first_name) values (2, 'shared@example.com', 'Bob')").await;
    app::eventually(Duration::from_secs(10), "user 2 to be parked", || async {
        parked_reason(&app, "2").await.is_some()
    })
    .await;
    let contact = app.fake.contacts_with_email("shared@example.com")[0].id;
    let reason = parked_reason(&app, "2").await.unwrap();
    assert!(reason.contains("user 1") && reason.contains(&format!("contact {contact}")), "{reason}");

    app.exec("delete from users where id = 1").await;
    app::eventually(Duration::from_secs(15), "user 2 to take over the contact by itself", || async {
        mapped_keys(&app, contact).await == ["2"]
    })
    .await;
    app.wait_idle().await;
    app.stop_daemon().await;
    assert_eq!(parked_reason(&app, "2").await, None);
    assert_eq!(app.fake.contact(contact).unwrap().given_name.as_deref(), Some("Bob"));
    assert_eq!(app.fake.contacts().len(), 1);
}

/// A create whose request never reached Keap leaves its email in doubt. Meanwhile another
/// user links the contact that has that email, and this user's email changes. The first
/// lookup settles the doubt: the contact found is another user's, so nothing of this user's
/// exists, and the user gets a contact of its own instead of being parked on every change
/// (and after `failures retry`) against the other user's contact.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_in_doubt_create_is_settled_by_its_first_lookup() {
    let mut app = spawn_app_with(Options {
        tweak: |c| c.delivery.retry_base = Duration::from_secs(600),
        ..Options::default()
    })
    .await;
    app.fake.inject(FaultRule::new(Route::Upsert, FaultAction::Drop).times(1));
    app.exec("insert into users (id, email, first_name) values (7, 'first@example.com', 'Seven')").await;
    app::eventually(Duration::from_secs(10), "the create to be in doubt", || async {
        app.count("select count(*) from keap_sync.outbox where user_key = '7' and create_sent is not null")
            .await
            == 1
            && app
                .count(
                    "select count(*) from keap_sync.outbox where user_key = '7' and last_error is not null",
                )
                .await
                == 1
    })
    .await;
    assert_eq!(app.fake.contacts().len(), 0, "the create never reached Keap");

    let theirs = app.fake.seed_contact(ContactWrite {
        given_name: Some("Nine".into()),
        family_name: None,
        email_addresses: Some(vec![email("first@example.com", EmailField::Email1)]),
        duplicate_option: None,
    });
    app.exec("insert into users (id, email, first_name) values (9, 'first@example.com', 'Nine')").await;
    app::eventually(Duration::from_secs(10), "user 9 linked", || async {
        mapped_keys(&app, theirs.id).await == ["9"]
    })
    .await;

    app.exec("update users set email = 'second@example.com' where id = 7").await;
    app.exec("update keap_sync.outbox set next_attempt_at = now() where user_key = '7'").await;
    app::eventually(Duration::from_secs(10), "user 7 linked or parked", || async {
        parked_reason(&app, "7").await.is_some()
            || app.count("select count(*) from keap_sync.contact_map where user_key = '7'").await == 1
    })
    .await;
    if let Some(reason) = parked_reason(&app, "7").await {
        panic!("user 7 was parked against the in-doubt create's old email: {reason}");
    }
    app.wait_idle().await;
    app.stop_daemon().await;
    let own = app.fake.contacts_with_email("second@example.com");
    assert_eq!(own.len(), 1, "{own:?}");
    assert_eq!(mapped_keys(&app, own[0].id).await, ["7"]);
    assert_eq!(mapped_keys(&app, theirs.id).await, ["9"]);
    assert_eq!(app.fake.contact(theirs.id).unwrap().given_name.as_deref(), Some("Nine"), "not overwritten");
    assert_eq!(
        app.count("select count(*) from keap_sync.outbox where create_sent is not null").await,
        0,
        "the doubt is settled"
    );
}

/// The lookup by email may match part of an address (the fake's default reading): contacts
/// whose addresses merely contain the user's are neither linked nor a reason to park; only a
/// contact whose EMAIL1 is the whole address (in any case) is linked.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partial_email_match_is_neither_linked_nor_a_reason_to_park() {
    let app = spawn_app_with(Options::default()).await;
    let seed = |slots: Vec<EmailAddress>| {
        app.fake.seed_contact(ContactWrite {
            given_name: Some("Other".into()),
            family_name: None,
            email_addresses: Some(slots),
            duplicate_option: None,
        })
    };
    let near: Vec<Contact> = vec![
        seed(vec![email("joann@example.com", EmailField::Email1)]),
        seed(vec![email("ann@example.com.au", EmailField::Email1)]),
        seed(vec![
            email("x@example.org", EmailField::Email1),
            email("mary-ann@example.com", EmailField::Email2),
        ]),
        seed(vec![email("Bo@Example.com", EmailField::Email1)]),
    ];
    app.exec("insert into users (id, email, first_name) values (1, 'ann@example.com', 'Ann')").await;
    app.exec("insert into users (id, email, first_name) values (2, 'o@example.com', 'O')").await;
    app.exec("insert into users (id, email, first_name) values (3, 'bo@example.com', 'Bo')").await;
    app.wait_idle().await;
    for c in &near[..3] {
        assert_eq!(mapped_keys(&app, c.id).await, Vec::<String>::new(), "contact {} was linked", c.id);
        assert_eq!(app.fake.contact(c.id).expect("kept").given_name.as_deref(), Some("Other"), "written");
    }
    let ann = app.fake.contacts_with_email("ann@example.com");
    assert_eq!(ann.len(), 1, "user 1 got a contact of its own");
    assert_eq!(mapped_keys(&app, ann[0].id).await, ["1"]);
    // `o@example.com` is part of every address seeded: still a contact of its own.
    assert_eq!(app.fake.contacts_with_email("o@example.com").len(), 1);
    // Among the partial matches, the contact whose EMAIL1 is the address (another case) is linked.
    assert_eq!(mapped_keys(&app, near[3].id).await, ["3"]);
    assert_eq!(app.count("select count(*) from keap_sync.outbox").await, 0, "nobody parked");
}
