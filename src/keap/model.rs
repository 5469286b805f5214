//! Wire types of Keap's REST v1 contact API and its OAuth token endpoint.
//!
//! Field names, required fields and enums follow `CreateOrPatchContact`, `UpsertContact`,
//! `EmailAddress` and `FullContact` of Keap's published v1 OpenAPI file
//! (see `docs/keap-api.md` for where it is published). Only the fields this daemon writes or
//! reads are modelled; unknown response fields are ignored so that Keap adding a field never
//! breaks delivery. The fake Keap server in the test kit deliberately has wire types of its own,
//! written from the same spec, so a field misnamed here cannot be misnamed on both sides and
//! pass the tests. `docs/keap-api.md` lists what the daemon relies on and where it comes from.

use serde::{Deserialize, Serialize};

/// `EmailAddress.field` in the spec: which of the contact's three email slots.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub(crate) enum EmailField {
    #[serde(rename = "EMAIL1")]
    Email1,
    #[serde(rename = "EMAIL2")]
    Email2,
    #[serde(rename = "EMAIL3")]
    Email3,
}

/// `EmailAddress` in the spec (`field` required, `email` optional there, always sent by us).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct EmailAddress {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub email: Option<String>,
    pub field: EmailField,
}

/// `UpsertContact.duplicate_option`: how `PUT /v1/contacts` looks for an existing contact.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) enum DuplicateOption {
    Email,
    EmailAndName,
}

/// Request body of `PUT /v1/contacts` (`UpsertContact`) and `PATCH /v1/contacts/{id}`
/// (`CreateOrPatchContact`, which is the same minus `duplicate_option`).
///
/// `None` fields are left out of the JSON, so a PATCH changes only what is sent.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct ContactWrite {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub given_name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub family_name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub email_addresses: Option<Vec<EmailAddress>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub duplicate_option: Option<DuplicateOption>,
}

/// The part of `FullContact` (and `RestPartialContact`) this daemon reads.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Contact {
    pub id: i64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub given_name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub family_name: Option<String>,
    #[serde(default)]
    pub email_addresses: Vec<EmailAddress>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub date_created: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_updated: Option<String>,
}

/// `ContactList`: the answer of `GET /v1/contacts` (only the contacts are read).
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
pub(crate) struct ContactList {
    #[serde(default)]
    pub(crate) contacts: Vec<Contact>,
}

/// A successful answer of the token endpoint (authorization-code or refresh grant).
///
/// Deliberately no `Debug` derive: it holds live credentials. Convert it into the token
/// store's redacting types at once.
#[derive(Clone, Serialize, Deserialize)]
pub(crate) struct TokenResponse {
    pub access_token: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token_type: Option<String>,
    pub expires_in: i64,
    pub refresh_token: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scope: Option<String>,
}

/// The error bodies Keap is known to send, in every shape `docs/keap-api.md` lists ("Error bodies"):
/// v1 `{"message"}`, v2 `{"code","message","status","details"}` (with `code` a number or a
/// string), the Apigee-era `{"fault":{"faultstring"}}` and the token endpoint's OAuth
/// `{"error","error_description"}`. Everything is optional so any of them parses.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub(crate) struct ErrorBody {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub code: Option<serde_json::Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub details: Option<serde_json::Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error_description: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fault: Option<Fault>,
}

/// Apigee-era throttling body: `{"fault":{"faultstring":…,"detail":{"errorcode":…}}}`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub(crate) struct Fault {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub faultstring: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detail: Option<serde_json::Value>,
}

impl ErrorBody {
    /// The most human sentence in the body, whichever shape it came in.
    pub(crate) fn summary(&self) -> Option<String> {
        self.message
            .clone()
            .or_else(|| match (&self.error, &self.error_description) {
                (Some(e), Some(d)) => Some(format!("{e}: {d}")),
                (Some(e), None) => Some(e.clone()),
                (None, Some(d)) => Some(d.clone()),
                (None, None) => None,
            })
            .or_else(|| self.fault.as_ref().and_then(|f| f.faultstring.clone()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn upsert_body_matches_the_spec_names() {
        let body = ContactWrite {
            given_name: Some("Ada".into()),
            family_name: None,
            email_addresses: Some(vec![EmailAddress {
                email: Some("ada@example.com".into()),
                field: EmailField::Email1,
            }]),
            duplicate_option: Some(DuplicateOption::Email),
        };
        let json = serde_json::to_value(&body).unwrap();
        assert_eq!(
            json,
            serde_json::json!({
                "given_name": "Ada",
                "email_addresses": [{"email": "ada@example.com", "field": "EMAIL1"}],
                "duplicate_option": "Email"
            })
        );
    }

    #[test]
    fn full_contact_with_unknown_fields_parses() {
        let c: Contact = serde_json::from_str(
            r#"{"id": 7, "given_name": "A", "email_addresses": [{"email": "a@x.io", "field": "EMAIL1"}],
                "tag_ids": [1], "ScoreValue": "0", "email_status": "SingleOptIn"}"#,
        )
        .unwrap();
        assert_eq!(c.id, 7);
        assert_eq!(c.email_addresses[0].email.as_deref(), Some("a@x.io"));
    }

    #[test]
    fn every_known_error_shape_has_a_summary() {
        let shapes = [
            (r#"{"message":"BILLING Region is invalid"}"#, "BILLING Region is invalid"),
            (
                r#"{"code":"429","message":"Quota Exceeded","status":"Request Throttled","details":null}"#,
                "Quota Exceeded",
            ),
            (
                r#"{"error":"invalid_grant","error_description":"Invalid refresh token"}"#,
                "invalid_grant: Invalid refresh token",
            ),
            (
                r#"{"fault":{"faultstring":"Rate limit quota violation","detail":{"errorcode":"x"}}}"#,
                "Rate limit quota violation",
            ),
        ];
        for (body, want) in shapes {
            let parsed: ErrorBody = serde_json::from_str(body).unwrap();
            assert_eq!(parsed.summary().as_deref(), Some(want), "{body}");
        }
    }
}
