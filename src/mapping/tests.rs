//! Unit tests of the mapping: payloads, fingerprints, changes and Keap's rules.

use super::*;
use crate::config::Config;

fn mapper(extra: &str) -> Mapper {
    let config = Config::from_toml(extra, &|_| None).unwrap();
    Mapper::new(&config.users)
}

fn model() -> CustomModel {
    CustomModel {
        fields: vec![
            (12, "Plan".into(), "Plan".into(), "Text".into()),
            (13, "Seats".into(), "Seats".into(), "WholeNumber".into()),
        ],
    }
}

fn row(values: &[Option<&str>]) -> UserRow {
    UserRow { values: values.iter().map(|v| v.map(str::to_owned)).collect() }
}

fn payload(m: &Mapper, values: &[Option<&str>]) -> ContactPayload {
    m.payload("7", &row(values), Some(&model())).unwrap()
}

#[test]
fn no_email_is_a_mapping_error_naming_the_key_and_column() {
    let m = mapper("");
    for email in [None, Some("  ")] {
        let err = m.payload("7", &row(&[email, Some("A"), None]), None).unwrap_err().to_string();
        assert!(err.starts_with("user 7:") && err.contains("column email"), "{err}");
    }
}

#[test]
fn fingerprint_tracks_every_field() {
    let m = mapper("");
    let a = payload(&m, &[Some("a@x.io"), Some("A"), Some("B")]);
    assert_eq!(a.fingerprint(), payload(&m, &[Some("a@x.io"), Some("A"), Some("B")]).fingerprint());
    for other in [
        [Some("b@x.io"), Some("A"), Some("B")],
        [Some("a@x.io"), Some("AB"), Some("")],
        [Some("a@x.io"), Some("A"), None],
    ] {
        assert_ne!(a.fingerprint(), payload(&m, &other).fingerprint(), "{other:?}");
    }
}

#[test]
fn only_changed_owned_properties_are_sent() {
    let m = mapper("[users]\nfamily_name = \"\"\n");
    let p = payload(&m, &[Some("a@x.io"), Some("Ada")]);
    let held = Held::from_sent(&p.sent(&RuleTags::default()));
    assert!(!p.changes(&held).any(), "what Keap holds from us is unchanged");
    let renamed = payload(&m, &[Some("a@x.io"), Some("Ada B")]);
    let changes = renamed.changes(&held);
    assert_eq!(changes.paths(), ["given_name"]);
    let (body, mask) = renamed.patch(&changes, None);
    assert_eq!(mask, ["given_name"]);
    assert_eq!(Value::Object(body), json!({"given_name": "Ada B"}));
}

#[test]
fn sent_maps_of_earlier_releases_still_count() {
    let m = mapper("");
    let p = payload(&m, &[Some("Ada@X.io"), None, Some("B")]);
    let old = json!({"email": "ada@x.io", "given_name": "", "family_name": "B"});
    assert!(!p.changes(&Held::from_sent(&old)).any());
}

#[test]
fn a_new_email1_keeps_every_other_slot() {
    let m = mapper("[users]\ngiven_name = \"\"\nfamily_name = \"\"\n");
    let p = payload(&m, &[Some("new@x.io")]);
    let current = json!({"id": 1, "email_addresses": [
        {"email": "old@x.io", "field": "EMAIL1"},
        {"email": "work@x.io", "field": "EMAIL2"},
        {"email": "home@x.io", "field": "EMAIL3"}
    ]});
    let changes = p.changes(&Held::from_contact(&current, &p));
    let (body, mask) = p.patch(&changes, Some(&current));
    assert_eq!(mask, ["email_addresses"]);
    assert_eq!(
        Value::Object(body),
        json!({"email_addresses": [
            {"email": "new@x.io", "field": "EMAIL1"},
            {"email": "work@x.io", "field": "EMAIL2"},
            {"email": "home@x.io", "field": "EMAIL3"}
        ]})
    );
}

#[test]
fn array_parts_merge_into_keaps_slots() {
    let m = mapper(
        "[users]\ngiven_name = \"\"\nfamily_name = \"\"\n[contact.phone_numbers.PHONE1]\nnumber = \"phone\"\n\
         [contact.addresses.BILLING]\nlocality = \"city\"\n[[contact.custom_fields]]\nname = \"Seats\"\nvalue = \"seats\"\n",
    );
    let p = payload(&m, &[Some("a@x.io"), Some("555-1"), Some("Paris"), Some("3")]);
    let current = json!({"id": 1, "email_addresses": [{"email": "a@x.io", "field": "EMAIL1"}],
        "phone_numbers": [{"number": "555-0", "field": "PHONE1", "type": "Work", "number_e164": "+1555"}, {"number": "999", "field": "PHONE2"}],
        "addresses": [{"field": "BILLING", "line1": "1 Main St", "locality": "Lyon"}],
        "custom_fields": [{"id": 12, "content": "Pro"}, {"id": 13, "content": 2}]});
    let changes = p.changes(&Held::from_contact(&current, &p));
    let (body, mask) = p.patch(&changes, Some(&current));
    assert_eq!(mask, ["addresses", "custom_fields", "phone_numbers"]);
    assert_eq!(
        Value::Object(body),
        json!({
            "phone_numbers": [{"number": "555-1", "field": "PHONE1", "type": "Work"}, {"number": "999", "field": "PHONE2"}],
            "addresses": [{"field": "BILLING", "line1": "1 Main St", "locality": "Paris"}],
            "custom_fields": [{"id": 12, "content": "Pro"}, {"id": 13, "content": 3}]
        })
    );
    let create = p.create_body();
    assert_eq!(create["custom_fields"], json!([{"id": 13, "content": 3}]));
}

#[test]
fn empty_values_keep_or_clear_as_configured() {
    let m = mapper("[contact]\njob_title = \"job\"\nwebsite = { column = \"site\", empty = \"clear\" }\n");
    let p = payload(&m, &[Some("a@x.io"), None, None, None, None]);
    let owned: Vec<String> = p.owned().into_iter().map(|(k, _)| k).collect();
    assert_eq!(owned, ["family_name", "given_name", "website", "email_addresses.EMAIL1"]);
    let (body, _) = p.patch(&p.changes(&Held::default()), None);
    assert_eq!(body["website"], json!(""));
    assert!(!body.contains_key("job_title"));
}

#[test]
fn invalid_values_name_the_column_and_rule_not_the_value() {
    let m = mapper("[contact.addresses.BILLING]\nregion = \"state\"\ncountry_code = \"country\"\n");
    // Parts of an address are read in the order of `AddressPart` (country_code before region).
    let err = m
        .payload("u-1", &row(&[Some("a@x.io"), None, None, None, Some("Arizona")]), None)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("user u-1") && err.contains("column state") && err.contains("without a country"),
        "{err}"
    );
    assert!(!err.contains("Arizona"), "{err}");
    let long = "é".repeat(41);
    let err = m
        .payload("u-2", &row(&[Some("a@x.io"), Some(&long), None, None, None]), None)
        .unwrap_err()
        .to_string();
    assert!(err.contains("column first_name") && err.contains("at most 40") && !err.contains('é'), "{err}");
}

#[test]
fn tags_follow_their_rules() {
    let m = mapper("[[tags.from]]\ncolumn = \"plan\"\ntag = \"Plan: {value}\"\n[[tags.from]]\ncolumn = \"vip\"\ntag = 9\n");
    let p = payload(&m, &[Some("a@x.io"), None, None, Some("Pro"), Some("true")]);
    assert_eq!(p.tags, BTreeSet::from([TagRef::Name("Plan: Pro".into()), TagRef::Id(9)]));
    let p = payload(&m, &[Some("a@x.io"), None, None, None, Some("false")]);
    assert!(p.tags.is_empty());
}

#[test]
fn a_shared_email_compares_without_case_and_a_shared_custom_field_is_placed_by_its_id() {
    let m = mapper(
        "[contact.email_addresses]\nEMAIL2 = { column = \"e2\", owner = \"shared\", prefer = \"keap\" }\n\
         [[contact.custom_fields]]\nname = \"Plan\"\nvalue = { column = \"plan\", owner = \"shared\", prefer = \"app\" }\n",
    );
    let agreed = payload(&m, &[Some("a@x.io"), Some("A"), Some("B"), Some("Ada@Work.io"), Some("Basic")]);
    let sent = agreed.sent(&RuleTags::default());
    let base = Held::from_sent(&sent);
    let keap = |e2: &str, plan: &str| {
        json!({"email_addresses": [{"field": "EMAIL1", "email": "a@x.io"}, {"field": "EMAIL2", "email": e2}],
               "custom_fields": [{"id": 12, "content": plan}]})
    };
    let plan = path(&Field::Custom(CustomFieldRef::Name("Plan".into())), Some(&model()));
    assert_eq!(plan, Some(Path::Custom(12)), "a name is placed through Keap's model");
    assert_eq!(path(&Field::Custom(CustomFieldRef::Name("Tier".into())), Some(&model())), None);
    let shared = [Path::Email(2), Path::Custom(12)];
    // Keap holding EMAIL2 in other letters has not moved; the row in other letters sends nothing.
    assert!(!moved_in_keap(&shared, &sent, &keap("ada@WORK.io", "Basic")));
    assert!(!agreed.keap_moved(&base, &keap("ada@WORK.io", "Basic")));
    let recased = payload(&m, &[Some("a@x.io"), Some("A"), Some("B"), Some("ADA@work.io"), Some("Basic")]);
    assert!(!recased.changes(&base).any());
    // The custom field changed in Keap: the inbound pass and delivery both see it.
    assert!(moved_in_keap(&shared, &sent, &keap("Ada@Work.io", "Pro")));
    assert!(!moved_in_keap(&shared[..1], &sent, &keap("Ada@Work.io", "Pro")));
    assert!(agreed.keap_moved(&base, &keap("Ada@Work.io", "Pro")));
    assert_eq!(keap_value(&keap("x@y.io", "Pro"), &Path::Custom(12)).as_deref(), Some("Pro"));
    assert_eq!(keap_value(&keap("x@y.io", " "), &Path::Custom(12)), None, "a blank value is none");
    // Both changed EMAIL2 to the same address but for case: no conflict, nothing taken or sent.
    let both = payload(&m, &[Some("a@x.io"), Some("A"), Some("B"), Some("new@X.io"), Some("Basic")]);
    let mut changes = both.changes(&base);
    let settled = both.settle_shared(&base, &keap("NEW@x.io", "Basic"), &mut changes);
    assert!(!settled.any() && !changes.any(), "{settled:?} {changes:?}");
    // Both changed the custom field differently: prefer = "app" sends the row's, one conflict.
    let pro = payload(&m, &[Some("a@x.io"), Some("A"), Some("B"), Some("Ada@Work.io"), Some("Pro")]);
    let mut changes = pro.changes(&base);
    let settled = pro.settle_shared(&base, &keap("Ada@Work.io", "Max"), &mut changes);
    assert_eq!(changes.paths(), ["custom_fields.12"]);
    assert_eq!(settled.conflicts.len(), 1);
    assert_eq!(
        (settled.conflicts[0].app.as_deref(), settled.conflicts[0].keap.as_deref()),
        (Some("Pro"), Some("Max"))
    );
}
