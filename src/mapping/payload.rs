//! The contact content we own, from one user row, and the bodies sent for it: a create, or a
//! patch rebuilt from the contact as Keap holds it with only our slots and parts changed.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use serde_json::{json, Map, Value};
use sha2::{Digest, Sha256};

use super::consent::{self, CONSENT};
use super::held::{hash, Changes, Held, RuleTags};
use super::{item_keys, main_part, slot_key, Path};
use crate::config::{ScalarKind, TagRef};

/// The contact content we own, from one user row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ContactPayload {
    /// EMAIL1, the address contacts are found by.
    pub(crate) email: String,
    /// Every owned value: what to send, `Null` to clear Keap's value.
    pub(super) values: BTreeMap<Path, Value>,
    /// The tags the rules derive from the row (names resolved to ids by the caller).
    pub(crate) tags: BTreeSet<TagRef>,
    /// Consent may be sent over an opt-out Keap holds (`over_opt_out`, [`super::consent`]).
    pub(super) over_opt_out: bool,
    /// The shared properties (`owner = "shared"`, [`super::shared`]) among `values`' paths.
    pub(super) shared: super::shared::SharedPaths,
}

impl ContactPayload {
    /// A stable hash of everything owned (the `fingerprint` column, for mappings from before
    /// `sent` was kept): same values, same fingerprint.
    pub(crate) fn fingerprint(&self) -> String {
        let mut h = Sha256::new();
        for (path, v) in &self.values {
            let k = path.key();
            h.update((k.len() as u64).to_le_bytes());
            h.update(k.as_bytes());
            h.update(hash(path, v).as_bytes());
        }
        for t in &self.tags {
            h.update(format!("{t:?}").as_bytes());
        }
        h.finalize().iter().take(16).map(|b| format!("{b:02x}")).collect()
    }

    /// What to keep in `contact_map.sent` once Keap holds this payload and these rule tags.
    pub(crate) fn sent(&self, tags: &RuleTags) -> Value {
        let mut sent = json!({"v": 2, "f": self.held_hashes(), "tags": tags.ours});
        if !tags.theirs.is_empty() {
            sent["theirs"] = json!(tags.theirs);
        }
        sent
    }

    /// Each owned path's key with its value's hash, as kept in `contact_map.sent` and compared later.
    pub(super) fn held_hashes(&self) -> HashMap<String, String> {
        self.values.iter().map(|(p, v)| (p.key(), hash(p, v))).collect()
    }

    /// What Keap holds if it holds exactly this payload (tags unknown).
    pub(crate) fn as_held(&self) -> Held {
        Held { hashes: self.held_hashes(), tags: None, theirs: BTreeSet::new(), fresh: false }
    }

    /// For each owned path whose value differs from `contact`'s (as Keap returned it): the path,
    /// the row's value and Keap's. Personal data: only for `reconcile --show-values`.
    pub(crate) fn differences(&self, contact: &Value) -> Vec<(String, Value, Value)> {
        let changed = self.drift(contact);
        self.values
            .iter()
            .filter(|(p, _)| changed.0.contains(*p))
            .map(|(p, ours)| (p.key(), ours.clone(), super::held::value_at(contact, p)))
            .collect()
    }

    /// The owned paths to send, given what Keap holds: each value that differs, and consent
    /// only when it becomes given ([`super::consent`]): the row gives it and `held` says the
    /// last delivery's row did not (or nothing is known).
    pub(crate) fn changes(&self, held: &Held) -> Changes {
        let differs = |(p, v): &(&Path, &Value)| match *p == &CONSENT {
            true => !v.is_null() && !held.gave_consent(),
            false => held.hashes.get(&p.key()) != Some(&hash(p, v)),
        };
        Changes(self.values.iter().filter(differs).map(|(p, _)| p.clone()).collect())
    }

    /// The owned values `contact` (as Keap holds it) does not hold, as `reconcile` reports
    /// them: consent is Keap's (its reads may not even show it), so it is never drift.
    pub(crate) fn drift(&self, contact: &Value) -> Changes {
        let mut changes = self.changes(&Held::from_contact(contact, self));
        changes.0.remove(&CONSENT);
        changes
    }

    /// Takes consent out of `changes` when `contact` (as Keap answered it) shows an opt-out for
    /// EMAIL1 and the mapping does not say `over_opt_out`. Returns that status: consent is
    /// then withheld, and recorded as handled like a value sent.
    pub(crate) fn withhold_consent(&self, changes: &mut Changes, contact: &Value) -> Option<String> {
        if self.over_opt_out || !changes.0.contains(&CONSENT) {
            return None;
        }
        let status = consent::opt_out(contact)?;
        changes.0.remove(&CONSENT);
        Some(status)
    }

    /// Whether `changes` would send consent and the mapping does not allow it over an opt-out:
    /// then Keap's status of the address must be known first (a read).
    pub(crate) fn consent_needs_status(&self, changes: &Changes) -> bool {
        !self.over_opt_out && changes.0.contains(&CONSENT)
    }

    /// Whether `sent` (a `contact_map.sent` record) already records exactly this payload's
    /// values; if not, the record is rewritten even when no call was needed (a withdrawn
    /// consent sends nothing, but must be recorded so that consent given again is sent).
    pub(crate) fn recorded_in(&self, sent: &Value) -> bool {
        Held::from_sent(sent).hashes == self.held_hashes()
    }

    /// Body of `PUT /v1/contacts` for a contact that does not exist yet (find by email or
    /// create). Empty values are left out: there is nothing to clear on a new contact.
    pub(crate) fn create_body(&self) -> Map<String, Value> {
        let mut body = Map::new();
        let set: Vec<&Path> = self.values.iter().filter(|(_, v)| !v.is_null()).map(|(p, _)| p).collect();
        for path in &set {
            if path.slot().is_none() {
                body.insert(path.property().to_owned(), self.values[*path].clone());
            }
        }
        let mut arrays: Vec<&'static str> =
            set.iter().filter(|p| p.slot().is_some()).map(|p| p.property()).collect();
        arrays.dedup();
        for prop in arrays {
            let items = self.items(prop, &[]);
            if !items.is_empty() {
                body.insert(prop.to_owned(), Value::Array(items));
            }
        }
        body.insert("duplicate_option".into(), json!("Email"));
        body
    }

    /// The items of array property `prop`: Keap's `current` ones, with every slot and part we
    /// own set to our value (a slot whose main part we clear is removed), unknown item
    /// properties dropped.
    pub(super) fn items(&self, prop: &str, current: &[Value]) -> Vec<Value> {
        let key = slot_key(prop);
        let allowed = item_keys(prop);
        let mut items: Vec<Map<String, Value>> = current
            .iter()
            .filter_map(Value::as_object)
            .map(|m| {
                m.iter()
                    .filter(|(k, _)| allowed.contains(&k.as_str()))
                    .map(|(k, v)| (k.clone(), v.clone()))
                    .collect()
            })
            .collect();
        for (path, v) in self.values.iter().filter(|(p, _)| p.property() == prop) {
            let Some((slot, part)) = path.slot() else { continue };
            let pos = items.iter().position(|i| i.get(key) == Some(&slot));
            if v.is_null() && path.is_main_part() {
                if let Some(pos) = pos {
                    items.remove(pos);
                }
                continue;
            }
            let pos = pos.unwrap_or_else(|| {
                items.push(Map::from_iter([(key.to_owned(), slot.clone())]));
                items.len() - 1
            });
            let v = if v.is_null() { json!("") } else { v.clone() };
            items[pos].insert(part.to_owned(), v);
        }
        // A slot without its main part (a phone whose number column is NULL but whose type is
        // a constant) is not sent: Keap's answer to a phone without a number is not documented,
        // and under the replace-whole rule leaving the item out removes the slot.
        let main = main_part(prop);
        items
            .into_iter()
            .filter(|i| {
                main.is_none_or(|m| i.get(m).is_some_and(|v| v.as_str().is_none_or(|s| !s.is_empty())))
            })
            .map(Value::Object)
            .collect()
    }

    /// Body and `update_mask` of `PATCH /v1/contacts/{id}` sending only the properties of
    /// `changes`. When an array property changed, `current` must be the contact as Keap holds
    /// it now: the array is sent whole, ours set and every other slot as it was.
    pub(crate) fn patch(
        &self,
        changes: &Changes,
        current: Option<&Value>,
    ) -> (Map<String, Value>, Vec<&'static str>) {
        let mut body = Map::new();
        let mask = changes.properties();
        for prop in &mask {
            let scalar = changes.0.iter().find(|p| p.property() == *prop && p.slot().is_none());
            if let Some(path) = scalar {
                let v = match &self.values[path] {
                    Value::Null if is_text(path) => json!(""),
                    v => v.clone(),
                };
                body.insert((*prop).to_owned(), v);
                continue;
            }
            let now =
                current.and_then(|c| c.get(*prop)).and_then(Value::as_array).cloned().unwrap_or_default();
            body.insert((*prop).to_owned(), Value::Array(self.items(prop, &now)));
        }
        (body, mask)
    }

    /// Every owned value.
    #[cfg(test)]
    pub(crate) fn owned(&self) -> Vec<(String, Value)> {
        self.values.iter().map(|(p, v)| (p.key(), v.clone())).collect()
    }
}

/// Whether a scalar path takes text (cleared with ""), rather than an id (cleared with null).
pub(super) fn is_text(path: &Path) -> bool {
    let Path::Scalar(name) = path else { return false };
    crate::config::SCALARS.iter().any(|s| s.name == *name && !matches!(s.kind, ScalarKind::Id))
}
