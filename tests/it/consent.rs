//! Email consent (invariant 17): Keap owns it, and keap-sync only ever sends it when the user's
//! consent itself changes to given, never over an opt-out Keap holds unless the mapping says
//! `over_opt_out = true`. The fake plays the strict reading: a contact read does not answer
//! `opt_in_reason`, and an `opt_in_reason` lifts a hand opt-out ("Manual"), as Keap's v1 spec
//! says it does.

use keap_sync_testkit::app::{spawn_app_with, Options, TestApp};
use keap_sync_testkit::fake::{ContactWrite, EmailAddress, EmailField, RecordedRequest};
use serde_json::Value;

use crate::{wait_settled, writes_since};

const DDL: &str = "create table public.users (
    id          bigserial primary key,
    email       text,
    first_name  text,
    last_name   text,
    phone       text,
    consent     boolean not null default false
)";

const TOML: &str = r#"
[contact]
opt_in_reason = { sql = "case when consent then 'Consented at sign-up' end" }

[contact.phone_numbers.PHONE1]
number = "phone"
"#;

const OVER_OPT_OUT_TOML: &str = r#"
[contact]
opt_in_reason = { sql = "case when consent then 'Consented at sign-up' end", over_opt_out = true }

[contact.phone_numbers.PHONE1]
number = "phone"
"#;

async fn consent_app(toml: &'static str) -> TestApp {
    spawn_app_with(Options { users_ddl: DDL, toml, ..Options::default() }).await
}

fn carries_consent(r: &RecordedRequest) -> bool {
    serde_json::from_str::<Value>(&r.body).ok().is_some_and(|b| b.get("opt_in_reason").is_some())
}

fn seed(app: &TestApp, email: &str) -> i64 {
    app.fake
        .seed_contact(ContactWrite {
            given_name: Some("Seeded".into()),
            family_name: None,
            email_addresses: Some(vec![EmailAddress {
                email: Some(email.into()),
                field: EmailField::Email1,
            }]),
            duplicate_option: None,
        })
        .id
}

/// Defect: a person opted out by hand in Keap; the next change of another mapped field read
/// the contact (its phone is an array), found no `opt_in_reason` in the read, took consent
/// for missing and sent it again: Keap lifted the opt-out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hand_opt_out_in_keap_survives_the_next_change_of_another_field() {
    let app = consent_app(TOML).await;
    app.exec("insert into users (id, email, first_name, phone, consent) values (1, 'ada@example.com', 'Ada', '555-0001', true)").await;
    wait_settled(&app).await;
    assert_eq!(app.fake.email_status("ada@example.com"), "UnconfirmedMarketable", "consent given at sign-up");
    app.fake.set_email_status("ada@example.com", "Manual");
    let before = app.fake.requests().len();
    app.exec("update users set phone = '555-0002', first_name = 'Ada L.' where id = 1").await;
    wait_settled(&app).await;
    let writes = writes_since(&app, before);
    assert!(!writes.is_empty(), "the change was delivered");
    assert!(!writes.iter().any(carries_consent), "consent was not sent again: {writes:?}");
    assert_eq!(app.fake.email_status("ada@example.com"), "Manual", "still opted out");
}

/// Defect: consent true -> false -> true in the table was never sent again, because the reason
/// text equalled the last one sent. Withdrawing sends nothing (Keap owns consent; keap-sync
/// does not opt a person in or out for a withdrawal); giving it again sends it once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consent_given_again_after_a_withdrawal_is_sent_again() {
    let app = consent_app(TOML).await;
    app.exec("insert into users (id, email, first_name, consent) values (1, 'bo@example.com', 'Bo', true)")
        .await;
    wait_settled(&app).await;
    let before = app.fake.requests().len();
    app.exec("update users set consent = false where id = 1").await;
    wait_settled(&app).await;
    let withdrawn = writes_since(&app, before);
    assert!(!withdrawn.iter().any(carries_consent), "a withdrawal sends no consent: {withdrawn:?}");
    // Keap now says the address is not marketable, as after a campaign's own opt-in expiry.
    app.fake.set_email_status("bo@example.com", "NonMarketable");
    let before = app.fake.requests().len();
    app.exec("update users set consent = true where id = 1").await;
    wait_settled(&app).await;
    let given = writes_since(&app, before);
    assert_eq!(given.iter().filter(|r| carries_consent(r)).count(), 1, "consent sent once: {given:?}");
    assert_eq!(app.fake.email_status("bo@example.com"), "UnconfirmedMarketable");
    // Nothing more to send: a later change of the name does not send consent again.
    let before = app.fake.requests().len();
    app.exec("update users set first_name = 'Bob' where id = 1").await;
    wait_settled(&app).await;
    assert!(!writes_since(&app, before).iter().any(carries_consent));
}

/// A new user whose address a contact opted out by hand holds: the contact is linked, the
/// other properties sent, consent not; with `over_opt_out = true` it is sent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consent_is_not_sent_over_a_hand_opt_out_unless_the_mapping_asks() {
    for (toml, lifted) in [(TOML, false), (OVER_OPT_OUT_TOML, true)] {
        let app = consent_app(toml).await;
        let id = seed(&app, "cy@example.com");
        app.fake.set_email_status("cy@example.com", "Manual");
        app.exec(
            "insert into users (id, email, first_name, consent) values (1, 'cy@example.com', 'Cy', true)",
        )
        .await;
        wait_settled(&app).await;
        let contact = app.fake.contact_json(id).expect("the seeded contact");
        assert_eq!(contact["given_name"], "Cy", "linked and written");
        let status = app.fake.email_status("cy@example.com");
        match lifted {
            false => assert_eq!(status, "Manual", "the hand opt-out stays"),
            true => assert_eq!(status, "UnconfirmedMarketable", "the mapping asked to lift it"),
        }
        assert_eq!(app.fake.contacts_with_email("cy@example.com").len(), 1, "no duplicate");
    }
}

/// A consent given in the table while Keap holds a hand opt-out for a linked contact: not
/// sent, and not tried again on the next change (recorded as handled, one read).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consent_given_later_over_a_hand_opt_out_is_withheld_once() {
    let app = consent_app(TOML).await;
    app.exec("insert into users (id, email, first_name) values (1, 'di@example.com', 'Di')").await;
    wait_settled(&app).await;
    app.fake.set_email_status("di@example.com", "Manual");
    let before = app.fake.requests().len();
    app.exec("update users set consent = true where id = 1").await;
    wait_settled(&app).await;
    assert!(!writes_since(&app, before).iter().any(carries_consent));
    assert_eq!(app.fake.email_status("di@example.com"), "Manual");
    let before = app.fake.requests().len();
    app.exec("update users set first_name = 'Diana' where id = 1").await;
    wait_settled(&app).await;
    let later = app.fake.requests().into_iter().skip(before).collect::<Vec<_>>();
    assert!(!later.iter().any(carries_consent));
    assert_eq!(
        later.iter().filter(|r| r.method == "GET").count(),
        0,
        "no read to check consent again: {later:?}"
    );
}
