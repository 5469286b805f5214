//! From a user row to what keap-sync owns on a Keap contact, and what to send to change it.
//!
//! We own EMAIL1 and, when their columns are synced, the given and family names. Everything
//! else on the contact (tags, other email slots, phone numbers, notes) belongs to the marketing
//! team and is never sent (ARCHITECTURE.md, invariant 12):
//! - an update sends only the properties whose owned value changed, and its `update_mask` names
//!   exactly those, so a property we do not sync is never in a request;
//! - `email_addresses` is an array Keap may replace whole when written (its v2 documentation
//!   says so, v1 is silent; the fake plays replace), so it is sent only when EMAIL1 changed, and
//!   then with the other slots as Keap holds them ([`ContactPayload::patch`] takes them).
//!
//! What Keap holds of our properties ([`Held`]) comes from the contact map (`sent`, written on
//! every success) or from the contact as Keap returned it. The fingerprint, a hash of the owned
//! values, decides for mappings made before `sent` was kept.

use serde_json::{json, Value};
use sha2::{Digest, Sha256};

use crate::keap::model::{Contact, ContactWrite, DuplicateOption, EmailAddress, EmailField};
use crate::outbox::UserRow;

/// Why a row cannot become a contact. Such a change is parked, not retried: only a new change
/// to the row can fix it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum MappingError {
    #[error("the user has no email address; Keap needs one to create or find the contact")]
    NoEmail,
}

/// The contact properties we own, from one user row. A name is `None` when its column is not
/// synced, `Some("")` when it is synced but empty (which clears it in Keap).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ContactPayload {
    pub(crate) email: String,
    pub(crate) given_name: Option<String>,
    pub(crate) family_name: Option<String>,
}

/// What Keap holds of the properties we own, as far as we know.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Held {
    email: Option<String>,
    given_name: Option<String>,
    family_name: Option<String>,
}

impl Held {
    /// From `contact_map.sent`.
    pub(crate) fn from_sent(sent: &Value) -> Held {
        let text = |k: &str| sent.get(k).and_then(Value::as_str).map(str::to_owned);
        Held { email: text("email"), given_name: text("given_name"), family_name: text("family_name") }
    }

    /// For `contact_map.sent`.
    pub(crate) fn sent(&self) -> Value {
        let mut v = json!({});
        for (key, value) in
            [("email", &self.email), ("given_name", &self.given_name), ("family_name", &self.family_name)]
        {
            if let Some(value) = value {
                v[key] = json!(value);
            }
        }
        v
    }

    /// From the contact as Keap returned it (a missing name holds "").
    pub(crate) fn from_contact(c: &Contact) -> Held {
        let email1 = c.email_addresses.iter().find(|e| e.field == EmailField::Email1);
        Held {
            email: email1.and_then(|e| e.email.clone()),
            given_name: Some(c.given_name.clone().unwrap_or_default()),
            family_name: Some(c.family_name.clone().unwrap_or_default()),
        }
    }
}

/// Which owned properties differ between the row and Keap.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Changes {
    pub(crate) email: bool,
    pub(crate) given_name: bool,
    pub(crate) family_name: bool,
}

impl Changes {
    pub(crate) fn any(self) -> bool {
        self.email || self.given_name || self.family_name
    }
}

impl ContactPayload {
    pub(crate) fn from_row(row: &UserRow) -> Result<ContactPayload, MappingError> {
        let email =
            row.email.as_deref().map(str::trim).filter(|e| !e.is_empty()).ok_or(MappingError::NoEmail)?;
        Ok(ContactPayload {
            email: email.to_owned(),
            given_name: row.given_name.clone(),
            family_name: row.family_name.clone(),
        })
    }

    /// A stable hash of everything owned: same values, same fingerprint.
    pub(crate) fn fingerprint(&self) -> String {
        let mut h = Sha256::new();
        // Length-prefixed fields, so ("ab", "c") and ("a", "bc") differ, and None differs from "".
        for field in [Some(&self.email), self.given_name.as_ref(), self.family_name.as_ref()] {
            match field {
                Some(v) => {
                    h.update([1u8]);
                    h.update((v.len() as u64).to_le_bytes());
                    h.update(v.as_bytes());
                }
                None => h.update([0u8]),
            }
        }
        h.finalize().iter().take(16).map(|b| format!("{b:02x}")).collect()
    }

    /// What to keep in `contact_map.sent` once Keap holds this payload.
    pub(crate) fn sent(&self) -> Value {
        let mut v = json!({ "email": self.email });
        if let Some(g) = &self.given_name {
            v["given_name"] = json!(g);
        }
        if let Some(f) = &self.family_name {
            v["family_name"] = json!(f);
        }
        v
    }

    /// What Keap holds if it holds exactly this payload.
    pub(crate) fn as_held(&self) -> Held {
        Held::from_sent(&self.sent())
    }

    /// The owned properties whose value in Keap differs from this row. Emails compare
    /// case-insensitively (Keap matches them so); a name we do not sync never differs.
    pub(crate) fn changes(&self, held: &Held) -> Changes {
        let name_differs = |ours: &Option<String>, theirs: &Option<String>| match ours {
            None => false,
            Some(v) => theirs.as_deref() != Some(v.as_str()),
        };
        Changes {
            email: !held.email.as_deref().is_some_and(|e| e.eq_ignore_ascii_case(&self.email)),
            given_name: name_differs(&self.given_name, &held.given_name),
            family_name: name_differs(&self.family_name, &held.family_name),
        }
    }

    /// Body of `PUT /v1/contacts` for a contact that does not exist yet (find by email or
    /// create). Empty names are left out: there is nothing to clear on a new contact.
    pub(crate) fn create_body(&self) -> ContactWrite {
        ContactWrite {
            given_name: self.given_name.clone().filter(|n| !n.is_empty()),
            family_name: self.family_name.clone().filter(|n| !n.is_empty()),
            email_addresses: Some(vec![EmailAddress {
                email: Some(self.email.clone()),
                field: EmailField::Email1,
            }]),
            duplicate_option: Some(DuplicateOption::Email),
        }
    }

    /// Body and `update_mask` of `PATCH /v1/contacts/{id}` sending only `changes`. When EMAIL1
    /// changed, `current_emails` must be the contact's email slots as Keap holds them now: the
    /// array is sent whole, with ours in EMAIL1 and every other slot as it was.
    pub(crate) fn patch(
        &self,
        changes: Changes,
        current_emails: &[EmailAddress],
    ) -> (ContactWrite, Vec<&'static str>) {
        let mut body = ContactWrite::default();
        let mut mask = Vec::new();
        if changes.given_name {
            body.given_name = self.given_name.clone();
            mask.push("given_name");
        }
        if changes.family_name {
            body.family_name = self.family_name.clone();
            mask.push("family_name");
        }
        if changes.email {
            let mut emails =
                vec![EmailAddress { email: Some(self.email.clone()), field: EmailField::Email1 }];
            emails.extend(current_emails.iter().filter(|e| e.field != EmailField::Email1).cloned());
            body.email_addresses = Some(emails);
            mask.push("email_addresses");
        }
        (body, mask)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(email: Option<&str>, given: Option<&str>, family: Option<&str>) -> UserRow {
        UserRow {
            email: email.map(Into::into),
            given_name: given.map(Into::into),
            family_name: family.map(Into::into),
        }
    }

    fn payload(email: &str, given: Option<&str>, family: Option<&str>) -> ContactPayload {
        ContactPayload::from_row(&row(Some(email), given, family)).unwrap()
    }

    #[test]
    fn no_email_is_a_mapping_error() {
        assert_eq!(ContactPayload::from_row(&row(None, Some("A"), None)), Err(MappingError::NoEmail));
        assert_eq!(ContactPayload::from_row(&row(Some("  "), None, None)), Err(MappingError::NoEmail));
    }

    #[test]
    fn fingerprint_tracks_every_field() {
        let a = payload("a@x.io", Some("A"), Some("B"));
        assert_eq!(a.fingerprint(), payload("a@x.io", Some("A"), Some("B")).fingerprint());
        for other in [
            payload("b@x.io", Some("A"), Some("B")),
            payload("a@x.io", Some("AB"), Some("")),
            payload("a@x.io", Some("A"), None),
            payload("a@x.io", None, Some("B")),
        ] {
            assert_ne!(a.fingerprint(), other.fingerprint(), "{other:?}");
        }
    }

    #[test]
    fn only_changed_owned_properties_are_sent() {
        let p = payload("a@x.io", Some("Ada"), None);
        let held = p.as_held();
        assert!(!p.changes(&held).any(), "what Keap holds from us is unchanged");
        let renamed = payload("a@x.io", Some("Ada B"), None);
        let changes = renamed.changes(&held);
        assert_eq!(changes, Changes { given_name: true, ..Changes::default() });
        let (body, mask) = renamed.patch(changes, &[]);
        assert_eq!(mask, ["given_name"]);
        assert_eq!(serde_json::to_value(body).unwrap(), json!({"given_name": "Ada B"}));
        // family_name is not synced: whatever Keap holds there is never compared or sent.
        let theirs = Held { family_name: Some("Marketing's".into()), ..held };
        assert!(!p.changes(&theirs).family_name);
    }

    #[test]
    fn a_new_email1_keeps_every_other_slot() {
        let p = payload("new@x.io", None, None);
        let current = [
            EmailAddress { email: Some("old@x.io".into()), field: EmailField::Email1 },
            EmailAddress { email: Some("work@x.io".into()), field: EmailField::Email2 },
            EmailAddress { email: Some("home@x.io".into()), field: EmailField::Email3 },
        ];
        let held = Held { email: Some("old@x.io".into()), ..Held::default() };
        let (body, mask) = p.patch(p.changes(&held), &current);
        assert_eq!(mask, ["email_addresses"]);
        assert_eq!(
            serde_json::to_value(body).unwrap(),
            json!({"email_addresses": [
                {"email": "new@x.io", "field": "EMAIL1"},
                {"email": "work@x.io", "field": "EMAIL2"},
                {"email": "home@x.io", "field": "EMAIL3"}
            ]})
        );
    }

    #[test]
    fn emails_compare_without_case_and_a_create_leaves_out_empty_names() {
        let p = payload("Ada@X.io", Some(""), Some("B"));
        let held = Held {
            email: Some("ada@x.io".into()),
            given_name: Some("".into()),
            family_name: Some("B".into()),
        };
        assert!(!p.changes(&held).any());
        assert_eq!(
            serde_json::to_value(p.create_body()).unwrap(),
            json!({"family_name": "B", "email_addresses": [{"email": "Ada@X.io", "field": "EMAIL1"}], "duplicate_option": "Email"})
        );
    }
}
