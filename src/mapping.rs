//! From a user row to the Keap contact payload, and the payload's fingerprint.
//!
//! The payload is what we own in Keap: EMAIL1, given name and family name. Everything else on
//! the contact (tags, other emails, phone numbers, notes) belongs to the marketing team and is
//! never sent, which is why updates carry an `update_mask`.
//!
//! The fingerprint is a hash of the payload; the contact map keeps the fingerprint of the last
//! payload Keap accepted, and a change whose payload hashes the same costs no call.

use sha2::{Digest, Sha256};

use crate::keap::model::{ContactWrite, DuplicateOption, EmailAddress, EmailField};
use crate::outbox::UserRow;

/// Why a row cannot become a contact. Such a change is parked, not retried: only a new change
/// to the row can fix it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum MappingError {
    #[error("the user has no email address; Keap needs one to create or find the contact")]
    NoEmail,
}

/// The contact fields derived from one user row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ContactPayload {
    pub email: String,
    pub given_name: Option<String>,
    pub family_name: Option<String>,
}

/// The properties a PATCH may change (Keap's `update_mask` values).
pub(crate) const UPDATE_MASK: [&str; 3] = ["email_addresses", "given_name", "family_name"];

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

    /// A stable hash of everything that is sent: same payload, same fingerprint.
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

    fn emails(&self) -> Option<Vec<EmailAddress>> {
        Some(vec![EmailAddress { email: Some(self.email.clone()), field: EmailField::Email1 }])
    }

    /// Body of `PUT /v1/contacts`: find by email or create. Empty names are left out so an
    /// existing contact's names are not blanked by a user who has none.
    pub(crate) fn upsert_body(&self) -> ContactWrite {
        ContactWrite {
            given_name: self.given_name.clone().filter(|n| !n.is_empty()),
            family_name: self.family_name.clone().filter(|n| !n.is_empty()),
            email_addresses: self.emails(),
            duplicate_option: Some(DuplicateOption::Email),
        }
    }

    /// Body of `PATCH /v1/contacts/{id}`: every owned field, a missing name sent as "" so that
    /// clearing it in the app clears it in Keap.
    pub(crate) fn patch_body(&self) -> ContactWrite {
        ContactWrite {
            given_name: Some(self.given_name.clone().unwrap_or_default()),
            family_name: Some(self.family_name.clone().unwrap_or_default()),
            email_addresses: self.emails(),
            duplicate_option: None,
        }
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

    #[test]
    fn no_email_is_a_mapping_error() {
        assert_eq!(ContactPayload::from_row(&row(None, Some("A"), None)), Err(MappingError::NoEmail));
        assert_eq!(ContactPayload::from_row(&row(Some("  "), None, None)), Err(MappingError::NoEmail));
    }

    #[test]
    fn fingerprint_tracks_every_field() {
        let a = ContactPayload::from_row(&row(Some("a@x.io"), Some("A"), Some("B"))).unwrap();
        let b = ContactPayload::from_row(&row(Some("a@x.io"), Some("A"), Some("B"))).unwrap();
        assert_eq!(a.fingerprint(), b.fingerprint());
        for other in [
            row(Some("b@x.io"), Some("A"), Some("B")),
            row(Some("a@x.io"), Some("AB"), Some("")),
            row(Some("a@x.io"), Some("A"), None),
            row(Some("a@x.io"), None, Some("B")),
        ] {
            let o = ContactPayload::from_row(&other).unwrap();
            assert_ne!(a.fingerprint(), o.fingerprint(), "{other:?}");
        }
    }

    #[test]
    fn bodies() {
        let p = ContactPayload::from_row(&row(Some(" a@x.io "), None, Some("B"))).unwrap();
        let up = serde_json::to_value(p.upsert_body()).unwrap();
        assert_eq!(
            up,
            serde_json::json!({"family_name": "B", "email_addresses": [{"email": "a@x.io", "field": "EMAIL1"}], "duplicate_option": "Email"})
        );
        let patch = serde_json::to_value(p.patch_body()).unwrap();
        assert_eq!(
            patch,
            serde_json::json!({"given_name": "", "family_name": "B", "email_addresses": [{"email": "a@x.io", "field": "EMAIL1"}]})
        );
    }
}
