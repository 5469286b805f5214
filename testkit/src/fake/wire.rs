//! The fake's own wire types, written from Keap's published REST v1 OpenAPI file (schemas
//! `UpsertContact`, `CreateOrPatchContact`, `EmailAddress`, `FullContact`, `ContactList`) and
//! the token endpoint's documented answer (see `docs/keap-api.md`).
//!
//! They deliberately share nothing with the daemon's `keap::model`: the fake is an
//! independent witness, so a field the client names wrongly is refused or ignored here instead
//! of being renamed on both sides at once. Only what the fake stores or checks is modelled;
//! the write-body parser in the parent module rejects every other property.

use serde::{Deserialize, Serialize};

/// `EmailAddress.field`: which of a contact's three email slots (spec enum, exact spelling).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum EmailField {
    /// The primary slot (`EMAIL1`), the one the daemon owns.
    #[serde(rename = "EMAIL1")]
    Email1,
    /// The second slot (`EMAIL2`).
    #[serde(rename = "EMAIL2")]
    Email2,
    /// The third slot (`EMAIL3`).
    #[serde(rename = "EMAIL3")]
    Email3,
}

/// `EmailAddress`: `field` is required, `email` optional (an item without it empties the slot).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EmailAddress {
    /// The address; absent empties the slot.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub email: Option<String>,
    /// Which slot the address goes in.
    pub field: EmailField,
}

/// `UpsertContact.duplicate_option` (v1 knows no `EmailAndNameAndCompany`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum DuplicateOption {
    /// Match an existing contact by email alone.
    Email,
    /// Match by email and first and last name together.
    EmailAndName,
}

/// A write body: `UpsertContact` (`PUT /v1/contacts`) or, without `duplicate_option`,
/// `CreateOrPatchContact` (`POST /v1/contacts`, `PATCH /v1/contacts/{id}`). Also what
/// [`super::FakeKeap::seed_contact`] takes.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ContactWrite {
    /// The first name to write, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub given_name: Option<String>,
    /// The last name to write, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub family_name: Option<String>,
    /// The email slots to write (the array replaces the stored one whole).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub email_addresses: Option<Vec<EmailAddress>>,
    /// How an upsert finds an existing contact; only `PUT` accepts it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub duplicate_option: Option<DuplicateOption>,
}

/// A stored contact: the `FullContact` properties the fake keeps. Answers add properties it
/// does not keep (see the parent module's `full_json`); parsing one back ignores them.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Contact {
    /// Keap's contact id.
    pub id: i64,
    /// The stored first name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub given_name: Option<String>,
    /// The stored last name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub family_name: Option<String>,
    /// The stored email slots.
    #[serde(default)]
    pub email_addresses: Vec<EmailAddress>,
    /// RFC 3339 with milliseconds, like `2024-08-14T12:34:56.789Z`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub date_created: Option<String>,
    /// When the contact was last written, in the format of `date_created`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_updated: Option<String>,
    /// Every other stored property (`phone_numbers`, `addresses`, `custom_fields`,
    /// `job_title`, …) as Keap's JSON; answers parsed back also land their extras here.
    #[serde(flatten)]
    pub extra: serde_json::Map<String, serde_json::Value>,
}

impl Contact {
    /// The address in slot EMAIL1.
    pub fn email1(&self) -> Option<&str> {
        let slot = self.email_addresses.iter().find(|e| e.field == EmailField::Email1);
        slot.and_then(|e| e.email.as_deref())
    }
}

/// `ContactList`: the answer of `GET /v1/contacts`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ContactList {
    /// The contacts of this page.
    pub contacts: Vec<Contact>,
    /// How many contacts matched in all.
    pub count: i64,
    /// The URL of the next page, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next: Option<String>,
    /// The URL of the previous page, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub previous: Option<String>,
}

/// A grant as `POST /token` answers it (code and refresh grants alike); serialises to exactly
/// that JSON, so tests can feed it to whatever reads token-endpoint answers.
///
/// No `Debug`, so a test failure never prints a token the log checks look for.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenGrant {
    /// The bearer token API calls present.
    pub access_token: String,
    /// Always `bearer` (lower case, as captured from Keap).
    pub token_type: String,
    /// Seconds until the access token expires, at least 1.
    pub expires_in: u64,
    /// The new refresh token; the one presented to get this grant is spent.
    pub refresh_token: String,
    /// `full|<app>.infusionsoft.com`, naming the tenant.
    pub scope: String,
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn names_are_the_specs() {
        let email = EmailAddress { email: Some("a@b.io".into()), field: EmailField::Email3 };
        let w = ContactWrite {
            given_name: Some("A".into()),
            email_addresses: Some(vec![email]),
            duplicate_option: Some(DuplicateOption::EmailAndName),
            ..ContactWrite::default()
        };
        let want = json!({"given_name": "A", "email_addresses": [{"email": "a@b.io", "field": "EMAIL3"}],
            "duplicate_option": "EmailAndName"});
        assert_eq!(serde_json::to_value(&w).unwrap(), want);
        for bad in [json!({"field": "Email1"}), json!({"field": "EMAIL1", "type": "WORK"})] {
            assert!(serde_json::from_value::<EmailAddress>(bad).is_err());
        }
        let bad_option = json!({"duplicate_option": "email"});
        assert!(serde_json::from_value::<ContactWrite>(bad_option).is_err());
    }

    #[test]
    fn a_grant_serialises_as_the_token_endpoint_answers() {
        let g = TokenGrant {
            access_token: "at".into(),
            token_type: "bearer".into(),
            expires_in: 86_400,
            refresh_token: "rt".into(),
            scope: "full|x.infusionsoft.com".into(),
        };
        let want = json!({"access_token": "at", "token_type": "bearer", "expires_in": 86_400,
            "refresh_token": "rt", "scope": "full|x.infusionsoft.com"});
        assert_eq!(serde_json::to_value(&g).unwrap(), want);
    }
}
