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
//!
//! The files: [`ContactPayload`] and the bodies sent (`payload`), what Keap holds and what
//! changed ([`Held`], [`Changes`], [`RuleTags`] in `held`), and the checks of Keap's rules
//! (`validate`, with `countries`).

mod consent;
mod countries;
mod held;
mod payload;
mod shared;
mod validate;

pub(crate) use consent::{email1_opted_out, email1_status};
pub(crate) use held::{Changes, Held, RuleTags};
pub(crate) use payload::ContactPayload;
pub(crate) use shared::{moved_in_keap, Settled, SharedValue};

use std::collections::{BTreeMap, BTreeSet};

use serde_json::{json, Value};

use crate::config::{
    AddressPart, CustomFieldRef, Empty, Field, FieldMapping, PhonePart, Scalar, TagRef, TagTemplate,
    UsersConfig,
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
    /// `opt_in_reason`'s `over_opt_out`: consent may be sent over an opt-out Keap holds.
    over_opt_out: bool,
    /// The properties Keap owns (`owner = "keap"`): never sent, but listed into the mirror,
    /// whose values the inbound pass writes into their columns.
    keap_owned: Vec<FieldMapping>,
    /// The shared properties (`owner = "shared"`) by config key: who wins, and the column.
    shared: BTreeMap<String, (crate::config::Prefer, String)>,
}

impl Mapper {
    /// The mapper for `users`: its fields in read order, its tag rules and on-create tags.
    pub(crate) fn new(users: &UsersConfig) -> Mapper {
        Mapper {
            fields: users.fields(),
            rules: users.contact.tags.rules.iter().map(|r| (r.key.clone(), r.tag.clone())).collect(),
            on_create: users.contact.tags.on_create.clone(),
            create_missing: users.contact.tags.create_missing,
            over_opt_out: users.contact.consent_over_opt_out,
            keap_owned: users.contact.keap_owned.clone(),
            shared: users
                .contact
                .shared
                .iter()
                .filter_map(|(f, prefer)| match &f.source {
                    crate::config::Source::Column(c) => Some((f.key.clone(), (*prefer, c.clone()))),
                    crate::config::Source::Sql(_) => None,
                })
                .collect(),
        }
    }

    /// The `contact_map.sent` keys of the shared properties (`owner = "shared"`): their base is
    /// what both sides last agreed on, which `reconcile --apply` must keep when it clears the
    /// rest of the record (without it, the row's value would be sent over Keap's correction).
    /// `reconcile` reads no contact model, so the base of a shared custom field is kept only
    /// when the field is named by id (by name it is cleared like the rest, as before).
    pub(crate) fn shared_path_keys(&self) -> Vec<String> {
        let shared = self.fields.iter().filter(|f| self.shared.contains_key(&f.key));
        shared.filter_map(|f| path(&f.field, None)).map(|p| p.key()).collect()
    }

    /// Whether any custom field is mapped, sent or Keap's (then Keap's model must be known,
    /// and contact reads ask for `custom_fields`).
    pub(crate) fn needs_model(&self) -> bool {
        self.fields.iter().chain(&self.keap_owned).any(|f| matches!(f.field, Field::Custom(_)))
    }

    /// The configured custom fields (sent or Keap's) Keap's model lacks, as a message for the
    /// operator naming each by its config key.
    pub(crate) fn check_model(&self, model: &CustomModel) -> Result<(), String> {
        let missing: Vec<String> = self
            .fields
            .iter()
            .chain(&self.keap_owned)
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

    /// Every contact property the mapping reads or writes (v1 names), once each: those it
    /// sends and those Keap owns, which the mirror's listing must ask for too.
    pub(crate) fn properties(&self) -> Vec<&'static str> {
        let sent = self.fields.iter().chain(&self.keap_owned).map(|f| f.field.property());
        let mut props: Vec<&'static str> = sent.collect();
        props.sort_unstable();
        props.dedup();
        props
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
        let mut shared = BTreeMap::new();
        let mut email = None;
        for (i, f) in self.fields.iter().enumerate() {
            let raw = row.values.get(i).cloned().flatten();
            let what = f.source.describe(&f.key);
            let invalid =
                |rule: String| MappingError::Invalid { key: key.to_owned(), what: what.clone(), rule };
            let path = field_path(f, key, model)?;
            if let Some((prefer, column)) = self.shared.get(&f.key) {
                let value = SharedValue { prefer: *prefer, column: column.clone(), row: raw.clone() };
                shared.insert(path.clone(), value);
            }
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
            let value = checked_value(f, &raw.unwrap_or_default(), model).map_err(invalid)?;
            if f.field == Field::Email(1) {
                email = value.as_str().map(str::to_owned);
            }
            values.insert(path, value);
        }
        self.check_addresses(key, &values)?;
        let tags = self.rule_tags(key, row)?;
        let email =
            email.ok_or_else(|| MappingError::NoEmail { key: key.to_owned(), what: "users.email".into() })?;
        Ok(ContactPayload { email, values, tags, over_opt_out: self.over_opt_out, shared })
    }

    /// Keap's rules across the parts of one address (`docs/keap-api.md`): a region needs a
    /// country code, a zip code and a postal code exclude each other, a zip_four needs a zip code.
    fn check_addresses(&self, key: &str, values: &BTreeMap<Path, Value>) -> Result<(), MappingError> {
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
        Ok(())
    }

    /// The tags the tag rules derive from the row (the values after the mapped fields); a tag
    /// name Keap would refuse is a [`MappingError`].
    fn rule_tags(&self, key: &str, row: &UserRow) -> Result<BTreeSet<TagRef>, MappingError> {
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
        Ok(tags)
    }
}

/// Where field `f`'s value goes on the contact; a custom field Keap's `model` lacks is a
/// [`MappingError`].
fn field_path(f: &FieldMapping, key: &str, model: Option<&CustomModel>) -> Result<Path, MappingError> {
    // A payload's custom field needs the model even when named by id: its type says how its
    // value is sent.
    let placed = match (&f.field, model) {
        (Field::Custom(_), None) => None,
        (field, model) => path(field, model),
    };
    placed.ok_or_else(|| MappingError::UnknownCustomField {
        key: key.to_owned(),
        what: f.source.describe(&f.key),
        field: match &f.field {
            Field::Custom(CustomFieldRef::Id(id)) => id.to_string(),
            Field::Custom(CustomFieldRef::Name(n)) => format!("{n:?}"),
            other => format!("{other:?}"),
        },
    })
}

/// The value Keap holds at `path` (a Keap-owned property's, `owner = "keap"`) on `contact` (v1
/// shape, as the mirror keeps it), as text for its column: `None` when Keap holds none, or an
/// empty or blank one. An empty value in Keap therefore writes nothing: a column is never
/// blanked from Keap's side (design invariant 21).
pub(crate) fn keap_value(contact: &Value, path: &Path) -> Option<String> {
    value_text(&held::value_at(contact, path))
}

/// A value Keap holds as text for a column (or the conflict record): `None` when it is empty
/// or blank, or not a string, number or boolean.
pub(crate) fn value_text(v: &Value) -> Option<String> {
    match v {
        Value::String(s) if !s.trim().is_empty() => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        Value::Bool(b) => Some(b.to_string()),
        _ => None,
    }
}

/// Where `field` is on a contact. A custom field named by id needs no model; one named by name
/// is looked up in Keap's `model`: `None` without it, or when the model has no such field.
pub(crate) fn path(field: &Field, model: Option<&CustomModel>) -> Option<Path> {
    Some(match field {
        Field::Scalar(s) => Path::Scalar(s.name),
        Field::Email(n) => Path::Email(*n),
        Field::Phone(n, p) => Path::Phone(*n, *p),
        Field::Address(a, p) => Path::Address(a, *p),
        Field::Custom(CustomFieldRef::Id(id)) if model.is_none() => Path::Custom(*id),
        Field::Custom(r) => Path::Custom(model?.resolve(r)?.0),
    })
}

/// Field `f`'s value `v` checked against Keap's rule for its property, as it is sent; the rule
/// it breaks otherwise.
fn checked_value(f: &FieldMapping, v: &str, model: Option<&CustomModel>) -> Result<Value, String> {
    match &f.field {
        Field::Scalar(Scalar { kind, .. }) => validate::scalar(*kind, v),
        Field::Email(n) => validate::email(*n, v),
        Field::Phone(n, p) => validate::phone(*n, *p, v),
        Field::Address(a, p) => validate::address(a, *p, v),
        Field::Custom(r) => {
            let t = model.and_then(|m| m.resolve(r)).map_or("Text", |(_, t)| t);
            validate::custom(t, v)
        }
    }
}

#[cfg(test)]
mod tests;
