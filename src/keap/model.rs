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

/// A contact as Keap returned it (`FullContact`, `RestPartialContact`): its id, and the whole
/// JSON object, from which `mapping` reads the properties it owns and the slots of the array
/// properties it must send back unchanged. Unknown properties are kept, never a parse error.
#[derive(Debug, Clone, Default, PartialEq)]
pub(crate) struct Contact {
    pub id: i64,
    pub json: serde_json::Value,
}

impl Contact {
    /// Parses one contact object; it must have an integer `id`.
    pub(crate) fn from_json(json: serde_json::Value) -> Result<Contact, String> {
        match json.get("id").and_then(serde_json::Value::as_i64) {
            Some(id) => Ok(Contact { id, json }),
            None => Err("the contact has no integer `id`".into()),
        }
    }

    /// Keap's update stamp of the contact (`last_updated`), as microseconds since the epoch;
    /// `None` when the answer has none that reads as a time ([`super::stamp::micros`]).
    pub(crate) fn last_updated(&self) -> Option<i64> {
        self.json.get("last_updated").and_then(serde_json::Value::as_str).and_then(super::stamp::micros)
    }

    /// The address in slot EMAIL1.
    pub(crate) fn email1(&self) -> Option<&str> {
        let items = self.json.get("email_addresses").and_then(serde_json::Value::as_array)?;
        let slot = items.iter().find(|e| e.get("field").and_then(|f| f.as_str()) == Some("EMAIL1"))?;
        slot.get("email")?.as_str()
    }

    /// The first slot (EMAIL1, EMAIL2, EMAIL3) holding `email`, compared ASCII
    /// case-insensitively; `None` if no slot does.
    pub(crate) fn slot_of(&self, email: &str) -> Option<String> {
        let items = self.json.get("email_addresses").and_then(serde_json::Value::as_array)?;
        let mut slots: Vec<&str> = items
            .iter()
            .filter(|e| {
                e.get("email")
                    .and_then(|a| a.as_str())
                    .is_some_and(|a| a.trim().eq_ignore_ascii_case(email.trim()))
            })
            .filter_map(|e| e.get("field").and_then(|f| f.as_str()))
            .collect();
        slots.sort_unstable();
        slots.first().map(|s| (*s).to_owned())
    }
}

/// What `GET /v1/contacts?email=…` found, sorted by slot. Keap's filter semantics are not
/// documented (exact or partial, EMAIL1 only or every slot: `docs/keap-api.md`), so the answer
/// is read strictly: only a contact whose EMAIL1 is the address (ASCII case-insensitive) is the
/// address's owner; a contact holding it in EMAIL2 or EMAIL3 alone is listed, never chosen.
#[derive(Debug, Clone, Default, PartialEq)]
pub(crate) struct ByEmail {
    /// The lowest-id contact whose EMAIL1 is the address.
    pub(crate) email1: Option<Contact>,
    /// Contacts holding the address only in another slot: (contact id, slot), by id.
    pub(crate) elsewhere: Vec<(i64, String)>,
}

impl ByEmail {
    /// Sorts `contacts` (any order, any match) for `email`; a contact that does not hold the
    /// address in any slot (a partial match) is ignored.
    pub(crate) fn of(email: &str, mut contacts: Vec<Contact>) -> ByEmail {
        contacts.sort_by_key(|c| c.id);
        let mut found = ByEmail::default();
        for c in contacts {
            let Some(slot) = c.slot_of(email) else { continue };
            if slot == "EMAIL1" {
                if found.email1.is_none() {
                    found.email1 = Some(c);
                }
            } else {
                found.elsewhere.push((c.id, slot));
            }
        }
        found
    }
}

/// `ContactList`: the answer of `GET /v1/contacts` (only the contacts are read).
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
pub(crate) struct ContactList {
    #[serde(default)]
    pub(crate) contacts: Vec<serde_json::Value>,
}

/// `CustomFieldMetaData` in `ObjectModel`, the answer of `GET /v1/contacts/model`.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
pub(crate) struct CustomFieldMeta {
    pub id: i64,
    #[serde(default)]
    pub label: Option<String>,
    #[serde(default)]
    pub field_name: Option<String>,
    #[serde(default)]
    pub field_type: Option<String>,
}

/// `ObjectModel` (only the custom fields are read).
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
pub(crate) struct ObjectModel {
    #[serde(default)]
    pub custom_fields: Vec<CustomFieldMeta>,
}

/// `Tag` (`GET /v1/tags`, `POST /v1/tags`); id, name and category are read.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
pub(crate) struct Tag {
    pub id: i64,
    #[serde(default)]
    pub name: Option<String>,
    /// `TagCategory` (`{id, name, description}`), or `null`; kept as sent (the contact's tag
    /// list, `SimpleTag`, spells it as a bare name), read by [`Tag::category`].
    #[serde(default)]
    pub category: Option<serde_json::Value>,
}

impl Tag {
    /// The tag's category as (id, name), each if Keap sent it: from a `TagCategory` object, or
    /// a bare name.
    pub(crate) fn category(&self) -> (Option<i64>, Option<String>) {
        match &self.category {
            Some(serde_json::Value::Object(c)) => (
                c.get("id").and_then(|v| v.as_i64().or_else(|| v.as_str()?.trim().parse().ok())),
                c.get("name").and_then(serde_json::Value::as_str).map(str::to_owned),
            ),
            Some(serde_json::Value::String(name)) => (None, Some(name.clone())),
            _ => (None, None),
        }
    }
}

/// `Tags`: a page of the tag catalogue.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
pub(crate) struct TagPage {
    #[serde(default)]
    pub tags: Vec<Tag>,
    /// The URL of the next page; absent, `null` or empty on the last.
    #[serde(default)]
    pub next: Option<String>,
}

/// A successful answer of the token endpoint (authorization-code or refresh grant).
///
/// Deliberately no `Debug` derive: it holds live credentials. Convert it into the token
/// store's redacting types at once.
/// A REST hook subscription (`RestHook` of the v1 OpenAPI file): Keap's key, the event key,
/// where deliveries go, and `Unverified`, `Verified` or `Inactive`. `hook_url` holds the
/// receiver's secret path: never print it whole.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct RestHook {
    #[serde(default)]
    pub key: String,
    #[serde(default)]
    pub event_key: String,
    #[serde(default)]
    pub hook_url: String,
    #[serde(default)]
    pub status: String,
}

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
    fn a_contact_keeps_every_property() {
        let c = Contact::from_json(
            serde_json::json!({"id": 7, "email_addresses": [{"email": "a@x.io", "field": "EMAIL1"}],
            "tag_ids": [1], "ScoreValue": "0"}),
        )
        .unwrap();
        assert_eq!((c.id, c.email1()), (7, Some("a@x.io")));
        assert_eq!(c.json["tag_ids"], serde_json::json!([1]));
        assert!(Contact::from_json(serde_json::json!({"id": "7"})).is_err());
    }

    #[test]
    fn only_email1_owns_an_address() {
        let c = |id: i64, slots: &[(&str, &str)]| {
            let items: Vec<_> =
                slots.iter().map(|(f, e)| serde_json::json!({"field": f, "email": e})).collect();
            Contact::from_json(serde_json::json!({"id": id, "email_addresses": items})).unwrap()
        };
        let found = ByEmail::of(
            "ada@x.io",
            vec![
                c(9, &[("EMAIL1", "ADA@x.io")]),
                c(3, &[("EMAIL1", "b@x.io"), ("EMAIL2", "ada@x.io")]),
                c(4, &[("EMAIL1", "ada@x.io.evil")]),
                c(12, &[("EMAIL1", "ada@x.io")]),
                c(5, &[("EMAIL3", "ada@X.io")]),
            ],
        );
        assert_eq!(found.email1.map(|c| c.id), Some(9), "the lowest id whose EMAIL1 is the address");
        assert_eq!(found.elsewhere, [(3, "EMAIL2".to_owned()), (5, "EMAIL3".to_owned())]);
        let none = ByEmail::of("ada@x.io", vec![c(3, &[("EMAIL2", "ada@x.io")])]);
        assert!(none.email1.is_none());
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
