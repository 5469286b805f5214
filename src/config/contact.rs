//! The contact mapping: which columns (or SQL expressions over the user's row) become which
//! Keap contact properties, which tags follow from the row, and what a deleted user does.
//!
//! This module only knows the *shape* of the mapping and Keap's catalogue of writable v1
//! properties (`docs/keap-api.md`); it checks what can be checked without a
//! database or Keap: property names, slot names, that a `region` comes with a `country_code`,
//! that nothing is mapped twice. `schema` later checks every column and expression against the
//! table (at start-up and `migrate`), and the daemon resolves custom field and tag names
//! against Keap's model.
//!
//! ```toml
//! [contact]
//! middle_name = "middle_name"                   # a column of the users table
//! job_title = { sql = "initcap(title)" }        # or an SQL expression over the row
//! website = { column = "homepage", empty = "clear" }  # NULL/"" clears Keap's value
//! spouse_name = { column = "spouse", owner = "keap" }  # Keap's: written into the column, never sent
//! [contact.email_addresses]
//! EMAIL2 = { column = "work_email", owner = "shared", prefer = "keap" }  # both ways
//! [contact.phone_numbers.PHONE1]
//! number = "phone"
//! type = { sql = "'Mobile'" }
//! [[contact.custom_fields]]
//! name = "Plan"                                 # or id = 12
//! value = "plan"
//! ```

use std::collections::{BTreeMap, HashSet};

use serde::Deserialize;

use super::ConfigError;

/// Where a mapped value comes from.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Source {
    /// A column of the users table (any type; read as text).
    Column(String),
    /// An SQL expression over the row's columns (any type; read as text), e.g.
    /// `case when consent then 'Signed up with consent' end`.
    Sql(String),
}

impl Source {
    /// How an operator recognises it in a message: `column phone`, or `the SQL of
    /// contact.job_title`. Never a value.
    pub fn describe(&self, key: &str) -> String {
        match self {
            Source::Column(c) => format!("column {c}"),
            Source::Sql(_) => format!("the SQL expression of {key}"),
        }
    }
}

/// What a NULL or empty value does to the Keap property.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Empty {
    /// Leave Keap's value as it is (the default for `[contact]` fields).
    Keep,
    /// Clear it in Keap (the names of `[users]` do this, as they always have).
    Clear,
}

/// Who owns a mapped property (design invariant 17): its data flows only from its owner.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Owner {
    /// The application (the default): the column's value is sent to Keap, never written back.
    App,
    /// Keap (`owner = "keap"`): Keap's value is written into the column (by the sweep's inbound
    /// pass), never sent, and the column is not watched by capture.
    Keap,
    /// Both (`owner = "shared"`, with `prefer`): a change on either side reaches the other; a
    /// change on both sides since they last agreed is a conflict, settled by [`Prefer`].
    Shared(Prefer),
}

/// Which side wins a conflict over a shared property (`prefer = "app" | "keap"`): never the
/// later clock (Keap's and the database's are not comparable).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Prefer {
    /// The row's value is sent over Keap's.
    App,
    /// Keap's value is written into the column, and nothing is sent.
    Keap,
}

impl Prefer {
    /// As the config and `keap_sync.conflict.winner` spell it.
    pub fn as_str(self) -> &'static str {
        match self {
            Prefer::App => "app",
            Prefer::Keap => "keap",
        }
    }
}

/// What kind of value a scalar property takes, for the checks before sending.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ScalarKind {
    /// Free text of at most this many characters.
    Text(usize),
    /// `YYYY-MM-DD` (a date column reads so).
    Date,
    /// A Keap record id (int64).
    Id,
    /// One of Keap's `source_type` values.
    SourceType,
    /// A locale like `en_US`.
    Locale,
}

/// A top-level scalar property of a v1 contact.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Scalar {
    /// The v1 property name, as sent and as `update_mask` names it.
    pub name: &'static str,
    /// What its values must look like.
    pub kind: ScalarKind,
}

/// Keap's writable scalar contact properties (v1 `CreateOrPatchContact`). Lengths are the v2
/// specification's (the same contact record); 255 where none is stated.
pub const SCALARS: &[Scalar] = &[
    Scalar { name: "given_name", kind: ScalarKind::Text(40) },
    Scalar { name: "middle_name", kind: ScalarKind::Text(100) },
    Scalar { name: "family_name", kind: ScalarKind::Text(40) },
    Scalar { name: "preferred_name", kind: ScalarKind::Text(100) },
    Scalar { name: "prefix", kind: ScalarKind::Text(255) },
    Scalar { name: "suffix", kind: ScalarKind::Text(255) },
    Scalar { name: "spouse_name", kind: ScalarKind::Text(100) },
    Scalar { name: "job_title", kind: ScalarKind::Text(255) },
    Scalar { name: "website", kind: ScalarKind::Text(100) },
    Scalar { name: "time_zone", kind: ScalarKind::Text(255) },
    Scalar { name: "preferred_locale", kind: ScalarKind::Locale },
    Scalar { name: "birthday", kind: ScalarKind::Date },
    Scalar { name: "anniversary", kind: ScalarKind::Date },
    Scalar { name: "lead_source_id", kind: ScalarKind::Id },
    Scalar { name: "owner_id", kind: ScalarKind::Id },
    Scalar { name: "source_type", kind: ScalarKind::SourceType },
    Scalar { name: "opt_in_reason", kind: ScalarKind::Text(255) },
];

/// Another name people use for a property, and Keap's name for it.
const ALIASES: &[(&str, &str)] = &[("title", "prefix"), ("nickname", "preferred_name")];

/// A part of a phone number slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum PhonePart {
    /// `number`: the slot exists while this has a value.
    Number,
    /// `extension`.
    Extension,
    /// `type`, e.g. Mobile, Work, Home.
    Type,
}

/// A part of an address.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum AddressPart {
    /// `line1`
    Line1,
    /// `line2`
    Line2,
    /// `locality` (city)
    Locality,
    /// `region` (state, province); needs a `country_code`.
    Region,
    /// `postal_code`: not together with `zip_code`.
    PostalCode,
    /// `zip_code` (US); not together with `postal_code`.
    ZipCode,
    /// `zip_four`, only with a `zip_code`.
    ZipFour,
    /// `country_code`, ISO 3166-1 alpha-3 (`USA`, `GBR`).
    CountryCode,
}

impl PhonePart {
    /// Every part, with its v1 name.
    pub const ALL: [(PhonePart, &'static str); 3] =
        [(PhonePart::Number, "number"), (PhonePart::Extension, "extension"), (PhonePart::Type, "type")];
    /// The v1 property name.
    pub fn name(self) -> &'static str {
        Self::ALL.iter().find(|(p, _)| *p == self).map_or("", |(_, n)| n)
    }
}

impl AddressPart {
    /// Every part, with its v1 name.
    pub const ALL: [(AddressPart, &'static str); 8] = [
        (AddressPart::Line1, "line1"),
        (AddressPart::Line2, "line2"),
        (AddressPart::Locality, "locality"),
        (AddressPart::Region, "region"),
        (AddressPart::PostalCode, "postal_code"),
        (AddressPart::ZipCode, "zip_code"),
        (AddressPart::ZipFour, "zip_four"),
        (AddressPart::CountryCode, "country_code"),
    ];
    /// The v1 property name.
    pub fn name(self) -> &'static str {
        Self::ALL.iter().find(|(p, _)| *p == self).map_or("", |(_, n)| n)
    }
}

/// The address slots of a v1 contact.
pub const ADDRESS_FIELDS: [&str; 3] = ["BILLING", "SHIPPING", "OTHER"];

/// A custom field, by Keap id or by name (resolved through `GET /v1/contacts/model`).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum CustomFieldRef {
    /// The field's id.
    Id(i64),
    /// Its label or field name, as Keap's model lists it.
    Name(String),
}

/// One contact property (or part of an array property) keap-sync owns.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Field {
    /// A top-level scalar property.
    Scalar(&'static Scalar),
    /// An email slot, 1 to 3 (EMAIL1 is `users.email`).
    Email(u8),
    /// A part of phone slot PHONE1 to PHONE5.
    Phone(u8, PhonePart),
    /// A part of the BILLING, SHIPPING or OTHER address.
    Address(&'static str, AddressPart),
    /// A custom field's content.
    Custom(CustomFieldRef),
}

impl Field {
    /// The top-level v1 property this field is (part of), as `update_mask` names it.
    pub fn property(&self) -> &'static str {
        match self {
            Field::Scalar(s) => s.name,
            Field::Email(_) => "email_addresses",
            Field::Phone(..) => "phone_numbers",
            Field::Address(..) => "addresses",
            Field::Custom(_) => "custom_fields",
        }
    }
}

/// One mapped property.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldMapping {
    /// The config key, for messages: `contact.phone_numbers.PHONE1.number`.
    pub key: String,
    /// The Keap property.
    pub field: Field,
    /// Where its value comes from.
    pub source: Source,
    /// What NULL or "" does.
    pub empty: Empty,
}

/// A tag, by Keap id or by name (resolved through `GET /v1/tags`, cached).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum TagRef {
    /// The tag's id.
    Id(i64),
    /// Its exact name.
    Name(String),
}

/// A tag that follows the row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TagRule {
    /// The config key, for messages: `tags.from[0]`.
    pub key: String,
    /// The value the tag follows.
    pub source: Source,
    /// Which tag.
    pub tag: TagTemplate,
}

/// The tag a [`TagRule`] applies.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TagTemplate {
    /// This tag while the value is true (a boolean column or expression), none otherwise.
    When(TagRef),
    /// The tag named by the template with `{value}` replaced, e.g. `Plan: {value}`; none
    /// while the value is NULL or empty.
    Named(String),
}

/// Tags keap-sync applies and removes.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TagsConfig {
    /// Applied once, when keap-sync first links the user to a contact (creating it or
    /// finding it by email).
    pub on_create: Vec<TagRef>,
    /// Applied and removed as the row changes.
    pub rules: Vec<TagRule>,
    /// Create a tag named by a rule or `on_create` when Keap has none of that name (else
    /// the change is parked, saying which tag is missing).
    pub create_missing: bool,
}

/// The whole contact mapping beyond `[users]`' email and names.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ContactMapping {
    /// Mapped properties the application owns (sent to Keap), in the order of the file.
    pub fields: Vec<FieldMapping>,
    /// Mapped properties Keap owns (`owner = "keap"`, always a column): written into their
    /// columns from the mirror, never sent (invariant 17). Not in [`ContactMapping::fields`],
    /// so nothing outbound (payloads, update masks, the capture trigger) ever sees them.
    pub keap_owned: Vec<FieldMapping>,
    /// Mapped properties both sides may change (`owner = "shared"`, always a column), with the
    /// side that wins a conflict. Each is also in [`ContactMapping::fields`]: sent like the
    /// application's, and Keap's changes of it written into its column by delivery.
    pub shared: Vec<(FieldMapping, Prefer)>,
    /// Tags.
    pub tags: TagsConfig,
    /// `opt_in_reason = { …, over_opt_out = true }`: consent given in the table is sent even
    /// over an opt-out Keap holds for the address (a hand opt-out is then lifted). Off by
    /// default: consent only ever becomes more restrictive through keap-sync (invariant 17).
    pub consent_over_opt_out: bool,
}

// ---- the file's shape ---------------------------------------------------------------------------

/// A value source as written: `"column"`, `{ column = "c", empty = "clear" }` or
/// `{ sql = "expr" }`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(untagged)]
pub(super) enum FileSource {
    Column(String),
    Full(FileSourceTable),
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct FileSourceTable {
    column: Option<String>,
    sql: Option<String>,
    empty: Option<Empty>,
    /// Only for `opt_in_reason` ([`ContactMapping::consent_over_opt_out`]).
    over_opt_out: Option<bool>,
    /// `"app"` (the default), `"keap"` or `"shared"` ([`Owner`]); text here, so that a wrong
    /// value is refused naming the key and the valid ones (serde's untagged enum would not say).
    owner: Option<String>,
    /// With `owner = "shared"` only: `"app"` or `"keap"` ([`Prefer`]).
    prefer: Option<String>,
}

/// `[contact]`: scalar properties by name, plus the array properties as sub-tables.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(default)]
pub(super) struct FileContact {
    email_addresses: BTreeMap<String, FileSource>,
    phone_numbers: BTreeMap<String, BTreeMap<String, FileSource>>,
    addresses: BTreeMap<String, BTreeMap<String, FileSource>>,
    custom_fields: Vec<FileCustomField>,
    /// Every other key: a scalar property (checked against [`SCALARS`] in `validate`).
    #[serde(flatten)]
    scalars: BTreeMap<String, FileSource>,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct FileCustomField {
    id: Option<i64>,
    name: Option<String>,
    value: FileSource,
}

/// `[tags]`.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(super) struct FileTags {
    on_create: Vec<FileTagRef>,
    create_missing: bool,
    from: Vec<FileTagRule>,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(untagged)]
pub(super) enum FileTagRef {
    Id(i64),
    Name(String),
}

/// `delivery.on_delete_tag`: a tag, "Account deleted" unless set.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(transparent)]
pub(super) struct FileTagRefOrDefault(FileTagRef);

impl Default for FileTagRefOrDefault {
    fn default() -> Self {
        FileTagRefOrDefault(FileTagRef::Name("Account deleted".into()))
    }
}

impl FileTagRefOrDefault {
    /// The tag `key` names: a positive id or a non-blank name.
    pub(super) fn validate(&self, key: &str) -> Result<TagRef, ConfigError> {
        tag_ref(key, self.0.clone())
    }
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct FileTagRule {
    column: Option<String>,
    sql: Option<String>,
    tag: FileTagRef,
}

// ---- validation ---------------------------------------------------------------------------------

/// An invalid-config error with `message`, which names the config key first.
fn invalid(message: String) -> ConfigError {
    ConfigError::Invalid(message)
}

impl FileSource {
    /// The column or expression a property reads, what counts as empty for it (the file's
    /// `empty`, else `default_empty`) and its owner. A Keap-owned property needs a plain column:
    /// Keap's value is written into it, and an expression cannot be written.
    fn validate(self, key: &str, default_empty: Empty) -> Result<(Source, Empty, Owner), ConfigError> {
        let (column, sql, empty, owner, prefer) = match self {
            FileSource::Column(c) => (Some(c), None, None, None, None),
            FileSource::Full(t) if t.over_opt_out.is_some() => {
                return Err(invalid(format!(
                "{key}: over_opt_out belongs to contact.opt_in_reason only (it lets consent lift an opt-out)"
            )))
            }
            FileSource::Full(t) => (t.column, t.sql, t.empty, t.owner, t.prefer),
        };
        let owner = owner_of(key, owner.as_deref(), prefer.as_deref())?;
        if owner != Owner::App && sql.is_some() {
            let name = if owner == Owner::Keap { "keap" } else { "shared" };
            return Err(invalid(format!(
                "{key}: owner = \"{name}\" needs a column (`{{ column = \"…\", owner = \"{name}\" }}`), \
                 not an SQL expression: Keap's value is written into the column, and an expression \
                 cannot be written"
            )));
        }
        if owner == Owner::Keap && empty.is_some() {
            return Err(invalid(format!(
                "{key}: empty says what an empty column does to Keap's value, but a property with \
                 owner = \"keap\" is never sent; remove empty"
            )));
        }
        let source = source(key, column, sql)?;
        Ok((source, empty.unwrap_or(default_empty), owner))
    }
}

/// `owner = "app" | "keap" | "shared"`; absent is the application. `prefer` goes with
/// `shared`, and only with it.
pub(super) fn owner_of(key: &str, owner: Option<&str>, prefer: Option<&str>) -> Result<Owner, ConfigError> {
    let owner = match owner {
        None | Some("app") => Owner::App,
        Some("keap") => Owner::Keap,
        Some("shared") => match prefer {
            Some("app") => return Ok(Owner::Shared(Prefer::App)),
            Some("keap") => return Ok(Owner::Shared(Prefer::Keap)),
            other => {
                return Err(invalid(format!(
                    "{key}: owner = \"shared\" needs prefer = \"app\" or \"keap\" (found {other:?}): \
                     the side whose value wins when both changed the property since they last agreed"
                )))
            }
        },
        Some(other) => {
            return Err(invalid(format!(
                "{key}: owner = {other:?} is not an owner: use \"app\" (the default: the column is sent \
                 to Keap), \"keap\" (Keap's value is written into the column) or \"shared\" (both, with \
                 prefer)"
            )))
        }
    };
    match prefer {
        Some(_) => Err(invalid(format!("{key}: prefer goes with owner = \"shared\" only; remove prefer"))),
        None => Ok(owner),
    }
}

/// Refuses `owner = "keap"` or `"shared"` for `what`, which stays the application's.
fn app_only(key: &str, owner: Owner, what: &str) -> Result<(), ConfigError> {
    if owner != Owner::App {
        let name = if owner == Owner::Keap { "keap" } else { "shared" };
        return Err(invalid(format!(
            "{key}: owner = \"{name}\" is not supported for {what}; every other property of \
             [contact] (scalars, EMAIL2 and EMAIL3, the parts of phone numbers and addresses, custom \
             fields) may be Keap's or shared"
        )));
    }
    Ok(())
}

/// Exactly one of a column and an expression.
fn source(key: &str, column: Option<String>, sql: Option<String>) -> Result<Source, ConfigError> {
    match (column, sql) {
        (Some(c), None) => {
            super::values::validate_identifier(key, &c, false)?;
            Ok(Source::Column(c))
        }
        (None, Some(s)) if !s.trim().is_empty() && !s.contains(';') => Ok(Source::Sql(s)),
        (None, Some(_)) => Err(invalid(format!(
            "{key}: the sql expression is empty or holds a `;`: write one SQL expression over the row's columns"
        ))),
        _ => Err(invalid(format!(
            "{key}: give either a column name (`{key} = \"column\"`) or an expression (`{key} = {{ sql = \"…\" }}`), not both"
        ))),
    }
}

/// Whether `t` can name a tag: a positive id or a non-blank name; anything else is refused.
fn tag_ref(key: &str, t: FileTagRef) -> Result<TagRef, ConfigError> {
    match t {
        FileTagRef::Id(id) if id > 0 => Ok(TagRef::Id(id)),
        FileTagRef::Name(n) if !n.trim().is_empty() => Ok(TagRef::Name(n)),
        _ => Err(invalid(format!("{key}: a tag is a Keap tag id (a positive number) or a tag name"))),
    }
}

/// `PHONE1` … `PHONE5` → 1 … 5.
fn slot(key: &str, name: &str, prefix: &str, max: u8) -> Result<u8, ConfigError> {
    name.strip_prefix(prefix)
        .and_then(|n| n.parse::<u8>().ok())
        .filter(|n| (1..=max).contains(n))
        .ok_or_else(|| invalid(format!("{key}: unknown slot {name:?}: use {prefix}1 to {prefix}{max}")))
}

impl FileContact {
    /// The mapping of `[contact]`: every scalar property, array slot and part, and custom field
    /// checked and named by its config key, each Keap property mapped once.
    pub(super) fn validate(self) -> Result<ContactMapping, ConfigError> {
        let mut fields: Vec<(FieldMapping, Owner)> = Vec::new();
        let FileContact { email_addresses, phone_numbers, addresses, custom_fields, mut scalars } = self;
        let consent_over_opt_out = over_opt_out(&mut scalars);
        scalar_fields(scalars, &mut fields)?;
        email_fields(email_addresses, &mut fields)?;
        phone_fields(phone_numbers, &mut fields)?;
        address_fields(addresses, &mut fields)?;
        custom_field_refs(custom_fields, &mut fields)?;
        let mut seen = HashSet::new();
        for (f, _) in &fields {
            if !seen.insert(&f.field) {
                return Err(invalid(format!("{}: this Keap property is mapped twice", f.key)));
            }
        }
        let shared = fields
            .iter()
            .filter_map(|(f, o)| match o {
                Owner::Shared(prefer) => Some((f.clone(), *prefer)),
                _ => None,
            })
            .collect();
        let (keap, sent): (Vec<_>, Vec<_>) = fields.into_iter().partition(|(_, o)| *o == Owner::Keap);
        Ok(ContactMapping {
            fields: sent.into_iter().map(|(f, _)| f).collect(),
            keap_owned: keap.into_iter().map(|(f, _)| f).collect(),
            shared,
            tags: TagsConfig::default(),
            consent_over_opt_out,
        })
    }
}

/// Takes `over_opt_out` off `opt_in_reason` (any other property that has it is refused by
/// [`FileSource::validate`]).
fn over_opt_out(scalars: &mut BTreeMap<String, FileSource>) -> bool {
    match scalars.get_mut("opt_in_reason") {
        Some(FileSource::Full(t)) => t.over_opt_out.take().unwrap_or(false),
        _ => false,
    }
}

/// The scalar properties (every other key of `[contact]`), checked against [`SCALARS`].
fn scalar_fields(
    scalars: BTreeMap<String, FileSource>,
    fields: &mut Vec<(FieldMapping, Owner)>,
) -> Result<(), ConfigError> {
    for (name, src) in scalars {
        let key = format!("contact.{name}");
        let keap_name = ALIASES.iter().find(|(a, _)| *a == name).map_or(name.as_str(), |(_, k)| k);
        if ["given_name", "family_name", "email"].contains(&keap_name) {
            return Err(invalid(format!(
                "{key}: set it under [users] (users.{keap_name}), where it has always been"
            )));
        }
        let Some(scalar) = SCALARS.iter().find(|s| s.name == keap_name) else {
            let known: Vec<&str> = SCALARS.iter().map(|s| s.name).collect();
            return Err(invalid(format!(
                "{key} is not a Keap contact property keap-sync can write: use one of {}, or the \
                 tables email_addresses, phone_numbers, addresses, custom_fields",
                known.join(", ")
            )));
        };
        let (source, empty, owner) = src.validate(&key, Empty::Keep)?;
        if scalar.name == "opt_in_reason" {
            app_only(&key, owner, "consent (Keap's opt-out lands in [inbound] email_opt_out)")?;
        }
        fields.push((FieldMapping { key, field: Field::Scalar(scalar), source, empty }, owner));
    }
    Ok(())
}

/// `[contact.email_addresses]`: EMAIL2 and EMAIL3 (EMAIL1 is `users.email`).
fn email_fields(
    email_addresses: BTreeMap<String, FileSource>,
    fields: &mut Vec<(FieldMapping, Owner)>,
) -> Result<(), ConfigError> {
    for (name, src) in email_addresses {
        let key = format!("contact.email_addresses.{name}");
        let n = slot(&key, &name, "EMAIL", 3)?;
        if n == 1 {
            return Err(invalid(format!("{key}: EMAIL1 is users.email; map EMAIL2 or EMAIL3 here")));
        }
        let (source, empty, owner) = src.validate(&key, Empty::Keep)?;
        fields.push((FieldMapping { key, field: Field::Email(n), source, empty }, owner));
    }
    Ok(())
}

/// `[contact.phone_numbers]`: PHONE1 to PHONE5, each with its number mapped.
fn phone_fields(
    phone_numbers: BTreeMap<String, BTreeMap<String, FileSource>>,
    fields: &mut Vec<(FieldMapping, Owner)>,
) -> Result<(), ConfigError> {
    for (name, parts) in phone_numbers {
        let key = format!("contact.phone_numbers.{name}");
        let n = slot(&key, &name, "PHONE", 5)?;
        if !parts.contains_key("number") {
            return Err(invalid(format!("{key}: map its number (`number = \"column\"`)")));
        }
        for (part, src) in parts {
            let key = format!("{key}.{part}");
            let Some((p, _)) = PhonePart::ALL.iter().find(|(_, n)| *n == part) else {
                return Err(invalid(format!("{key}: a phone number has number, extension and type")));
            };
            let (source, empty, owner) = src.validate(&key, Empty::Keep)?;
            fields.push((FieldMapping { key, field: Field::Phone(n, *p), source, empty }, owner));
        }
    }
    Ok(())
}

/// `[contact.addresses]`: BILLING, SHIPPING and OTHER, a region only with its country.
fn address_fields(
    addresses: BTreeMap<String, BTreeMap<String, FileSource>>,
    fields: &mut Vec<(FieldMapping, Owner)>,
) -> Result<(), ConfigError> {
    for (name, parts) in addresses {
        let key = format!("contact.addresses.{name}");
        let Some(kind) = ADDRESS_FIELDS.iter().find(|f| **f == name) else {
            return Err(invalid(format!("{key}: unknown address {name:?}: use BILLING, SHIPPING or OTHER")));
        };
        if parts.contains_key("region") && !parts.contains_key("country_code") {
            return Err(invalid(format!(
                "{key}: region is mapped without country_code; Keap accepts a region only with its country"
            )));
        }
        for (part, src) in parts {
            let key = format!("{key}.{part}");
            let Some((p, _)) = AddressPart::ALL.iter().find(|(_, n)| *n == part) else {
                let known: Vec<&str> = AddressPart::ALL.iter().map(|(_, n)| *n).collect();
                return Err(invalid(format!("{key}: an address has {}", known.join(", "))));
            };
            let (source, empty, owner) = src.validate(&key, Empty::Keep)?;
            fields.push((FieldMapping { key, field: Field::Address(kind, *p), source, empty }, owner));
        }
    }
    Ok(())
}

/// `[[contact.custom_fields]]`: each named by id or by name, not both.
fn custom_field_refs(
    custom_fields: Vec<FileCustomField>,
    fields: &mut Vec<(FieldMapping, Owner)>,
) -> Result<(), ConfigError> {
    for (i, cf) in custom_fields.into_iter().enumerate() {
        let key = format!("contact.custom_fields[{i}]");
        let r = match (cf.id, cf.name) {
            (Some(id), None) if id > 0 => CustomFieldRef::Id(id),
            (None, Some(name)) if !name.trim().is_empty() => CustomFieldRef::Name(name),
            _ => {
                return Err(invalid(format!(
                    "{key}: name the custom field by `id = 12` or by `name = \"Plan\"`, not both"
                )))
            }
        };
        let (source, empty, owner) = cf.value.validate(&key, Empty::Keep)?;
        fields.push((FieldMapping { key, field: Field::Custom(r), source, empty }, owner));
    }
    Ok(())
}

impl FileTags {
    /// `[tags]` checked: a `tags.from` rule whose tag name holds `{value}` names one tag per value; any
    /// other tag is applied while the value is true.
    pub(super) fn validate(self) -> Result<TagsConfig, ConfigError> {
        let on_create = self
            .on_create
            .into_iter()
            .enumerate()
            .map(|(i, t)| tag_ref(&format!("tags.on_create[{i}]"), t))
            .collect::<Result<_, _>>()?;
        let mut rules = Vec::new();
        for (i, r) in self.from.into_iter().enumerate() {
            let key = format!("tags.from[{i}]");
            let source = source(&key, r.column, r.sql)?;
            let tag = match tag_ref(&format!("{key}.tag"), r.tag)? {
                TagRef::Name(n) if n.contains("{value}") => TagTemplate::Named(n),
                other => TagTemplate::When(other),
            };
            rules.push(TagRule { key, source, tag });
        }
        Ok(TagsConfig { on_create, rules, create_missing: self.create_missing })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mapping(text: &str) -> Result<ContactMapping, ConfigError> {
        let file: FileContact = toml::from_str(text).map_err(|e| invalid(e.to_string()))?;
        file.validate()
    }

    #[test]
    fn every_kind_of_field_parses() {
        let m = mapping(
            r#"
            middle_name = "middle"
            nickname = { sql = "upper(nick)" }
            website = { column = "site", empty = "clear" }
            [email_addresses]
            EMAIL2 = "work_email"
            [phone_numbers.PHONE1]
            number = "phone"
            type = { sql = "'Mobile'" }
            [addresses.BILLING]
            region = "state"
            country_code = "country"
            [[custom_fields]]
            name = "Plan"
            value = "plan"
            "#,
        )
        .unwrap();
        let keys: Vec<&str> = m.fields.iter().map(|f| f.key.as_str()).collect();
        assert!(keys.contains(&"contact.nickname") && keys.contains(&"contact.phone_numbers.PHONE1.type"));
        let nick = m.fields.iter().find(|f| f.key == "contact.nickname").unwrap();
        assert_eq!(nick.field.property(), "preferred_name");
        assert_eq!(nick.source, Source::Sql("upper(nick)".into()));
        assert_eq!(m.fields.iter().find(|f| f.key == "contact.website").unwrap().empty, Empty::Clear);
        assert_eq!(m.fields.iter().find(|f| f.key == "contact.middle_name").unwrap().empty, Empty::Keep);
    }

    #[test]
    fn mistakes_name_their_key_and_the_fix() {
        for (text, want) in [
            ("middel_name = \"m\"", "contact.middel_name is not a Keap contact property"),
            ("given_name = \"g\"", "users.given_name"),
            ("[email_addresses]\nEMAIL1 = \"e\"", "EMAIL1 is users.email"),
            ("[phone_numbers.PHONE6]\nnumber = \"p\"", "PHONE1 to PHONE5"),
            ("[phone_numbers.PHONE1]\ntype = \"t\"", "map its number"),
            ("[addresses.HOME]\nline1 = \"l\"", "BILLING, SHIPPING or OTHER"),
            ("[addresses.BILLING]\nregion = \"r\"", "without country_code"),
            ("[addresses.BILLING]\nstreet = \"r\"", "an address has line1"),
            ("[[custom_fields]]\nid = 1\nname = \"x\"\nvalue = \"v\"", "not both"),
            ("job_title = { sql = \"1; drop table users\" }", "holds a `;`"),
            ("job_title = { column = \"a\", sql = \"b\" }", "not both"),
            ("job_title = \"a\"\ntitle = \"b\"\nprefix = \"c\"", "mapped twice"),
        ] {
            let err = mapping(text).unwrap_err().to_string();
            assert!(err.contains(want), "{text}: {err}");
        }
    }

    #[test]
    fn tag_rules_with_a_value_are_templates() {
        let tags: FileTags = toml::from_str(
            "on_create = [\"From app\", 7]\n[[from]]\ncolumn = \"plan\"\ntag = \"Plan: {value}\"\n[[from]]\nsql = \"is_vip\"\ntag = 9\n",
        )
        .unwrap();
        let tags = tags.validate().unwrap();
        assert_eq!(tags.on_create, vec![TagRef::Name("From app".into()), TagRef::Id(7)]);
        assert_eq!(tags.rules[0].tag, TagTemplate::Named("Plan: {value}".into()));
        assert_eq!(tags.rules[1].tag, TagTemplate::When(TagRef::Id(9)));
        assert!(toml::from_str::<FileTags>("[[from]]\ntag = \"x\"\n").unwrap().validate().is_err());
    }
}
