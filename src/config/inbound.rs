//! `[inbound]`: the columns of the users table that Keap's data lands in (design invariant
//! 17: each of them is Keap's, so the outbound mapping may not send it too), and with them the
//! columns of the `[contact]` properties marked `owner = "keap"` ([`UsersConfig::inbound_columns`]).
//! Off when neither is configured: then keap-sync never writes the users table.
//!
//! ```toml
//! [inbound]
//! email_opt_out = "marketing_opt_out"   # boolean: true while EMAIL1 is opted out in Keap
//! contact_gone_at = "keap_contact_gone_at" # timestamptz: when the linked contact was found gone
//! tags = { column = "keap_tags", category = "Churn signals" } # text[]: the category's tags applied
//! ```
//!
//! `tags` names a tag category by name (`category`) or by Keap's id (`category_id`), exactly
//! one of them; its column holds the sorted names of the tags of that category applied to the
//! contact, `{}` when none is (`mirror::inbound`, `mirror::tag_book`).

use serde::Deserialize;

use super::values::validate_identifier;
use super::{ConfigError, Field, Prefer, Source, UsersConfig};

/// Where Keap's data lands in the users table.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct InboundConfig {
    /// A boolean column set to true while Keap holds an opt-out (a person's unsubscribe, a
    /// bounce, a spam report…) for the contact's EMAIL1, and to false while it holds a
    /// marketable or merely non-marketable status; `None`: not written.
    pub email_opt_out: Option<String>,
    /// A `timestamptz` column stamped with the time the user's linked contact was found gone
    /// in Keap (deleted or merged away, confirmed by a 404), in the statement that unlinks it.
    /// Left as it is afterwards (a relink does not clear it): it says when the contact was
    /// last lost. `None`: not written.
    pub contact_gone_at: Option<String>,
    /// A `text[]` column holding the names of the tags of one category applied to the contact
    /// (sorted; `{}` when none is); `None`: not written.
    pub tags: Option<InboundTags>,
}

/// `[inbound] tags`: which category's tags land in which column.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InboundTags {
    /// The `text[]` column.
    pub column: String,
    /// The tag category, as Keap's tag list names it.
    pub category: TagCategory,
}

/// A tag category of Keap, by name or by id.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum TagCategory {
    /// The category's name, exactly as Keap spells it.
    Name(String),
    /// Keap's id of the category.
    Id(i64),
}

impl std::fmt::Display for TagCategory {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            TagCategory::Name(name) => write!(f, "category {name:?}"),
            TagCategory::Id(id) => write!(f, "category id {id}"),
        }
    }
}

/// What of Keap's lands in an inbound column.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum InboundData {
    /// Whether EMAIL1 is opted out (`email_opt_out`): a boolean column.
    EmailOptOut,
    /// When the linked contact was found gone in Keap (`contact_gone_at`): a `timestamptz`
    /// column, written by the unlink, never by the mirror's inbound pass.
    ContactGone,
    /// The names of the tags of this category applied to the contact (`tags`), sorted: a
    /// `text[]` column.
    Tags(TagCategory),
    /// A `[contact]` property with `owner = "keap"` (its config key and the property): its
    /// value as Keap holds it, as text, into a text column.
    Owned {
        /// The config key, e.g. `contact.phone_numbers.PHONE1.number`.
        key: String,
        /// The Keap property (a scalar, EMAIL2/EMAIL3, a phone or address part, a custom field).
        field: Field,
    },
    /// A `[contact]` property with `owner = "shared"`: sent like the application's, and Keap's
    /// changes of it written into its text column by delivery, which reads the contact first
    /// (`deliver::plan`). The inbound pass only notices that the mirror shows one changed.
    Shared {
        /// The config key.
        key: String,
        /// The Keap property (a scalar, EMAIL2/EMAIL3, a phone or address part, a custom field).
        field: Field,
        /// The side that wins a conflict.
        prefer: Prefer,
    },
}

impl InboundData {
    /// The config key that names its column.
    pub fn key(&self) -> &str {
        match self {
            InboundData::EmailOptOut => "inbound.email_opt_out",
            InboundData::ContactGone => "inbound.contact_gone_at",
            InboundData::Tags(_) => "inbound.tags",
            InboundData::Owned { key, .. } | InboundData::Shared { key, .. } => key,
        }
    }

    /// The SQL type its value is read as and compared in (a Keap-owned property's column is
    /// of a text type, checked by `schema`).
    pub fn sql_type(&self) -> &'static str {
        match self {
            InboundData::EmailOptOut => "boolean",
            InboundData::ContactGone => "timestamptz",
            InboundData::Tags(_) => "text[]",
            InboundData::Owned { .. } | InboundData::Shared { .. } => "text",
        }
    }

    /// Whether its value comes from the mirror (the inbound pass writes it); the stamp of a
    /// contact found gone does not.
    pub fn from_mirror(&self) -> bool {
        !matches!(self, InboundData::ContactGone)
    }
}

impl InboundConfig {
    /// Whether anything comes in at all.
    pub fn is_on(&self) -> bool {
        self.email_opt_out.is_some() || self.contact_gone_at.is_some() || self.tags.is_some()
    }

    /// Each configured column of `[inbound]` with what lands in it (the Keap-owned properties'
    /// columns are in [`UsersConfig::inbound_columns`]).
    pub fn columns(&self) -> Vec<(InboundData, &str)> {
        let opt_out = self.email_opt_out.iter().map(|c| (InboundData::EmailOptOut, c.as_str()));
        let gone = self.contact_gone_at.iter().map(|c| (InboundData::ContactGone, c.as_str()));
        let tags = self.tags.iter().map(|t| (InboundData::Tags(t.category.clone()), t.column.as_str()));
        opt_out.chain(gone).chain(tags).collect()
    }
}

impl UsersConfig {
    /// Every column keap-sync writes from Keap, with what lands in it: `[inbound]`'s, then each
    /// `owner = "keap"` property's, then each `owner = "shared"` one's, in the order of the file.
    pub fn inbound_columns(&self) -> Vec<(InboundData, &str)> {
        let owned = self.contact.keap_owned.iter().filter_map(|f| match &f.source {
            Source::Column(c) => {
                Some((InboundData::Owned { key: f.key.clone(), field: f.field.clone() }, c.as_str()))
            }
            Source::Sql(_) => None,
        });
        let shared = self.contact.shared.iter().filter_map(|(f, prefer)| match &f.source {
            Source::Column(c) => Some((
                InboundData::Shared { key: f.key.clone(), field: f.field.clone(), prefer: *prefer },
                c.as_str(),
            )),
            Source::Sql(_) => None,
        });
        self.inbound.columns().into_iter().chain(owned).chain(shared).collect()
    }
}

/// Nothing comes in unless a column is named.
#[derive(Debug, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(super) struct FileInbound {
    pub(super) email_opt_out: Option<String>,
    pub(super) contact_gone_at: Option<String>,
    pub(super) tags: Option<FileInboundTags>,
}

/// `tags = { column = "…", category = "…" }` (or `category_id = N`).
#[derive(Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct FileInboundTags {
    column: String,
    #[serde(default)]
    category: Option<String>,
    #[serde(default)]
    category_id: Option<i64>,
}

impl FileInboundTags {
    /// Exactly one category, by a name that is not blank or by a positive id.
    fn validate(self) -> Result<InboundTags, ConfigError> {
        let category = match (self.category, self.category_id) {
            (Some(name), None) if !name.trim().is_empty() => TagCategory::Name(name),
            (Some(_), None) => {
                return Err(ConfigError::Invalid(
                    "inbound.tags: category is blank: give the tag category's name as Keap shows it".into(),
                ))
            }
            (None, Some(id)) if id > 0 => TagCategory::Id(id),
            (None, Some(id)) => {
                return Err(ConfigError::Invalid(format!(
                    "inbound.tags: category_id = {id} is not a Keap id (a positive number)"
                )))
            }
            _ => {
                return Err(ConfigError::Invalid(
                    "inbound.tags: give exactly one of category (the tag category's name) or \
                     category_id (its id in Keap)"
                        .into(),
                ))
            }
        };
        Ok(InboundTags { column: self.column, category })
    }
}

impl FileInbound {
    /// Every column a valid name, none of them named twice (by `[inbound]` or a Keap-owned
    /// property of `[contact]`, which `users` holds already), and none that the outbound mapping
    /// also reads by name or that keys the table: one owner a column (invariant 17). A column
    /// read only inside an SQL expression is refused later, when `schema` resolves the mapping
    /// against the table.
    pub(super) fn validate(self, users: &UsersConfig) -> Result<InboundConfig, ConfigError> {
        let tags = self.tags.map(FileInboundTags::validate).transpose()?;
        let inbound =
            InboundConfig { email_opt_out: self.email_opt_out, contact_gone_at: self.contact_gone_at, tags };
        let all = UsersConfig { inbound: inbound.clone(), ..users.clone() };
        let columns = all.inbound_columns();
        for (i, (data, column)) in columns.iter().enumerate() {
            let key = data.key();
            validate_identifier(key, column, false)?;
            if let Some((other, _)) = columns[..i].iter().find(|(_, c)| c == column) {
                return Err(ConfigError::Invalid(format!(
                    "{} and {key} both name column {column}: give each its own column",
                    other.key()
                )));
            }
            if let Some(outbound) = outbound_key(users, column, key) {
                return Err(ConfigError::Invalid(format!(
                    "{key} = {column:?} is also {outbound}: a column has one owner, and {key} makes it \
                     Keap's while {outbound} sends it to Keap; map another column for one of them"
                )));
            }
        }
        Ok(inbound)
    }
}

/// The config key of the outbound mapping (or the table's key) that names `column` directly,
/// other than `inbound` itself (a shared property is both).
fn outbound_key(users: &UsersConfig, column: &str, inbound: &str) -> Option<String> {
    if users.key == column {
        return Some("users.key (the table's key)".into());
    }
    let named = |source: &Source| matches!(source, Source::Column(c) if c == column);
    let field = users.fields().into_iter().find(|f| named(&f.source) && f.key != inbound).map(|f| f.key);
    field.or_else(|| users.contact.tags.rules.iter().find(|r| named(&r.source)).map(|r| r.key.clone()))
}
