//! keap-sync's mirror of Keap (`keap_sync.mirror`): the full listing through the v2 API.
//!
//! Run alone with `cargo test --test it mirror`.

use keap_sync_testkit::app::{spawn_app_with, Options};
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
