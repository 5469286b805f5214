//! From a user row to what keap-sync owns on a Keap contact, and what to send to change it.
//!
//! We own exactly the properties the configuration maps (`UsersConfig::fields`: EMAIL1, the
//! names of `[users]`, everything under `[contact]`) and the tags the tag rules derive.
//! Everything else on the contact belongs to the marketing team and is never sent
//! (ARCHITECTURE.md, invariant 12):
//! - an update sends only the properties whose owned content changed, and its `update_mask`
//!   names exactly those;
//! - an array property (`email_addresses`, `phone_numbers`, `addresses`, `custom_fields`) may
//!   be replaced whole when written (Keap's v2 documentation says so, v1 is silent; the fake
//!   plays replace), so it is sent only when something we own in it changed, and then rebuilt
//!   from the contact as Keap holds it, with only our slots and parts changed
//!   ([`ContactPayload::patch`] takes the contact).
//!
//! Each owned value has a *path* (`given_name`, `phone_numbers.PHONE1.number`,
//! `custom_fields.12`). What Keap holds ([`Held`]) is kept per path as a short hash in
//! `contact_map.sent` (`{"v": 2, "f": {path: hash}, "tags": [ids]}`), written on every
//! success: per-field fingerprints, so a change sends its own properties and no others, and
//! no personal value is copied into keap-sync's tables. `sent` maps of earlier releases (the
//! values themselves) are still read.
//!
//! Values are checked against Keap's rules before anything is sent (`validate`): a row that
//! breaks one is a [`MappingError`], parked with a message naming the user key, the column
//! and the rule, not the value.

mod countries;
mod validate;

use std::collections::{BTreeMap, BTreeSet, HashMap};

use serde_json::{json, Map, Value};
use sha2::{Digest, Sha256};

use crate::config::{
    AddressPart, CustomFieldRef, Empty, Field, FieldMapping, PhonePart, Scalar, ScalarKind, TagRef,
    TagTemplate, UsersConfig,
};
use crate::outbox::UserRow;

/// Why a row cannot become a contact. Such a change is parked, not retried: only a new change
/// to the row (or to the configuration) can fix it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum MappingError {
    #[error(
        "user {key}: the user has no email address ({what}); Keap needs one to create or find the contact"
    )]
    NoEmail { key: String, what: String },
    #[error("user {key}: {what} {rule}; fix the value (or the mapping), and the user syncs on its next change or on `keap-sync failures retry {key}`")]
    Invalid { key: String, what: String, rule: String },
    #[error("user {key}: {what}: custom field {field} is not in Keap's contact model; fix the mapping (`keap-sync preview` lists the problem)")]
    UnknownCustomField { key: String, what: String, field: String },
}

/// One owned value's place on a contact.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub(crate) enum Path {
    Scalar(&'static str),
    Email(u8),
    Phone(u8, PhonePart),
    Address(&'static str, AddressPart),
    Custom(i64),
}

impl Path {
    /// The top-level property, as `update_mask` names it.
    pub(crate) fn property(&self) -> &'static str {
        match self {
            Path::Scalar(s) => s,
            Path::Email(_) => "email_addresses",
            Path::Phone(..) => "phone_numbers",
            Path::Address(..) => "addresses",
            Path::Custom(_) => "custom_fields",
        }
    }

    /// Its name in `contact_map.sent` and in `preview`.
    pub(crate) fn key(&self) -> String {
        match self {
            Path::Scalar(s) => (*s).to_owned(),
            Path::Email(n) => format!("email_addresses.EMAIL{n}"),
            Path::Phone(n, p) => format!("phone_numbers.PHONE{n}.{}", p.name()),
            Path::Address(f, p) => format!("addresses.{f}.{}", p.name()),
            Path::Custom(id) => format!("custom_fields.{id}"),
        }
    }

    /// The array slot (`EMAIL2`, `PHONE1`, `BILLING`, or the custom field id) and the part
    /// within it; `None` for a scalar.
    fn slot(&self) -> Option<(Value, &'static str)> {
        match self {
            Path::Scalar(_) => None,
            Path::Email(n) => Some((json!(format!("EMAIL{n}")), "email")),
            Path::Phone(n, p) => Some((json!(format!("PHONE{n}")), p.name())),
            Path::Address(f, p) => Some((json!(f), p.name())),
            Path::Custom(id) => Some((json!(id), "content")),
        }
    }

    /// The part whose absence removes the slot: an email without address, a phone without
    /// number, a custom field without content.
    fn is_main_part(&self) -> bool {
        matches!(self, Path::Email(_) | Path::Phone(_, PhonePart::Number) | Path::Custom(_))
    }
}

/// The part of an array item without which the slot is not there and is not sent.
fn main_part(property: &str) -> Option<&'static str> {
    match property {
        "email_addresses" => Some("email"),
        "phone_numbers" => Some("number"),
        // A custom field's empty content is how Keap lists a field without a value: kept.
        _ => None,
    }
}

/// The key inside an array item that says which slot it is.
fn slot_key(property: &str) -> &'static str {
    if property == "custom_fields" {
        "id"
    } else {
        "field"
    }
}

/// The properties a v1 write accepts inside each item of an array property (Keap's answers
/// carry a few more, which are not sent back).
fn item_keys(property: &str) -> &'static [&'static str] {
    match property {
        "email_addresses" => &["email", "field"],
        "phone_numbers" => &["number", "extension", "type", "field"],
        "addresses" => &[
            "line1",
            "line2",
            "locality",
            "region",
            "postal_code",
            "zip_code",
            "zip_four",
            "country_code",
            "field",
        ],
        "custom_fields" => &["id", "content"],
        _ => &[],
    }
}

/// Keap's contact model, as far as the mapping needs it: each custom field's id, names and type.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct CustomModel {
    /// (id, label, field_name, field_type)
    pub(crate) fields: Vec<(i64, String, String, String)>,
}

impl CustomModel {
    /// The id and type of a configured custom field.
    pub(crate) fn resolve(&self, r: &CustomFieldRef) -> Option<(i64, &str)> {
        let found = self.fields.iter().find(|(id, label, name, _)| match r {
            CustomFieldRef::Id(want) => id == want,
            CustomFieldRef::Name(want) => label == want || name == want,
        });
        found.map(|(id, _, _, t)| (*id, t.as_str()))
    }
}

/// What the mapping needs to turn rows into payloads: the fields in read order, the tag rules,
/// and Keap's model once known.
#[derive(Debug, Clone)]
pub(crate) struct Mapper {
    fields: Vec<FieldMapping>,
    rules: Vec<(String, TagTemplate)>,
    on_create: Vec<TagRef>,
    create_missing: bool,
}

impl Mapper {
    pub(crate) fn new(users: &UsersConfig) -> Mapper {
        Mapper {
            fields: users.fields(),
            rules: users.contact.tags.rules.iter().map(|r| (r.key.clone(), r.tag.clone())).collect(),
            on_create: users.contact.tags.on_create.clone(),
            create_missing: users.contact.tags.create_missing,
        }
    }

    /// Whether any custom field is mapped (then Keap's model must be known, and contact reads
    /// ask for `custom_fields`).
    pub(crate) fn needs_model(&self) -> bool {
        self.fields.iter().any(|f| matches!(f.field, Field::Custom(_)))
    }

    /// The configured custom fields Keap's model lacks, as a message for the operator.
    pub(crate) fn check_model(&self, model: &CustomModel) -> Result<(), String> {
        let missing: Vec<String> = self
            .fields
            .iter()
            .filter_map(|f| match &f.field {
                Field::Custom(r) if model.resolve(r).is_none() => Some(match r {
                    CustomFieldRef::Id(id) => format!("{} (id {id})", f.key),
                    CustomFieldRef::Name(n) => format!("{} (name {n:?})", f.key),
                }),
                _ => None,
            })
            .collect();
        if missing.is_empty() {
            Ok(())
        } else {
            Err(format!(
                "Keap's contact model has no custom field for {}: create the field in Keap or fix the \
                 mapping (names match a field's label or field_name exactly)",
                missing.join(", ")
            ))
        }
    }

    /// The properties Keap returns only when asked (`optional_properties`) among those mapped.
    pub(crate) fn optional_properties(&self) -> Vec<&'static str> {
        let mut props: Vec<&'static str> = self
            .fields
            .iter()
            .map(|f| f.field.property())
            .filter(|p| ["custom_fields", "job_title", "lead_source_id"].contains(p))
            .collect();
        props.sort_unstable();
        props.dedup();
        props
    }

    /// Whether any tag is configured by name (then Keap is asked for its id).
    pub(crate) fn uses_names(&self) -> bool {
        self.on_create.iter().any(|t| matches!(t, TagRef::Name(_)))
            || self.rules.iter().any(|(_, t)| !matches!(t, TagTemplate::When(TagRef::Id(_))))
    }

    /// Whether a tag named by the configuration that Keap lacks is created.
    pub(crate) fn create_missing_tags(&self) -> bool {
        self.create_missing
    }

    /// Tags to apply when keap-sync first links a user to a contact.
    pub(crate) fn on_create(&self) -> &[TagRef] {
        &self.on_create
    }

    /// The payload of one user row (the values in `UserTable::selects` order). `model` is
    /// Keap's contact model, needed when custom fields are mapped.
    pub(crate) fn payload(
        &self,
        key: &str,
        row: &UserRow,
        model: Option<&CustomModel>,
    ) -> Result<ContactPayload, MappingError> {
        let mut values = BTreeMap::new();
        let mut email = None;
        for (i, f) in self.fields.iter().enumerate() {
            let raw = row.values.get(i).cloned().flatten();
            let what = f.source.describe(&f.key);
            let invalid =
                |rule: String| MappingError::Invalid { key: key.to_owned(), what: what.clone(), rule };
            let path = match &f.field {
                Field::Scalar(s) => Path::Scalar(s.name),
                Field::Email(n) => Path::Email(*n),
                Field::Phone(n, p) => Path::Phone(*n, *p),
                Field::Address(a, p) => Path::Address(a, *p),
                Field::Custom(r) => match model.and_then(|m| m.resolve(r)) {
                    Some((id, _)) => Path::Custom(id),
                    None => {
                        return Err(MappingError::UnknownCustomField {
                            key: key.to_owned(),
                            what,
                            field: match r {
                                CustomFieldRef::Id(id) => id.to_string(),
                                CustomFieldRef::Name(n) => format!("{n:?}"),
                            },
                        })
                    }
                },
            };
            let empty = raw.as_deref().is_none_or(|v| v.trim().is_empty());
            if f.field == Field::Email(1) {
                if empty {
                    return Err(MappingError::NoEmail { key: key.to_owned(), what });
                }
            } else if empty {
                if f.empty == Empty::Clear {
                    values.insert(path, Value::Null);
                }
                continue;
            }
            let v = raw.unwrap_or_default();
            let value = match &f.field {
                Field::Scalar(Scalar { kind, .. }) => validate::scalar(*kind, &v),
                Field::Email(n) => validate::email(*n, &v),
                Field::Phone(n, p) => validate::phone(*n, *p, &v),
                Field::Address(a, p) => validate::address(a, *p, &v),
                Field::Custom(r) => {
                    let t = model.and_then(|m| m.resolve(r)).map_or("Text", |(_, t)| t);
                    validate::custom(t, &v)
                }
            }
            .map_err(invalid)?;
            if f.field == Field::Email(1) {
                email = value.as_str().map(str::to_owned);
            }
            values.insert(path, value);
        }
        // Rules across the parts of one address (`docs/keap-api.md`).
        for field in crate::config::ADDRESS_FIELDS {
            let has = |p: AddressPart| values.get(&Path::Address(field, p)).is_some_and(|v| !v.is_null());
            let what = |p: AddressPart| {
                let f = self.fields.iter().find(|f| f.field == Field::Address(field, p));
                f.map_or_else(|| format!("addresses.{field}"), |f| f.source.describe(&f.key))
            };
            let rule = if has(AddressPart::Region) && !has(AddressPart::CountryCode) {
                Some((
                    AddressPart::Region,
                    "has a region without a country code; Keap needs the country for a region",
                ))
            } else if has(AddressPart::ZipCode) && has(AddressPart::PostalCode) {
                Some((
                    AddressPart::ZipCode,
                    "has both a zip_code and a postal_code; Keap takes one or the other",
                ))
            } else if has(AddressPart::ZipFour) && !has(AddressPart::ZipCode) {
                Some((AddressPart::ZipFour, "has a zip_four without a zip_code"))
            } else {
                None
            };
            if let Some((part, rule)) = rule {
                return Err(MappingError::Invalid {
                    key: key.to_owned(),
                    what: what(part),
                    rule: rule.into(),
                });
            }
        }
        let mut tags = BTreeSet::new();
        for (i, (rule_key, tag)) in self.rules.iter().enumerate() {
            let raw = row.values.get(self.fields.len() + i).cloned().flatten().unwrap_or_default();
            match tag {
                TagTemplate::When(t) if validate::truthy(&raw) => {
                    tags.insert(t.clone());
                }
                TagTemplate::When(_) => {}
                TagTemplate::Named(_) if raw.trim().is_empty() => {}
                TagTemplate::Named(template) => {
                    let name = template.replace("{value}", raw.trim());
                    validate::tag_name(&name).map_err(|rule| MappingError::Invalid {
                        key: key.to_owned(),
                        what: format!("the tag of {rule_key}"),
                        rule,
                    })?;
                    tags.insert(TagRef::Name(name));
                }
            }
        }
        let email =
            email.ok_or_else(|| MappingError::NoEmail { key: key.to_owned(), what: "users.email".into() })?;
        Ok(ContactPayload { email, values, tags })
    }
}

/// The contact content we own, from one user row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ContactPayload {
    /// EMAIL1, the address contacts are found by.
    pub(crate) email: String,
    /// Every owned value: what to send, `Null` to clear Keap's value.
    values: BTreeMap<Path, Value>,
    /// The tags the rules derive from the row (names resolved to ids by the caller).
    pub(crate) tags: BTreeSet<TagRef>,
}

/// A value's hash, the unit of comparison: NULL and "" are the same (both mean "nothing"), and
/// an email address compares without case, as Keap matches them.
fn hash(path: &Path, v: &Value) -> String {
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
    hashes: HashMap<String, String>,
    tags: Option<BTreeSet<i64>>,
    /// Tags the rules want that were on the contact before keap-sync applied them (Keap
    /// answered `DUPLICATE`): a person's or a campaign's, never ours to remove.
    theirs: BTreeSet<i64>,
    /// Linked, but the `on_create` tags are not applied yet (the delivery that linked the
    /// contact failed before applying them): the next delivery applies them.
    fresh: bool,
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
            let v = match path.slot() {
                None => contact.get(path.property()).cloned().unwrap_or(Value::Null),
                Some((slot, part)) => {
                    let items = contact.get(path.property()).and_then(Value::as_array);
                    let key = slot_key(path.property());
                    let item = items.into_iter().flatten().find(|i| i.get(key) == Some(&slot));
                    item.and_then(|i| i.get(part)).cloned().unwrap_or(Value::Null)
                }
            };
            hashes.insert(path.key(), hash(path, &v));
        }
        let tags = contact
            .get("tag_ids")
            .and_then(Value::as_array)
            .map(|a| a.iter().filter_map(Value::as_i64).collect());
        Held { hashes, tags, theirs: BTreeSet::new(), fresh: false }
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
pub(crate) struct Changes(BTreeSet<Path>);

impl Changes {
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

    fn held_hashes(&self) -> HashMap<String, String> {
        self.values.iter().map(|(p, v)| (p.key(), hash(p, v))).collect()
    }

    /// What Keap holds if it holds exactly this payload (tags unknown).
    pub(crate) fn as_held(&self) -> Held {
        Held { hashes: self.held_hashes(), tags: None, theirs: BTreeSet::new(), fresh: false }
    }

    /// The owned paths whose value in Keap differs from this row.
    pub(crate) fn changes(&self, held: &Held) -> Changes {
        let differs = |(p, v): &(&Path, &Value)| held.hashes.get(&p.key()) != Some(&hash(p, v));
        Changes(self.values.iter().filter(differs).map(|(p, _)| p.clone()).collect())
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
    fn items(&self, prop: &str, current: &[Value]) -> Vec<Value> {
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
fn is_text(path: &Path) -> bool {
    let Path::Scalar(name) = path else { return false };
    crate::config::SCALARS.iter().any(|s| s.name == *name && !matches!(s.kind, ScalarKind::Id))
}

#[cfg(test)]
mod tests {
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
        let m =
            mapper("[contact]\njob_title = \"job\"\nwebsite = { column = \"site\", empty = \"clear\" }\n");
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
        assert!(
            err.contains("column first_name") && err.contains("at most 40") && !err.contains('é'),
            "{err}"
        );
    }

    #[test]
    fn tags_follow_their_rules() {
        let m = mapper("[[tags.from]]\ncolumn = \"plan\"\ntag = \"Plan: {value}\"\n[[tags.from]]\ncolumn = \"vip\"\ntag = 9\n");
        let p = payload(&m, &[Some("a@x.io"), None, None, Some("Pro"), Some("true")]);
        assert_eq!(p.tags, BTreeSet::from([TagRef::Name("Plan: Pro".into()), TagRef::Id(9)]));
        let p = payload(&m, &[Some("a@x.io"), None, None, None, Some("false")]);
        assert!(p.tags.is_empty());
    }
}
