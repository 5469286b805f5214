//! The one REST v2 call keap-sync makes: the contact listing (`GET /v2/contacts`: 1,000 a
//! page, ordered, filtered by update time, only the fields asked for). Wire types follow
//! `ListContactsResponse` and `Contact` of Keap's v2 OpenAPI file; each listed contact is read
//! into the v1 shape the rest of keap-sync speaks ([`Contact`]: integer ids, v1 property
//! names), so the mapping compares a listed contact exactly like one read by id.

use serde::Deserialize;
use serde_json::{json, Map, Value};

use super::model::Contact;

/// `ListContactsResponse`.
#[derive(Debug, Deserialize)]
struct ListContactsResponse {
    #[serde(default)]
    contacts: Vec<Map<String, Value>>,
    /// Empty or absent on the last page.
    #[serde(default)]
    next_page_token: Option<String>,
}

/// One listed contact: the contact in v1 shape, and Keap's update time as sent.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Listed {
    pub(crate) contact: Contact,
    /// `update_time` (ISO-8601), if Keap sent one.
    pub(crate) updated: Option<String>,
    /// Whether EMAIL1 is marketable (`is_opt_in`), if Keap said.
    pub(crate) opted_in: Option<bool>,
}

/// One page of a listing.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Page {
    pub(crate) contacts: Vec<Listed>,
    /// The token of the next page; `None` on the last.
    pub(crate) next: Option<String>,
}

/// v1 property names and their v2 spelling, where they differ.
const RENAMED: &[(&str, &str)] =
    &[("birthday", "birth_date"), ("anniversary", "anniversary_date"), ("lead_source_id", "leadsource_id")];

/// The v2 `fields` to ask for, for these v1 properties: always the id, every email address
/// (users are matched by them), the tags and the update time.
pub(crate) fn fields(v1_properties: &[&str]) -> String {
    let mut fields = vec!["id", "email_addresses", "tag_ids", "update_time"];
    for p in v1_properties {
        let v2 = RENAMED.iter().find(|(v1, _)| v1 == p).map_or(*p, |(_, v2)| *v2);
        if !fields.contains(&v2) {
            fields.push(v2);
        }
    }
    fields.join(",")
}

/// Reads a listing's answer; a contact without a usable id is an error naming it.
pub(crate) fn read_page(text: &str) -> Result<Page, String> {
    let list: ListContactsResponse = serde_json::from_str(text).map_err(|e| e.to_string())?;
    let contacts = list.contacts.into_iter().map(to_v1).collect::<Result<Vec<Listed>, String>>()?;
    Ok(Page { contacts, next: list.next_page_token.filter(|t| !t.is_empty()) })
}

/// A v2 contact in v1 shape: string ids to integers, renamed properties back to v1 names.
fn to_v1(mut v2: Map<String, Value>) -> Result<Listed, String> {
    let id = as_id(v2.get("id"))
        .ok_or_else(|| format!("a listed contact has no usable id: {:?}", v2.get("id")))?;
    v2.insert("id".into(), json!(id));
    let updated = v2.remove("update_time").and_then(|v| v.as_str().map(str::to_owned));
    if let Some(tags) = v2.get_mut("tag_ids") {
        *tags =
            json!(tags.as_array().into_iter().flatten().filter_map(|t| as_id(Some(t))).collect::<Vec<i64>>());
    }
    if let Some(Value::Array(fields)) = v2.get_mut("custom_fields") {
        for f in fields {
            if let Some(id) = as_id(f.get("id")) {
                f["id"] = json!(id);
            }
        }
    }
    for (v1, v2name) in RENAMED {
        if let Some(v) = v2.remove(*v2name) {
            v2.insert((*v1).to_owned(), v);
        }
    }
    let opted_in = v2
        .get("email_addresses")
        .and_then(Value::as_array)
        .and_then(|a| a.iter().find(|e| e.get("field").and_then(Value::as_str) == Some("EMAIL1")))
        .and_then(|e| e.get("is_opt_in"))
        .and_then(Value::as_bool);
    Ok(Listed { contact: Contact { id, json: Value::Object(v2) }, updated, opted_in })
}

/// An id sent as a string (v2) or a number.
fn as_id(v: Option<&Value>) -> Option<i64> {
    match v? {
        Value::String(s) => s.trim().parse().ok(),
        Value::Number(n) => n.as_i64(),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_v2_page_reads_into_v1_shape() {
        let text = r#"{"contacts": [{"id": "12", "given_name": "Ada", "tag_ids": ["3", "4"],
            "email_addresses": [{"email": "a@x.io", "field": "EMAIL1", "is_opt_in": true}],
            "custom_fields": [{"id": "7", "content": "pro"}], "birth_date": "1990-01-02",
            "update_time": "2026-01-02T03:04:05.678Z"}], "next_page_token": "abc"}"#;
        let page = read_page(text).unwrap();
        assert_eq!(page.next.as_deref(), Some("abc"));
        let listed = &page.contacts[0];
        assert_eq!(listed.contact.id, 12);
        assert_eq!(listed.contact.email1(), Some("a@x.io"));
        assert_eq!(listed.contact.json["tag_ids"], json!([3, 4]));
        assert_eq!(listed.contact.json["custom_fields"][0]["id"], json!(7));
        assert_eq!(listed.contact.json["birthday"], json!("1990-01-02"));
        assert_eq!(
            (listed.updated.as_deref(), listed.opted_in),
            (Some("2026-01-02T03:04:05.678Z"), Some(true))
        );
        let last = read_page(r#"{"contacts": [], "next_page_token": ""}"#).unwrap();
        assert_eq!(last.next, None);
        assert!(read_page(r#"{"contacts": [{"id": "x"}]}"#).unwrap_err().contains("no usable id"));
    }

    #[test]
    fn fields_are_asked_by_their_v2_names() {
        assert_eq!(
            fields(&["given_name", "birthday", "email_addresses"]),
            "id,email_addresses,tag_ids,update_time,given_name,birth_date"
        );
    }
}
