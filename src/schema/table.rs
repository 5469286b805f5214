//! The users table as the catalog has it: the configured table, key and columns found, every
//! SQL expression prepared and type-checked, everything quoted for the generated SQL.

use tokio_postgres::GenericClient;

use std::collections::HashSet;

use super::key::KeyType;
use super::SchemaError;
use crate::config::{Field, InboundData, ScalarKind, Source, TagTemplate, UsersConfig};
use crate::db::quote_ident;

/// The users table as found in the catalog: every name checked and quoted, ready to splice
/// into SQL.
#[derive(Debug, Clone)]
pub(crate) struct UserTable {
    /// `"schema"."table"`
    pub qualified: String,
    /// Every partition of a partitioned users table (at any depth), qualified like `qualified`:
    /// a statement on a partition fires that partition's statement triggers, not the parent's.
    pub partitions: Vec<String>,
    /// Quoted key column.
    pub key: String,
    /// The key column's type, schema-qualified unless it is in `pg_catalog` (the generated
    /// functions pin `search_path`), for casting the text key back.
    pub key_type: String,
    /// The key type's equality operator as the generated SQL must spell it: `=` for a type of
    /// `pg_catalog`'s, `operator(schema.=)` for an extension's (`citext`), so that the users
    /// table's index on the key serves the fold's lookups under a pinned `search_path`.
    pub key_eq: String,
    /// One select expression per mapped value over the row aliased `t`, each read as text, in
    /// the order of `UsersConfig::fields` followed by the tag rules: what `outbox::read_users`
    /// reads and `mapping` consumes.
    pub selects: Vec<Selected>,
    /// Unquoted names of the columns whose change must reach Keap: those mapped directly and
    /// those the SQL expressions read, in trigger order.
    pub synced: Vec<String>,
    /// The columns Keap's data lands in (`[inbound]`), checked: none of them is in `synced`
    /// (but a shared property's, whose write from Keap capture skips), so an inbound write is
    /// never captured as a change to send (invariant 18).
    pub inbound: Vec<InboundColumn>,
    /// Every mapped property (sent, Keap's or shared), once each: what the inbound pass keeps
    /// as history of Keap's values (`mirror::history`), whether or not a column receives it.
    pub observed: Vec<Field>,
}

/// The properties of [`UserTable::observed`]: every mapped one, in the order of the file.
fn observed(users: &UsersConfig) -> Vec<Field> {
    let mut all: Vec<Field> = Vec::new();
    let mapped = users.fields().into_iter().chain(users.contact.keap_owned.iter().cloned());
    for f in mapped {
        if !all.contains(&f.field) {
            all.push(f.field);
        }
    }
    all
}

/// A column Keap's data lands in.
#[derive(Debug, Clone)]
pub(crate) struct InboundColumn {
    /// What lands in it.
    pub data: InboundData,
    /// The column's name, unquoted (for messages and the history).
    pub name: String,
    /// Quoted, for the generated SQL.
    pub quoted: String,
}

/// One value read from the users table for the mapping.
#[derive(Debug, Clone)]
pub(crate) struct Selected {
    /// `(t."phone")::text`, or the configured expression cast to text.
    pub sql: String,
    /// How a message names it: `column phone (contact.phone_numbers.PHONE1.number)`.
    pub what: String,
}

/// The types a property that takes a date, an id or a truth value may be mapped from.
fn type_fits(kind: Option<ScalarKind>, tag_when: bool, type_name: &str) -> Result<(), &'static str> {
    let textual = ["text", "character varying", "varchar", "character", "bpchar", "citext", "unknown"];
    let t = type_name.split('(').next().unwrap_or(type_name).trim();
    let ok = |allowed: &[&str]| textual.contains(&t) || allowed.contains(&t);
    if tag_when && !ok(&["boolean", "bool"]) {
        return Err("a tag rule without `{value}` in its tag needs a boolean column or expression");
    }
    match kind {
        Some(ScalarKind::Date)
            if !ok(&[
                "date",
                "timestamp without time zone",
                "timestamp with time zone",
                "timestamp",
                "timestamptz",
            ]) =>
        {
            Err("a date property needs a date, timestamp or text column or expression")
        }
        Some(ScalarKind::Id)
            if !ok(&["integer", "bigint", "smallint", "numeric", "int4", "int8", "int2"]) =>
        {
            Err("an id property needs an integer or text column or expression")
        }
        _ => Ok(()),
    }
}

/// The identifiers an SQL expression names, outside string literals: quoted ones exactly,
/// unquoted ones folded to lower case, as Postgres folds them. `None` when it reads the whole
/// row (`t.*`, or the row `t` itself), so that every column must be watched.
fn identifiers(sql: &str) -> Option<HashSet<String>> {
    let mut out = HashSet::new();
    let chars: Vec<char> = sql.chars().collect();
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        if c == '\'' {
            i += 1;
            while i < chars.len() {
                if chars[i] == '\'' && chars.get(i + 1) == Some(&'\'') {
                    i += 2;
                } else if chars[i] == '\'' {
                    break;
                } else {
                    i += 1;
                }
            }
            i += 1;
        } else if c == '"' {
            let mut name = String::new();
            i += 1;
            while i < chars.len() {
                if chars[i] == '"' && chars.get(i + 1) == Some(&'"') {
                    name.push('"');
                    i += 2;
                } else if chars[i] == '"' {
                    break;
                } else {
                    name.push(chars[i]);
                    i += 1;
                }
            }
            i += 1;
            out.insert(name);
        } else if c.is_alphabetic() || c == '_' {
            let begin = i;
            while i < chars.len() && (chars[i].is_alphanumeric() || chars[i] == '_' || chars[i] == '$') {
                i += 1;
            }
            let word: String = chars[begin..i].iter().collect::<String>().to_lowercase();
            let next = chars[i..].iter().find(|c| !c.is_whitespace());
            if word == "t"
                && (next != Some(&'.')
                    || chars[i..].iter().collect::<String>().trim_start().starts_with(".*"))
            {
                return None;
            }
            out.insert(word);
        } else {
            i += 1;
        }
    }
    Some(out)
}

/// The partitions of the partitioned table `oid`, at every depth, as `"schema"."name"`.
pub(super) async fn partitions(client: &impl GenericClient, oid: u32) -> Result<Vec<String>, SchemaError> {
    Ok(client
        .query(
            "select pg_catalog.quote_ident(n.nspname) || '.' || pg_catalog.quote_ident(c.relname)
               from pg_catalog.pg_partition_tree($1::oid::regclass) t
               join pg_catalog.pg_class c on c.oid = t.relid
               join pg_catalog.pg_namespace n on n.oid = c.relnamespace
              where t.relid::oid <> $1::oid
              order by 1",
            &[&oid],
        )
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect())
}

impl UserTable {
    /// Looks up the configured table and columns, and checks every SQL expression and type
    /// against it; any problem is an error naming its config key.
    pub(crate) async fn resolve(
        client: &impl GenericClient,
        users: &UsersConfig,
    ) -> Result<UserTable, SchemaError> {
        let (schema, table) = users.schema_and_table();
        let shown = format!("{schema}.{table}");
        let (oid, partitioned) = relation(client, schema, table, &shown).await?;
        let partitions = if partitioned { partitions(client, oid).await? } else { Vec::new() };
        let found = Found {
            columns: columns(client, oid).await?,
            shown,
            qualified: format!("{}.{}", quote_ident(schema), quote_ident(table)),
        };
        found.column_type(&users.key, "users.key")?;
        let key = KeyType::resolve(client, oid, &users.key, &found.shown).await?;
        let sources = mapped_sources(users);
        let mut selects = Vec::with_capacity(sources.len());
        let mut synced: Vec<String> = Vec::new();
        for (key, source, kind, when) in sources {
            selects.push(found.select(client, &key, &source, kind, when, &mut synced).await?);
        }
        let inbound = found.inbound(users, &synced)?;
        Ok(UserTable {
            qualified: found.qualified,
            partitions,
            key: quote_ident(&users.key),
            key_type: key.name,
            key_eq: key.eq,
            selects,
            synced,
            inbound,
            observed: observed(users),
        })
    }
}

/// The configured table's oid and whether it is partitioned; `MissingTable` if there is none.
async fn relation(
    client: &impl GenericClient,
    schema: &str,
    table: &str,
    shown: &str,
) -> Result<(u32, bool), SchemaError> {
    let rel = client
        .query_opt(
            "select c.oid, c.relkind = 'p' from pg_catalog.pg_class c
                   join pg_catalog.pg_namespace n on n.oid = c.relnamespace
                  where n.nspname = $1 and c.relname = $2 and c.relkind in ('r', 'p')",
            &[&schema, &table],
        )
        .await?
        .ok_or_else(|| SchemaError::MissingTable(shown.to_owned()))?;
    Ok((rel.get(0), rel.get(1)))
}

/// Every column of the relation `oid` and its type, in order.
async fn columns(client: &impl GenericClient, oid: u32) -> Result<Vec<(String, String)>, SchemaError> {
    Ok(client
        .query(
            "select attname::text, pg_catalog.format_type(atttypid, atttypmod) from pg_catalog.pg_attribute
                  where attrelid = $1 and attnum > 0 and not attisdropped order by attnum",
            &[&oid],
        )
        .await?
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect())
}

/// One value the mapping reads: its config key, where it comes from, the kind of the property it
/// feeds (a scalar's), and whether it is the truth value of a tag rule without `{value}`.
type MappedSource = (String, Source, Option<ScalarKind>, bool);

/// Every value the mapping reads, in `UsersConfig::fields` order followed by the tag rules.
fn mapped_sources(users: &UsersConfig) -> Vec<MappedSource> {
    let mut sources: Vec<MappedSource> = users
        .fields()
        .into_iter()
        .map(|f| {
            let kind = match &f.field {
                Field::Scalar(s) => Some(s.kind),
                _ => None,
            };
            (f.key, f.source, kind, false)
        })
        .collect();
    for rule in &users.contact.tags.rules {
        let when = matches!(rule.tag, TagTemplate::When(_));
        sources.push((rule.key.clone(), rule.source.clone(), None, when));
    }
    sources
}

/// Adds column `name` to the watched columns, once.
fn watch(synced: &mut Vec<String>, name: &str) {
    if !synced.iter().any(|c| c == name) {
        synced.push(name.to_owned());
    }
}

/// The users table as found: its names and its columns.
struct Found {
    /// `schema.table` as configured, for messages.
    shown: String,
    /// `"schema"."table"`.
    qualified: String,
    /// Every column and its type, in order.
    columns: Vec<(String, String)>,
}

impl Found {
    /// The type of column `name`; `MissingColumn`, naming the config `key`, if there is none.
    fn column_type(&self, name: &str, key: &str) -> Result<String, SchemaError> {
        self.columns.iter().find(|(c, _)| c == name).map(|(_, t)| t.clone()).ok_or_else(|| {
            SchemaError::MissingColumn {
                table: self.shown.clone(),
                column: name.to_owned(),
                key: key.to_owned(),
            }
        })
    }

    /// The columns keap-sync writes from Keap (`[inbound]`'s and the Keap-owned properties')
    /// checked against the table: each exists, has a type its data fits, and is not read by
    /// the outbound mapping (the config refuses a column named by both; this finds one read
    /// inside an SQL expression): one owner a column (invariant 17).
    fn inbound(&self, users: &UsersConfig, synced: &[String]) -> Result<Vec<InboundColumn>, SchemaError> {
        let mut out = Vec::new();
        for (data, name) in users.inbound_columns() {
            let key = data.key();
            let bad = |message: String| SchemaError::BadMapping { key: key.to_owned(), message };
            let type_name = self.column_type(name, key)?;
            self.inbound_type_fits(&data, name, &type_name).map_err(bad)?;
            let shared = matches!(data, InboundData::Shared { .. });
            if !shared && synced.iter().any(|c| c == name) {
                return Err(bad(format!(
                    "column {name} is Keap's ({key}) but an SQL expression of the outbound mapping reads \
                     it, so Keap's writes would be sent back to Keap: a column has one owner; read \
                     another column there"
                )));
            }
            out.push(InboundColumn { data, name: name.to_owned(), quoted: quote_ident(name) });
        }
        Ok(out)
    }

    /// Whether Keap's `data` can land in column `name` of type `type_name`: the opt-out in a
    /// boolean; the time a contact was found gone in a timestamptz; a category's tag names in
    /// a text array; a Keap-owned property in a text column of no fixed length, so that whatever
    /// Keap holds is written as it is (never cut, never refused mid-batch).
    fn inbound_type_fits(&self, data: &InboundData, name: &str, type_name: &str) -> Result<(), String> {
        let table = &self.shown;
        match data {
            InboundData::EmailOptOut if type_name != "boolean" => Err(format!(
                "column {name} is {type_name}; Keap's email opt-out lands in a boolean column \
                 (`alter table {table} add column {name} boolean`)"
            )),
            InboundData::ContactGone
                if !(type_name.starts_with("timestamp") && type_name.ends_with("with time zone")) =>
            {
                Err(format!(
                    "column {name} is {type_name}; the time a contact was found gone lands in a timestamptz \
                 column (`alter table {table} add column {name} timestamptz`)"
                ))
            }
            InboundData::Tags(_) if !["text[]", "character varying[]", "citext[]"].contains(&type_name) => {
                Err(format!(
                    "column {name} is {type_name}; the names of a category's tags land in a text array \
                     column (`alter table {table} alter column {name} type text[] using \
                     array[{name}]::text[]`, or `alter table {table} add column {name} text[]`)"
                ))
            }
            InboundData::Owned { .. } | InboundData::Shared { .. }
                if !["text", "character varying", "citext"].contains(&type_name) =>
            {
                Err(format!(
                    "column {name} is {type_name}; a property Keap owns lands in a text column (text, \
                     varchar without a length or citext), so any value Keap holds fits: `alter table \
                     {table} alter column {name} type text`, or set owner = \"app\""
                ))
            }
            _ => Ok(()),
        }
    }

    /// One mapped value checked against the table (it exists, works, and has a type its
    /// property can take), as the select expression that reads it; the columns it reads are
    /// added to `synced`.
    async fn select(
        &self,
        client: &impl GenericClient,
        key: &str,
        source: &Source,
        kind: Option<ScalarKind>,
        when: bool,
        synced: &mut Vec<String>,
    ) -> Result<Selected, SchemaError> {
        let bad = |message: String| SchemaError::BadMapping { key: key.to_owned(), message };
        let (expr, type_name) = match source {
            Source::Column(c) => {
                let t = self.column_type(c, key)?;
                watch(synced, c);
                (format!("t.{}", quote_ident(c)), t)
            }
            Source::Sql(sql) => {
                let type_name = self.probe(client, sql, &bad).await?;
                self.watch_read_by(sql, synced);
                (format!("({sql})"), type_name)
            }
        };
        type_fits(kind, when, &type_name)
            .map_err(|why| bad(format!("{why}; {} is {type_name}", source.describe(key))))?;
        Ok(Selected { sql: format!("{expr}::text"), what: format!("{} ({key})", source.describe(key)) })
    }

    /// The type of the SQL expression `sql` over the table. Prepared, never run: Postgres checks
    /// names, syntax and types, and says what the expression's type is.
    async fn probe(
        &self,
        client: &impl GenericClient,
        sql: &str,
        bad: &impl Fn(String) -> SchemaError,
    ) -> Result<String, SchemaError> {
        let (qualified, shown) = (&self.qualified, &self.shown);
        let probe = format!("select ({sql}) from {qualified} t where false");
        let stmt = client.prepare(&probe).await.map_err(|e| {
            let why = e.as_db_error().map_or_else(|| e.to_string(), |d| d.message().to_owned());
            bad(format!("the SQL expression does not work on {shown}: {why}"))
        })?;
        if stmt.columns().len() != 1 {
            return Err(bad("the SQL expression must give exactly one value".into()));
        }
        Ok(stmt.columns()[0].type_().name().to_owned())
    }

    /// Adds the columns the SQL expression `sql` reads to `synced`: every column when it reads
    /// the whole row.
    fn watch_read_by(&self, sql: &str, synced: &mut Vec<String>) {
        match identifiers(sql) {
            Some(words) => {
                for (c, _) in &self.columns {
                    if words.contains(c) {
                        watch(synced, c);
                    }
                }
            }
            None => self.columns.iter().for_each(|(c, _)| watch(synced, c)),
        }
    }
}
