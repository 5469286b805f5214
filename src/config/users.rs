//! `[users]`: the application's table, its key and the basic contact columns; the whole mapping
//! as the rest of the crate reads it ([`UsersConfig`]).

use serde::Deserialize;

use super::contact::owner_of;
use super::values::validate_identifier;
use super::{ConfigError, ContactMapping, Empty, Field, FieldMapping, InboundConfig, Owner, Source, SCALARS};

/// The application's table and the columns that are synced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UsersConfig {
    /// `schema.table` or `table` (then `public`).
    pub table: String,
    /// The primary key column: any type whose text form is exact (`schema::key` refuses the rest).
    pub key: String,
    /// The column sent as the contact's EMAIL1.
    pub email: String,
    /// The column sent as `given_name`; `None` when not synced or Keap's (`owner = "keap"`: then
    /// it is in `contact.keap_owned`; a shared one is here and in `contact.shared`).
    pub given_name: Option<String>,
    /// The column sent as `family_name`; `None` when not synced or Keap's (as `given_name`).
    pub family_name: Option<String>,
    /// Every other mapped property and the tags (`[contact]`, `[tags]`).
    pub contact: ContactMapping,
    /// The columns Keap's data lands in (`[inbound]`); none when the section is absent.
    pub inbound: InboundConfig,
}

impl UsersConfig {
    /// Puts the names of `[users]` that Keap owns or both share (from [`FileUsers::validate`])
    /// into the contact mapping's lists, as `[contact]`'s own are.
    pub(super) fn own_names(&mut self, owned: Vec<OwnedName>) {
        for (f, owner) in owned {
            match owner {
                Owner::Keap => self.contact.keap_owned.push(f),
                Owner::Shared(prefer) => self.contact.shared.push((f, prefer)),
                Owner::App => {}
            }
        }
    }

    /// The table split into schema and name.
    pub fn schema_and_table(&self) -> (&str, &str) {
        match self.table.split_once('.') {
            Some((schema, table)) => (schema, table),
            None => ("public", self.table.as_str()),
        }
    }

    /// The columns named directly (not inside an SQL expression) whose change must reach
    /// Keap, in a stable order (email first), without repeats. `schema` adds the columns the
    /// expressions read.
    pub fn synced_columns(&self) -> Vec<String> {
        let mut cols: Vec<String> = Vec::new();
        let direct = self.fields().into_iter().map(|f| f.source).chain(self.tag_sources());
        for source in direct {
            if let Source::Column(c) = source {
                if !cols.contains(&c) {
                    cols.push(c);
                }
            }
        }
        cols
    }

    /// Every mapped property: EMAIL1 (`email`) first, then the names of `[users]` (which
    /// clear Keap's value when empty, as they always have), then `[contact]` in file order.
    pub fn fields(&self) -> Vec<FieldMapping> {
        let scalar = |name: &str| SCALARS.iter().find(|s| s.name == name).expect("a known property");
        let mut fields = vec![FieldMapping {
            key: "users.email".into(),
            field: Field::Email(1),
            source: Source::Column(self.email.clone()),
            empty: Empty::Clear,
        }];
        for (key, name, column) in [
            ("users.given_name", "given_name", &self.given_name),
            ("users.family_name", "family_name", &self.family_name),
        ] {
            if let Some(c) = column {
                fields.push(FieldMapping {
                    key: key.into(),
                    field: Field::Scalar(scalar(name)),
                    source: Source::Column(c.clone()),
                    empty: Empty::Clear,
                });
            }
        }
        fields.extend(self.contact.fields.iter().cloned());
        fields
    }

    /// The sources of the tag rules, in order.
    pub fn tag_sources(&self) -> impl Iterator<Item = Source> + '_ {
        self.contact.tags.rules.iter().map(|r| r.source.clone())
    }
}

#[derive(Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(super) struct FileUsers {
    pub(super) table: String,
    pub(super) key: String,
    pub(super) email: String,
    /// `""` means "do not sync this field" (also for `family_name`).
    pub(super) given_name: FileName,
    pub(super) family_name: FileName,
}

/// A name's column as written: `"first_name"`, or `{ column = "first_name", owner = "…",
/// prefer = "…" }` for a name Keap owns or both sides share.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(untagged)]
pub(super) enum FileName {
    Column(String),
    Full(FileNameTable),
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct FileNameTable {
    column: String,
    owner: Option<String>,
    prefer: Option<String>,
}

impl FileName {
    /// The column (`None`: not synced) and its owner.
    fn validate(self, key: &str) -> Result<(Option<String>, Owner), ConfigError> {
        let (column, owner) = match self {
            FileName::Column(c) => (c, Owner::App),
            FileName::Full(t) => (t.column, owner_of(key, t.owner.as_deref(), t.prefer.as_deref())?),
        };
        if column.is_empty() {
            return match owner {
                Owner::App => Ok((None, owner)),
                _ => Err(ConfigError::Invalid(format!("{key}: an owner needs a column"))),
            };
        }
        validate_identifier(key, &column, false)?;
        Ok((Some(column), owner))
    }
}

/// A name of `[users]` that Keap owns or both share: its mapping as `[contact]` keeps those.
pub(super) type OwnedName = (FieldMapping, Owner);

impl Default for FileUsers {
    fn default() -> Self {
        FileUsers {
            table: "public.users".into(),
            key: "id".into(),
            email: "email".into(),
            given_name: FileName::Column("first_name".into()),
            family_name: FileName::Column("last_name".into()),
        }
    }
}

impl FileUsers {
    /// `[users]` checked: the table, key and email columns must be valid names; an empty name column is
    /// not synced. Also the names Keap owns or both share, for `[contact]`'s lists
    /// ([`UsersConfig::own_names`] puts them there).
    pub(super) fn validate(self) -> Result<(UsersConfig, Vec<OwnedName>), ConfigError> {
        validate_identifier("users.table", &self.table, true)?;
        let column = |key: &str, name: String| validate_identifier(key, &name, false).map(|()| name);
        let mut owned = Vec::new();
        let mut name = |key: &str, scalar: &str, file: FileName| -> Result<Option<String>, ConfigError> {
            let (column, owner) = file.validate(key)?;
            if let (Some(c), Owner::Keap | Owner::Shared(_)) = (&column, owner) {
                let field =
                    Field::Scalar(SCALARS.iter().find(|s| s.name == scalar).expect("a known property"));
                let source = Source::Column(c.clone());
                owned.push((FieldMapping { key: key.into(), field, source, empty: Empty::Clear }, owner));
            }
            Ok(column.filter(|_| owner != Owner::Keap))
        };
        let given_name = name("users.given_name", "given_name", self.given_name)?;
        let family_name = name("users.family_name", "family_name", self.family_name)?;
        let users = UsersConfig {
            key: column("users.key", self.key)?,
            email: column("users.email", self.email)?,
            given_name,
            family_name,
            table: self.table,
            contact: ContactMapping::default(),
            inbound: InboundConfig::default(),
        };
        Ok((users, owned))
    }
}
