//! What Keap holds of the values we own (a hash per path, the tags our rules applied), the
//! tags the rules want by who applied them, and which owned paths changed.

use std::collections::{BTreeSet, HashMap};

use serde_json::{json, Value};
use sha2::{Digest, Sha256};

use super::consent::CONSENT;
use super::{slot_key, ContactPayload, Path};

/// A value's hash, the unit of comparison: NULL and "" are the same (both mean "nothing"), and
/// an email address compares without case, as Keap matches them.
pub(super) fn hash(path: &Path, v: &Value) -> String {
    let canon = match v {
        Value::Null => String::from("0"),
        Value::String(s) if s.is_empty() => String::from("0"),
        Value::String(s) if matches!(path, Path::Email(_)) => format!("s{}", s.to_lowercase()),
        Value::String(s) => format!("s{s}"),
        other => format!("j{other}"),
    };
    let digest = Sha256::digest(canon.as_bytes());
    digest.iter().take(8).map(|b| format!("{b:02x}")).collect()
}

/// What Keap holds of the values we own, as far as we know: a hash per path, and the ids of
/// the tags our rules applied (`None`: not known).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Held {
    pub(super) hashes: HashMap<String, String>,
    pub(super) tags: Option<BTreeSet<i64>>,
    /// Tags the rules want that were on the contact before keap-sync applied them (Keap
    /// answered `DUPLICATE`): a person's or a campaign's, never ours to remove.
    pub(super) theirs: BTreeSet<i64>,
    /// Linked, but the `on_create` tags are not applied yet (the delivery that linked the
    /// contact failed before applying them): the next delivery applies them.
    pub(super) fresh: bool,
}

impl Held {
    /// What Keap holds for a mapped user, from its `contact_map` row: `sent` when kept, else
    /// (a mapping from before `sent` was kept) this payload if the fingerprint matches, else
    /// nothing known.
    pub(crate) fn of_mapping(
        sent: Option<&Value>,
        fingerprint: Option<&str>,
        payload: &ContactPayload,
    ) -> Held {
        match sent {
            Some(sent) => Held::from_sent(sent),
            None if fingerprint == Some(payload.fingerprint().as_str()) => payload.as_held(),
            None => Held::default(),
        }
    }

    /// From `contact_map.sent`, in either form.
    pub(crate) fn from_sent(sent: &Value) -> Held {
        if sent.get("v").and_then(Value::as_i64) == Some(2) {
            let hashes = sent.get("f").and_then(Value::as_object).map_or_else(HashMap::new, |m| {
                m.iter().filter_map(|(k, v)| Some((k.clone(), v.as_str()?.to_owned()))).collect()
            });
            let tags = sent
                .get("tags")
                .and_then(Value::as_array)
                .map(|a| a.iter().filter_map(Value::as_i64).collect());
            let fresh = sent.get("new").and_then(Value::as_bool).unwrap_or(false);
            let theirs = sent
                .get("theirs")
                .and_then(Value::as_array)
                .map(|a| a.iter().filter_map(Value::as_i64).collect())
                .unwrap_or_default();
            return Held { hashes, tags, theirs, fresh };
        }
        // Before per-field hashes: the values themselves, EMAIL1 under "email".
        let mut hashes = HashMap::new();
        for (old, path) in [
            ("email", Path::Email(1)),
            ("given_name", Path::Scalar("given_name")),
            ("family_name", Path::Scalar("family_name")),
        ] {
            if let Some(v) = sent.get(old) {
                hashes.insert(path.key(), hash(&path, v));
            }
        }
        Held { hashes, tags: Some(BTreeSet::new()), theirs: BTreeSet::new(), fresh: false }
    }

    /// For `contact_map.sent` at linking time: what Keap holds, no tags of ours applied yet,
    /// and the `on_create` tags still to apply.
    pub(crate) fn link_sent(&self) -> Value {
        json!({"v": 2, "f": self.hashes, "tags": [], "new": true})
    }

    /// Whether the `on_create` tags are still to be applied.
    pub(crate) fn is_fresh(&self) -> bool {
        self.fresh
    }

    /// From the contact as Keap returned it: the value at each of `payload`'s paths.
    pub(crate) fn from_contact(contact: &Value, payload: &ContactPayload) -> Held {
        let mut hashes = HashMap::new();
        for path in payload.values.keys() {
            hashes.insert(path.key(), hash(path, &value_at(contact, path)));
        }
        let tags = contact
            .get("tag_ids")
            .and_then(Value::as_array)
            .map(|a| a.iter().filter_map(Value::as_i64).collect());
        Held { hashes, tags, theirs: BTreeSet::new(), fresh: false }
    }

    /// Whether the last delivery's row gave consent, as its record says ([`super::consent`]).
    pub(super) fn gave_consent(&self) -> bool {
        let none = hash(&CONSENT, &Value::Null);
        self.hashes.get(&CONSENT.key()).is_some_and(|h| *h != none)
    }

    /// This (read from the contact), with consent as `base` (the mapping's record) has it:
    /// Keap's reads may not show consent, so only our record says whether it was given.
    pub(crate) fn with_consent_of(mut self, base: &Held) -> Held {
        let key = CONSENT.key();
        match base.hashes.get(&key) {
            Some(h) => self.hashes.insert(key, h.clone()),
            None => self.hashes.remove(&key),
        };
        self
    }

    /// The ids of the tags our rules applied, if known.
    pub(crate) fn tags(&self) -> Option<&BTreeSet<i64>> {
        self.tags.as_ref()
    }

    /// The wanted tags someone else had applied first ([`Held::theirs`]).
    pub(crate) fn theirs(&self) -> &BTreeSet<i64> {
        &self.theirs
    }
}

/// The tags the rules want on a contact, by who applied them. keap-sync removes only its own
/// when a rule stops wanting them; a wanted tag that was on the contact already (Keap answered
/// `DUPLICATE`) stays whoever's it was (issue 26, 14).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct RuleTags {
    /// Applied by keap-sync.
    pub(crate) ours: BTreeSet<i64>,
    /// Wanted, but applied by someone else first.
    pub(crate) theirs: BTreeSet<i64>,
}

impl RuleTags {
    /// `want` once `already` (the tags Keap said were there when applied) and the tags known
    /// to be someone else's (`theirs`) are set apart.
    pub(crate) fn split(want: &BTreeSet<i64>, theirs: &BTreeSet<i64>, already: &BTreeSet<i64>) -> RuleTags {
        let theirs: BTreeSet<i64> = theirs.union(already).filter(|t| want.contains(t)).copied().collect();
        RuleTags { ours: want.difference(&theirs).copied().collect(), theirs }
    }
}

/// Which owned paths differ between the row and Keap.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Changes(pub(super) BTreeSet<Path>);

impl Changes {
    /// Whether any owned path differs, i.e. whether the contact needs a patch at all.
    pub(crate) fn any(&self) -> bool {
        !self.0.is_empty()
    }

    /// Whether an array property is among them: then the contact must be read first, so its
    /// other slots are sent back as Keap holds them.
    pub(crate) fn touch_arrays(&self) -> bool {
        self.0.iter().any(|p| p.slot().is_some())
    }

    /// The top-level properties, as `update_mask` names them.
    pub(crate) fn properties(&self) -> Vec<&'static str> {
        let mut props: Vec<&'static str> = self.0.iter().map(Path::property).collect();
        props.dedup();
        props.sort_unstable();
        props.dedup();
        props
    }

    /// The paths, for logs and `preview`.
    pub(crate) fn paths(&self) -> Vec<String> {
        self.0.iter().map(Path::key).collect()
    }
}

/// The value at `path` of a contact as Keap returned it (`Null` when it has none).
pub(super) fn value_at(contact: &Value, path: &Path) -> Value {
    match path.slot() {
        None => contact.get(path.property()).cloned().unwrap_or(Value::Null),
        Some((slot, part)) => {
            let items = contact.get(path.property()).and_then(Value::as_array);
            let key = slot_key(path.property());
            let item = items.into_iter().flatten().find(|i| i.get(key) == Some(&slot));
            item.and_then(|i| i.get(part)).cloned().unwrap_or(Value::Null)
        }
    }
}
