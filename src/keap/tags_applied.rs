//! Keap's answer to `POST /v1/contacts/{id}/tags`, read tag by tag.
//!
//! The v1 specification gives the answer as a list of entries whose value is one of `SUCCESS`,
//! `DUPLICATE`, `CONTACT_NOT_FOUND`, `TAG_ID_NOT_FOUND`, `FAILURE`, `NO_PERMISSION` (a Java
//! `Map<Long, String>`); the JSON is probably an object keyed by tag id, but that is unverified
//! (`docs/keap-api.md`). So every shape is read, and a tag counts as applied only when an entry
//! keyed by its id says `SUCCESS` or `DUPLICATE`: an entry with another status, a status without
//! a tag id (`[{"key": "TAG_ID_NOT_FOUND"}]` read literally), or no entry at all refuses every
//! tag it could concern. Taking an answer that does not say "applied" as success would record a
//! tag as on the contact when it is not, and nothing would ever apply it.

use serde_json::Value;

/// What Keap did with each tag of one apply call.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct TagsApplied {
    /// Tags that were on the contact already (`DUPLICATE`): someone else applied them, so they
    /// are not keap-sync's to remove later.
    pub(crate) already: Vec<i64>,
    /// Tags not (clearly) applied, with the reason to show.
    pub(crate) refused: Vec<(i64, String)>,
}

impl TagsApplied {
    /// Reads the answer `text` to applying `ids`.
    pub(crate) fn read(ids: &[i64], text: &str) -> TagsApplied {
        let entries = entries(text);
        let unkeyed: Vec<&str> =
            entries.iter().filter(|(id, _)| id.is_none()).map(|(_, s)| s.as_str()).collect();
        let mut out = TagsApplied::default();
        for &id in ids {
            match entries.iter().find(|(k, _)| *k == Some(id)).map(|(_, s)| s.as_str()) {
                Some("SUCCESS") => {}
                Some("DUPLICATE") => out.already.push(id),
                Some(status) => out.refused.push((id, status.to_owned())),
                None if !unkeyed.is_empty() => out.refused.push((id, unkeyed.join(", "))),
                None => out.refused.push((id, "Keap's answer did not say it was applied".to_owned())),
            }
        }
        out
    }

    /// Whether Keap says the contact is gone.
    pub(crate) fn contact_gone(&self) -> bool {
        self.refused.iter().any(|(_, why)| why.contains("CONTACT_NOT_FOUND"))
    }
}

/// `(tag id, status)` pairs of an answer of any shape: an object keyed by tag id, or a list of
/// `{"key": …, "value": …}` entries. An entry whose key is not a tag id (a status where a key
/// should be) gives a status with no id.
fn entries(text: &str) -> Vec<(Option<i64>, String)> {
    let status = |v: &Value| v.as_str().map_or_else(|| v.to_string(), str::to_owned);
    let id = |v: &Value| v.as_i64().or_else(|| v.as_str().and_then(|s| s.trim().parse().ok()));
    match serde_json::from_str::<Value>(text) {
        Ok(Value::Object(m)) => m
            .iter()
            .map(|(k, v)| match k.trim().parse::<i64>() {
                Ok(tag) => (Some(tag), status(v)),
                Err(_) => (None, format!("{k}: {}", status(v))),
            })
            .collect(),
        Ok(Value::Array(items)) => items
            .iter()
            .map(|item| {
                let key = item.get("key");
                match (key.and_then(id), item.get("value")) {
                    (Some(tag), Some(v)) => (Some(tag), status(v)),
                    (Some(tag), None) => (Some(tag), "no status".to_owned()),
                    (None, Some(v)) => (None, status(v)),
                    (None, None) => (None, key.map_or_else(|| item.to_string(), status)),
                }
            })
            .collect(),
        _ => Vec::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_success_or_duplicate_keyed_by_the_tag_counts_as_applied() {
        let read = |text| TagsApplied::read(&[7, 8], text);
        assert_eq!(
            read(r#"{"7": "SUCCESS", "8": "DUPLICATE"}"#),
            TagsApplied { already: vec![8], refused: vec![] }
        );
        assert_eq!(
            read(r#"[{"key": 7, "value": "SUCCESS"}, {"key": "8", "value": "FAILURE"}]"#).refused,
            [(8, "FAILURE".to_owned())]
        );
        // A status where the tag id should be: every tag it could concern is refused.
        assert_eq!(
            read(r#"[{"key": "TAG_ID_NOT_FOUND"}]"#).refused,
            [(7, "TAG_ID_NOT_FOUND".to_owned()), (8, "TAG_ID_NOT_FOUND".to_owned())]
        );
        // Silence about a tag is not success.
        for text in ["", "{}", "[]", "null", r#"{"7": "SUCCESS"}"#] {
            assert!(read(text).refused.iter().any(|(id, _)| *id == 8), "{text:?}");
        }
        assert!(read(r#"{"7": "CONTACT_NOT_FOUND"}"#).contact_gone());
    }
}
