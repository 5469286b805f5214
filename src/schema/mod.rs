//! The database side: versioned migrations of schema `keap_sync`, the capture trigger on the
//! application's table, and the catalog checks that turn a configured table or column name into
//! a safely quoted identifier.
//!
//! Migrations are the files in `sql/`, embedded in the binary, applied in order in one
//! transaction under an advisory lock (so two instances starting together do not race), and
//! recorded with their sha256: a file edited after it was applied is refused rather than
//! silently diverging. The capture triggers and their functions are not migrations because
//! their SQL is generated from the configuration (statement-level triggers compare the synced
//! columns directly; see `capture_triggers`); `migrate` (re)creates them when the generated SQL
//! differs from the installed one and leaves them alone otherwise.

use sha2::{Digest, Sha256};
use tokio_postgres::error::SqlState;
use tokio_postgres::{Client, GenericClient};

use std::collections::HashSet;

use crate::config::{Field, ScalarKind, Source, TagTemplate, UsersConfig};
use crate::db::{quote_ident, quote_literal, DbError};

mod key;
use key::KeyType;

/// One embedded migration file.
pub(crate) struct Migration {
    pub version: i32,
    pub name: &'static str,
    pub sql: &'static str,
}

/// Every file in `sql/` named `NNNN_*.sql`, in order. A unit test checks this list against the
/// folder, so a new file cannot be forgotten here.
pub(crate) const MIGRATIONS: &[Migration] = &[
    Migration { version: 1, name: "0001_core.sql", sql: include_str!("../../sql/0001_core.sql") },
    Migration {
        version: 2,
        name: "0002_priorities_and_failures.sql",
        sql: include_str!("../../sql/0002_priorities_and_failures.sql"),
    },
    Migration {
        version: 3,
        name: "0003_backfill_and_instances.sql",
        sql: include_str!("../../sql/0003_backfill_and_instances.sql"),
    },
    Migration {
        version: 4,
        name: "0004_key_change_keeps_contact.sql",
        sql: include_str!("../../sql/0004_key_change_keeps_contact.sql"),
    },
    Migration {
        version: 5,
        name: "0005_one_user_one_contact.sql",
        sql: include_str!("../../sql/0005_one_user_one_contact.sql"),
    },
    Migration {
        version: 6,
        name: "0006_grant_account.sql",
        sql: include_str!("../../sql/0006_grant_account.sql"),
    },
    Migration { version: 7, name: "0007_quota_usage.sql", sql: include_str!("../../sql/0007_quota_usage.sql") },
    Migration {
        version: 8,
        name: "0008_capture_truncate.sql",
        sql: include_str!("../../sql/0008_capture_truncate.sql"),
    },
    Migration {
        version: 9,
        name: "0009_queue_counts.sql",
        sql: include_str!("../../sql/0009_queue_counts.sql"),
    },
    Migration {
        version: 10,
        name: "0010_instance_sessions.sql",
        sql: include_str!("../../sql/0010_instance_sessions.sql"),
    },
    Migration { version: 11, name: "0011_change_log.sql", sql: include_str!("../../sql/0011_change_log.sql") },
    Migration {
        version: 12,
        name: "0012_create_email_guard.sql",
        sql: include_str!("../../sql/0012_create_email_guard.sql"),
    },
    Migration {
        version: 13,
        name: "0013_parks_that_clear.sql",
        sql: include_str!("../../sql/0013_parks_that_clear.sql"),
    },
    Migration {
        version: 14,
        name: "0014_held_token_answer.sql",
        sql: include_str!("../../sql/0014_held_token_answer.sql"),
    },
];

/// Name of the statement-level insert capture trigger on the users table (the name the single
/// row trigger had before, so tools that disable it for a bulk load of old users still work).
pub(crate) const TRIGGER_NAME: &str = "keap_sync_capture";
/// Name of the statement-level update capture trigger (same-key rows).
pub(crate) const UPDATE_TRIGGER_NAME: &str = "keap_sync_capture_update";
/// Name of the statement-level delete capture trigger.
pub(crate) const DELETE_TRIGGER_NAME: &str = "keap_sync_capture_delete";
/// Name of the row-level trigger that fires only when an update changes the key.
pub(crate) const KEY_TRIGGER_NAME: &str = "keap_sync_capture_key";
/// Name of the row-level trigger enabled for `replica` mode only: what a logical replication
/// apply worker writes, which fires no statement trigger.
pub(crate) const APPLY_TRIGGER_NAME: &str = "keap_sync_capture_apply";
/// Name of the statement-level `after truncate` trigger installed beside it.
pub(crate) const TRUNCATE_TRIGGER_NAME: &str = "keap_sync_capture_truncate";
/// Key of the transaction advisory lock one fold holds at a time: "keapfold" in ASCII.
const FOLD_LOCK: i64 = 0x6b65_6170_666f_6c64;
/// Key for `pg_advisory_xact_lock`: "keapsync" in ASCII, so it is recognisable in `pg_locks`.
const MIGRATION_LOCK: i64 = 0x6b65_6170_7379_6e63;

/// A problem with the database setup, phrased for the operator.
#[derive(Debug, thiserror::Error)]
pub enum SchemaError {
    /// The configured users table does not exist.
    #[error("table {0} does not exist: create it or set `table` under [users] in the config file")]
    MissingTable(String),
    /// A configured column does not exist.
    #[error("column {column} does not exist in table {table}: fix `{key}` in the config file")]
    MissingColumn {
        /// `schema.table`.
        table: String,
        /// The configured column name.
        column: String,
        /// The config key that named it (`users.email`, `contact.phone_numbers.PHONE1.number`).
        key: String,
    },
    /// A mapped column or SQL expression does not work on the users table (it does not parse,
    /// names something that does not exist, or has a type the Keap property cannot take).
    #[error("{key} in the config file: {message}")]
    BadMapping {
        /// The config key.
        key: String,
        /// What Postgres (or the type check) said, and the fix.
        message: String,
    },
    /// An applied migration differs from the one embedded in this binary.
    #[error("migration {name} was changed after it was applied (checksum {applied} in the database, {embedded} in this binary); migrations are forward-only: restore the file and add a new one")]
    ChecksumMismatch {
        /// The migration file.
        name: String,
        /// Its sha256 as recorded when applied.
        applied: String,
        /// Its sha256 in this binary.
        embedded: String,
    },
    /// The database was migrated by a newer keap-sync.
    #[error("the database has migration {0}, newer than this binary knows: upgrade keap-sync")]
    TooNew(i32),
    /// `migrate` has never run on this database.
    #[error("schema keap_sync is not installed: run `keap-sync migrate` first")]
    NotMigrated,
    /// `migrate` must run again for this binary.
    #[error("schema keap_sync is at migration {have}, this binary needs {want}: run `keap-sync migrate`")]
    Outdated {
        /// The newest migration applied.
        have: i32,
        /// The newest this binary has.
        want: i32,
    },
    /// `migrate` could not get its locks within its attempts.
    #[error("gave up after {attempts} attempts of {timeout_secs} s each: {holder}; end that transaction (or `select pg_terminate_backend(pid)`) or run `keap-sync migrate` at a quieter moment")]
    LockBusy {
        /// How many times it tried.
        attempts: u32,
        /// The lock_timeout of each attempt.
        timeout_secs: u64,
        /// Who held the lock at the last attempt.
        holder: String,
    },
    /// The database failed.
    #[error(transparent)]
    Db(#[from] DbError),
}

impl From<tokio_postgres::Error> for SchemaError {
    fn from(e: tokio_postgres::Error) -> Self {
        SchemaError::Db(DbError::Query(e))
    }
}

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
async fn partitions(client: &impl GenericClient, oid: u32) -> Result<Vec<String>, SchemaError> {
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
        let rel = client
            .query_opt(
                "select c.oid, c.relkind = 'p' from pg_catalog.pg_class c
                   join pg_catalog.pg_namespace n on n.oid = c.relnamespace
                  where n.nspname = $1 and c.relname = $2 and c.relkind in ('r', 'p')",
                &[&schema, &table],
            )
            .await?
            .ok_or_else(|| SchemaError::MissingTable(shown.clone()))?;
        let oid: u32 = rel.get(0);
        let partitioned: bool = rel.get(1);
        let partitions = if partitioned { partitions(client, oid).await? } else { Vec::new() };
        let columns: Vec<(String, String)> = client
            .query(
                "select attname::text, pg_catalog.format_type(atttypid, atttypmod) from pg_catalog.pg_attribute
                  where attrelid = $1 and attnum > 0 and not attisdropped order by attnum",
                &[&oid],
            )
            .await?
            .iter()
            .map(|r| (r.get(0), r.get(1)))
            .collect();
        let column_type = |name: &str, key: &str| {
            columns.iter().find(|(c, _)| c == name).map(|(_, t)| t.clone()).ok_or_else(|| {
                SchemaError::MissingColumn {
                    table: shown.clone(),
                    column: name.to_owned(),
                    key: key.to_owned(),
                }
            })
        };
        column_type(&users.key, "users.key")?;
        let key = KeyType::resolve(client, oid, &users.key, &shown).await?;
        let qualified = format!("{}.{}", quote_ident(schema), quote_ident(table));

        let mut sources: Vec<(String, Source, Option<ScalarKind>, bool)> = users
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
        let mut selects = Vec::with_capacity(sources.len());
        let mut synced: Vec<String> = Vec::new();
        let mut watch = |name: &str| {
            if !synced.iter().any(|c| c == name) {
                synced.push(name.to_owned());
            }
        };
        for (key, source, kind, when) in sources {
            let bad = |message: String| SchemaError::BadMapping { key: key.clone(), message };
            let (expr, type_name) = match &source {
                Source::Column(c) => {
                    let t = column_type(c, &key)?;
                    watch(c);
                    (format!("t.{}", quote_ident(c)), t)
                }
                Source::Sql(sql) => {
                    // Prepared, never run: Postgres checks names, syntax and types, and says
                    // what the expression's type is.
                    let probe = format!("select ({sql}) from {qualified} t where false");
                    let stmt = client.prepare(&probe).await.map_err(|e| {
                        let why = e.as_db_error().map_or_else(|| e.to_string(), |d| d.message().to_owned());
                        bad(format!("the SQL expression does not work on {shown}: {why}"))
                    })?;
                    if stmt.columns().len() != 1 {
                        return Err(bad("the SQL expression must give exactly one value".into()));
                    }
                    match identifiers(sql) {
                        Some(words) => {
                            for (c, _) in &columns {
                                if words.contains(c) {
                                    watch(c);
                                }
                            }
                        }
                        None => columns.iter().for_each(|(c, _)| watch(c)),
                    }
                    (format!("({sql})"), stmt.columns()[0].type_().name().to_owned())
                }
            };
            type_fits(kind, when, &type_name)
                .map_err(|why| bad(format!("{why}; {} is {type_name}", source.describe(&key))))?;
            selects.push(Selected {
                sql: format!("{expr}::text"),
                what: format!("{} ({key})", source.describe(&key)),
            });
        }
        Ok(UserTable {
            qualified,
            partitions,
            key: quote_ident(&users.key),
            key_type: key.name,
            key_eq: key.eq,
            selects,
            synced,
        })
    }
}

/// What `migrate` did, for the operator.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct MigrateReport {
    /// The migration files applied by this run, in order.
    pub applied: Vec<String>,
    /// Whether the capture trigger was (re)installed.
    pub trigger_changed: bool,
}

fn checksum(sql: &str) -> String {
    let digest = Sha256::digest(sql.as_bytes());
    digest.iter().map(|b| format!("{b:02x}")).collect()
}

/// How long one `migrate` attempt waits for a lock (`lock_timeout`). `create trigger` needs a
/// lock on the users table that conflicts with every write: queued behind a long transaction,
/// it would hold up every application write behind it for as long as that transaction lasts.
/// With the timeout, writes wait at most this long, then the attempt gives way.
pub(crate) const MIGRATE_LOCK_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);
/// How many attempts `migrate` makes before it gives up...
pub(crate) const MIGRATE_ATTEMPTS: u32 = 12;
/// ...and the pause between them, in which the writes that queued behind it go through.
const MIGRATE_PAUSE: std::time::Duration = std::time::Duration::from_secs(1);

/// Applies pending migrations and installs (or updates) the capture trigger, all in one
/// transaction under an advisory lock. Running it again changes nothing. Waiting for a lock is
/// logged (see [`migrate_reporting`]).
pub async fn migrate(client: &mut Client, users: &UsersConfig) -> Result<MigrateReport, SchemaError> {
    migrate_reporting(client, users, &mut |line| tracing::warn!("{line}")).await
}

/// [`migrate`], telling `report` what it waits for: each attempt waits at most
/// `MIGRATE_LOCK_TIMEOUT` for a lock, then rolls back, names who holds it (pid, application,
/// state, age: never the query text, which may hold user data), pauses and tries again, up to
/// `MIGRATE_ATTEMPTS` times.
pub async fn migrate_reporting(
    client: &mut Client,
    users: &UsersConfig,
    report: &mut (dyn FnMut(&str) + Send),
) -> Result<MigrateReport, SchemaError> {
    let mut attempt = 1;
    loop {
        match migrate_once(client, users).await {
            Err(SchemaError::Db(DbError::Query(e))) if e.code() == Some(&SqlState::LOCK_NOT_AVAILABLE) => {
                let holder = lock_holder(client, users).await?;
                if attempt >= MIGRATE_ATTEMPTS {
                    return Err(SchemaError::LockBusy {
                        attempts: attempt,
                        timeout_secs: MIGRATE_LOCK_TIMEOUT.as_secs(),
                        holder,
                    });
                }
                report(&format!(
                    "{holder}; gave way after {} s so application writes go on, trying again ({} of {MIGRATE_ATTEMPTS})",
                    MIGRATE_LOCK_TIMEOUT.as_secs(),
                    attempt + 1
                ));
                attempt += 1;
                tokio::time::sleep(MIGRATE_PAUSE).await;
            }
            other => return other,
        }
    }
}

/// Who holds a lock `migrate` may need: the oldest other transaction holding one on the users
/// table or in schema keap_sync.
async fn lock_holder(client: &Client, users: &UsersConfig) -> Result<String, SchemaError> {
    let (schema, table) = users.schema_and_table();
    let qualified = format!("{}.{}", quote_ident(schema), quote_ident(table));
    let row = client
        .query_opt(
            "select l.relation::regclass::text, a.pid,
                    coalesce(nullif(a.application_name, ''), a.usename::text, 'unknown'),
                    coalesce(a.state, 'unknown'),
                    coalesce(extract(epoch from now() - a.xact_start)::int8, 0)
               from pg_catalog.pg_locks l
               join pg_catalog.pg_stat_activity a on a.pid = l.pid
              where l.granted and l.locktype = 'relation' and l.pid <> pg_catalog.pg_backend_pid()
                and (l.relation = pg_catalog.to_regclass($1)
                     or l.relation in (select c.oid from pg_catalog.pg_class c
                                         join pg_catalog.pg_namespace n on n.oid = c.relnamespace
                                        where n.nspname = 'keap_sync'))
              order by a.xact_start nulls last
              limit 1",
            &[&qualified],
        )
        .await?;
    Ok(match row {
        Some(r) => {
            let (relation, pid, app, state, age): (String, i32, String, String, i64) =
                (r.get(0), r.get(1), r.get(2), r.get(3), r.get(4));
            format!("waiting for a lock on {relation} held by pid {pid} ({app}, {state}, transaction open for {age} s)")
        }
        None => "waiting for a lock held by another session (another `keap-sync migrate`?)".to_owned(),
    })
}

/// One attempt of [`migrate`], with a `lock_timeout`.
async fn migrate_once(client: &mut Client, users: &UsersConfig) -> Result<MigrateReport, SchemaError> {
    let tx = client.transaction().await?;
    tx.batch_execute(&format!("set local lock_timeout = '{}ms'", MIGRATE_LOCK_TIMEOUT.as_millis())).await?;
    // A migration step may rewrite a large table (0005 builds unique indexes): the connection's
    // statement_timeout guards the daemon's hot statements, not this one. Lock waits stay bounded.
    tx.batch_execute("set local statement_timeout = 0").await?;
    tx.execute("select pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK]).await?;
    tx.batch_execute(
        "create schema if not exists keap_sync;
         create table if not exists keap_sync.schema_migrations (
             version     integer     primary key,
             name        text        not null,
             checksum    text        not null,
             applied_at  timestamptz not null default now()
         );",
    )
    .await?;

    let applied = tx
        .query("select version, name, checksum from keap_sync.schema_migrations order by version", &[])
        .await?;
    let newest_known = MIGRATIONS.last().map_or(0, |m| m.version);
    let mut report = MigrateReport::default();
    for row in &applied {
        let version: i32 = row.get(0);
        if version > newest_known {
            return Err(SchemaError::TooNew(version));
        }
    }
    for m in MIGRATIONS {
        let sum = checksum(m.sql);
        match applied.iter().find(|r| r.get::<_, i32>(0) == m.version) {
            Some(row) => {
                let have: String = row.get(2);
                if have != sum {
                    return Err(SchemaError::ChecksumMismatch {
                        name: m.name.into(),
                        applied: have,
                        embedded: sum,
                    });
                }
            }
            None => {
                tx.batch_execute(m.sql).await?;
                tx.execute(
                    "insert into keap_sync.schema_migrations (version, name, checksum) values ($1, $2, $3)",
                    &[&m.version, &m.name, &sum],
                )
                .await?;
                report.applied.push(m.name.to_owned());
            }
        }
    }

    // Resolve inside the transaction so a missing table/column aborts the whole migration.
    let table = UserTable::resolve(&tx, users).await?;
    report.trigger_changed = install_trigger(&tx, &table).await?;
    tx.commit().await?;
    Ok(report)
}

/// A capture trigger as the catalog has it.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Installed {
    args: Vec<String>,
    /// `pg_trigger.tgenabled`: `A` always, `O` origin (the default), `R` replica, `D` disabled.
    enabled: u8,
    /// The trigger function, as `regproc` prints it (`keap_sync.capture_insert`).
    function: String,
    /// Whether it fires before the row is written (`tgtype`'s BEFORE bit).
    before: bool,
}

/// The trigger `name` on the users table, if there is one.
async fn installed(
    client: &impl GenericClient,
    relation: &str,
    name: &str,
) -> Result<Option<Installed>, SchemaError> {
    let row = client
        .query_opt(
            &format!(
                "select tgargs, tgenabled::text, tgfoid::regproc::text, (tgtype & 2) <> 0 from pg_catalog.pg_trigger where tgrelid = {}::regclass and tgname = $1",
                quote_literal(relation)
            ),
            &[&name],
        )
        .await?;
    Ok(row.map(|row| {
        let raw: Vec<u8> = row.get(0);
        let enabled: String = row.get(1);
        Installed {
            args: raw
                .split(|b| *b == 0)
                .filter(|s| !s.is_empty())
                .map(|s| String::from_utf8_lossy(s).into_owned())
                .collect(),
            enabled: enabled.bytes().next().unwrap_or(b'D'),
            function: row.get(2),
            before: row.get(3),
        }
    }))
}

/// One generated capture trigger: its name, its function (fixed names in schema keap_sync: one
/// install syncs one users table, so a name derived from the table would only make `uninstall`
/// and the checks guess it), the function's plpgsql body generated from the config, and the
/// `create trigger` text after `create trigger <name>`.
struct CaptureTrigger {
    name: &'static str,
    function: &'static str,
    body: String,
    definition: String,
    /// The function's `set` clauses (see [`capture_triggers`]).
    settings: &'static [Setting],
    /// How it must be enabled (`pg_trigger.tgenabled`): `A` always, `R` replica only.
    enabled: u8,
    /// A statement-level trigger (the others are row-level).
    per_statement: bool,
}

/// One capture trigger on one relation: the users table or one of its partitions.
struct Placement {
    /// The relation, qualified.
    relation: String,
    name: &'static str,
    function: &'static str,
    /// The `create trigger` text after `create trigger <name>`.
    definition: String,
    enabled: u8,
}

impl Placement {
    /// Whether the trigger fires before the row is written.
    fn before(&self) -> bool {
        self.definition.starts_with("before ")
    }
}

/// Every capture trigger on every relation it belongs on. On the users table: the generated
/// triggers and the truncate trigger. On each partition of a partitioned table, the statement
/// triggers and the truncate trigger again: a statement that names a partition fires that
/// partition's statement triggers, not the parent's, so without them a write or a TRUNCATE
/// straight to a partition would go unseen. (A statement on the parent fires the parent's only,
/// so nothing is logged twice.) The row triggers need no copy: PostgreSQL clones a partitioned
/// table's row triggers onto its partitions.
fn placements(table: &UserTable, triggers: &[CaptureTrigger]) -> Vec<Placement> {
    let truncate = |relation: &str| Placement {
        relation: relation.to_owned(),
        name: TRUNCATE_TRIGGER_NAME,
        function: "keap_sync.capture_truncate",
        definition: format!("after truncate on {relation} for each statement"),
        enabled: b'A',
    };
    let on = |t: &CaptureTrigger, relation: &str| Placement {
        relation: relation.to_owned(),
        name: t.name,
        function: t.function,
        definition: t.definition.replacen(
            &format!(" on {} ", table.qualified),
            &format!(" on {relation} "),
            1,
        ),
        enabled: t.enabled,
    };
    let mut out: Vec<Placement> = triggers.iter().map(|t| on(t, &table.qualified)).collect();
    out.push(truncate(&table.qualified));
    for partition in &table.partitions {
        out.extend(triggers.iter().filter(|t| t.per_statement).map(|t| on(t, partition)));
        out.push(truncate(partition));
    }
    out
}

/// A `set` clause of a generated function: `set {name} = {value}`. The catalog keeps it as
/// `name=value`, unquoted ([`FunctionDef::settings`]).
type Setting = (&'static str, &'static str);

/// Names resolve in `pg_catalog` alone, never through the caller's path.
const PINNED_PATH: Setting = ("search_path", "pg_catalog, pg_temp");

/// PL/pgSQL plans a trigger's statement once per session, with the transition tables' sizes
/// of its first call. Planned for one row, a join of the old and new tables is a nested loop,
/// and a later 20,000-row statement in the same session compares every row with every other
/// (13 s instead of 0.1 s, `tests/it/capture_shapes.rs`). Without nested loops the plan is a
/// hash or merge join, linear for any size.
const NO_NESTED_LOOP: Setting = ("enable_nestloop", "off");

/// The fold's first, batched attempt waits this long for a row lock (see [`fold_function`]).
const FOLD_LOCK_WAIT: Setting = ("lock_timeout", "'100ms'");

/// The fold function's settings.
const FOLD_SETTINGS: &[Setting] = &[PINNED_PATH, FOLD_LOCK_WAIT];

/// A generated function as the catalog has it.
#[derive(Debug, PartialEq, Eq)]
struct FunctionDef {
    /// `pg_proc.prosrc`.
    body: String,
    /// `pg_proc.proconfig`, as `name=value`.
    settings: Vec<String>,
}

impl FunctionDef {
    /// The function as `migrate` would install it.
    fn generated(body: String, settings: &[Setting]) -> FunctionDef {
        FunctionDef {
            body,
            settings: settings
                .iter()
                .map(|(name, value)| format!("{name}={}", value.trim_matches('\'')))
                .collect(),
        }
    }
}

/// The `set …` clauses of `create function`.
fn set_clauses(settings: &[Setting]) -> String {
    settings.iter().map(|(name, value)| format!("set {name} = {value}\n")).collect()
}

/// The capture triggers for `table`, generated from the configured columns.
///
/// Per statement, from transition tables. An insert, an update or a delete appends one
/// `(user_key)` row per changed user to `keap_sync.change` (no index, no conflict check: 0011
/// says why) and notifies once; [`fold_function`] moves the log into the outbox later, on the
/// daemon's side, and decides there whether the key is gone.
/// Synced columns are compared directly (`o.col is distinct from n.col`), which is why the SQL
/// is generated here and not in a migration.
///
/// A logical replication apply worker fires row triggers only, so one more row trigger, enabled
/// for `replica` mode only, logs each row a subscription inserts, updates (same key, a synced
/// column changed) or deletes. In an ordinary session it never fires; in a session that sets
/// `session_replication_role = replica` itself it logs beside the statement triggers (a change
/// logged twice is folded once).
///
/// A key change writes the outbox itself: a row-level trigger that fires only when the key
/// changes enqueues the old key as gone (taking its outbox row lock) *before* the mapping moves,
/// then the new key (invariant 13). It runs *before* the row is written: an update that moves a
/// row to another partition fires no update row trigger after it, and before it the table
/// still says whether the new key was free before this row took it. A new key that still maps
/// a user deleted before the daemon handled the deletion swaps mappings with the old key (the
/// old key's delivery then applies `on_delete` to the deleted user's contact). A key freed by
/// another row of the same statement (a shift under a deferrable key) is not free yet when
/// this row's trigger runs first, and then the mapping is not moved, as before. The update
/// statement trigger pairs the remaining rows by key.
///
/// The functions are `security definer` (application roles need no grant on keap_sync), and a
/// security definer function must not resolve a name through its caller's `search_path`, or the
/// caller could put a function, operator or type of its own in the definer's way. The update
/// and key-change functions use operators (`=`, `is distinct from`) and so pin `search_path =
/// pg_catalog, pg_temp`; the update function also plans without nested loops
/// ([`NO_NESTED_LOOP`]), and pairs old and new rows by the key's text, which needs no operator
/// of the key's type (an extension's type has its `=` outside `pg_catalog`). The insert and delete functions, the ones every insert and delete
/// runs, instead name nothing unqualified but their transition table (which the parser finds
/// before any schema) and use no operator; pinning costs each call a save, set and restore of
/// the setting and a recomputed search path for the application's own cached plans (about 2.5
/// of the trigger's 6.5 µs per statement, measured in a loop of 30,000 inserts; with `perf`,
/// the GUC save and restore and the path checks were a quarter of the trigger's samples), so
/// they do without. `tests/it/capture.rs` runs them under a hostile `search_path`.
fn capture_triggers(table: &UserTable) -> Vec<CaptureTrigger> {
    let key = &table.key;
    // The notification is an assignment, not a `perform`: PL/pgSQL evaluates an assignment's
    // lone function call directly, where `perform` starts an executor for a one-row query
    // (1.2 of the trigger's 5.9 µs per statement in a loop of 30,000 inserts). The variable
    // only receives pg_notify's void.
    let log = |select: &str| {
        format!(
            "declare
    notified pg_catalog.text;
begin
    insert into keap_sync.change (user_key)
    {select};
    if found then
        notified := pg_catalog.pg_notify('keap_sync', '');
    end if;
    return null;
end"
        )
    };
    // Whether a synced column differs between the rows `old` and `new`.
    let differ = |old: &str, new: &str| {
        let each: Vec<String> = table
            .synced
            .iter()
            .map(|c| format!("{old}.{q} is distinct from {new}.{q}", q = quote_ident(c)))
            .collect();
        if each.is_empty() {
            "false".to_owned()
        } else {
            each.join(" or ")
        }
    };
    let (changed, row_changed) = (differ("o", "n"), differ("old", "new"));
    let t = &table.qualified;
    let eq = &table.key_eq;
    vec![
        CaptureTrigger {
            name: TRIGGER_NAME,
            function: "keap_sync.capture_insert",
            body: log(&format!("select n.{key}::pg_catalog.text from keap_sync_new n where n.{key} is not null")),
            definition: format!(
                "after insert on {t} referencing new table as keap_sync_new for each statement"
            ),
            settings: &[],
            enabled: b'A',
            per_statement: true,
        },
        CaptureTrigger {
            name: UPDATE_TRIGGER_NAME,
            function: "keap_sync.capture_update",
            body: log(&format!(
                "select n.{key}::text from keap_sync_new n join keap_sync_old o on o.{key}::text = n.{key}::text
      where n.{key} is not null and ({changed})"
            )),
            definition: format!(
                "after update on {t} referencing old table as keap_sync_old new table as keap_sync_new for each statement"
            ),
            settings: &[PINNED_PATH, NO_NESTED_LOOP],
            enabled: b'A',
            per_statement: true,
        },
        CaptureTrigger {
            name: DELETE_TRIGGER_NAME,
            function: "keap_sync.capture_delete",
            body: log(&format!("select o.{key}::pg_catalog.text from keap_sync_old o where o.{key} is not null")),
            definition: format!(
                "after delete on {t} referencing old table as keap_sync_old for each statement"
            ),
            settings: &[],
            enabled: b'A',
            per_statement: true,
        },
        CaptureTrigger {
            name: KEY_TRIGGER_NAME,
            function: "keap_sync.capture_key_change",
            body: format!(
                "declare
    theirs record;
    ours record;
    had_ours boolean;
begin
    if old.{key} is not null then
        perform keap_sync.enqueue(old.{key}::text, true);
        if new.{key} is not null then
            if exists (select from keap_sync.contact_map where user_key = new.{key}::text)
               and not exists (select from {t} u where u.{key} {eq} new.{key}) then
                -- The new key still maps a user deleted before the daemon handled it. The two
                -- mappings change places: ours follows the user, and the old key, now gone,
                -- carries the deleted user's contact to its deletion (on_delete).
                -- (Separate statements: one would still see the rows it deleted as taken.)
                delete from keap_sync.contact_map where user_key = new.{key}::text
                    returning contact_id, fingerprint, synced_at, sent into theirs;
                delete from keap_sync.contact_map where user_key = old.{key}::text
                    returning contact_id, fingerprint, synced_at, sent into ours;
                had_ours := found;
                insert into keap_sync.contact_map (user_key, contact_id, fingerprint, synced_at, sent)
                values (old.{key}::text, theirs.contact_id, theirs.fingerprint, theirs.synced_at, theirs.sent);
                if had_ours then
                    insert into keap_sync.contact_map (user_key, contact_id, fingerprint, synced_at, sent)
                    values (new.{key}::text, ours.contact_id, ours.fingerprint, ours.synced_at, ours.sent);
                end if;
            else
                update keap_sync.contact_map
                   set user_key = new.{key}::text
                 where user_key = old.{key}::text
                   and not exists (select from keap_sync.contact_map where user_key = new.{key}::text);
            end if;
        end if;
    end if;
    if new.{key} is not null then
        perform keap_sync.enqueue(new.{key}::text, false);
    end if;
    return new;
end"
            ),
            definition: format!(
                "before update of {key} on {t} for each row when (old.{key} is distinct from new.{key})"
            ),
            settings: &[PINNED_PATH],
            enabled: b'A',
            per_statement: false,
        },
        CaptureTrigger {
            name: APPLY_TRIGGER_NAME,
            function: "keap_sync.capture_apply",
            body: format!(
                "declare
    notified pg_catalog.text;
begin
    if tg_op = 'INSERT' then
        if new.{key} is null then
            return null;
        end if;
        insert into keap_sync.change (user_key) values (new.{key}::pg_catalog.text);
    elsif tg_op = 'DELETE' then
        if old.{key} is null then
            return null;
        end if;
        insert into keap_sync.change (user_key) values (old.{key}::pg_catalog.text);
    elsif new.{key} is null or old.{key}::pg_catalog.text <> new.{key}::pg_catalog.text
          or old.{key} is null or not ({row_changed}) then
        -- A key change is the key trigger's (it fires always); other columns are not synced.
        return null;
    else
        insert into keap_sync.change (user_key) values (new.{key}::pg_catalog.text);
    end if;
    notified := pg_catalog.pg_notify('keap_sync', '');
    return null;
end"
            ),
            definition: format!("after insert or update or delete on {t} for each row"),
            settings: &[PINNED_PATH],
            enabled: b'R',
            per_statement: false,
        },
    ]
}

/// Name of the generated function that folds the change log into the outbox.
pub(crate) const FOLD_FUNCTION: &str = "keap_sync.fold_changes";

/// The body of `keap_sync.fold_changes(p_limit integer, out taken integer, out held integer)`:
/// moves up to `p_limit` changes from `keap_sync.change` into the outbox, one upsert per user,
/// and says how many changes it `taken` and for how many users it `held` them back. Run by the
/// daemon with its own privileges (select on the key column, its own tables).
///
/// Each user taken becomes what the capture trigger's upsert was before 0011: a new version,
/// `priority` 0, a parked row unparked, `changed_at` the newest change's time. Log rows another
/// fold holds are skipped, and outbox rows are written in key order (no deadlock cycle).
///
/// `key_gone` is whether the key is absent from the users table *in this statement's snapshot*.
/// That is the truth unless someone wrote the outbox row after the snapshot was taken: a key
/// change that committed while this statement waited for the row's lock. Its `key_gone` is newer
/// than our snapshot, so it is kept. The test: the version the statement sees in its snapshot
/// (the subquery) differs from the locked row's (`o`, the newest). Another fold is not such a
/// writer (its snapshot may be older than ours), so folds take turns under a transaction
/// advisory lock ([`FOLD_LOCK`]; they overlap only in a fail-over), and each statement after
/// the lock sees what the previous fold wrote.
///
/// Only a key change (and a truncate) writes the outbox from an application's transaction now;
/// one left open holds that user's outbox row, and a fold that waited for it would stop every
/// capture from reaching the outbox. So the one-statement fold waits at most `lock_timeout`
/// (100 ms); then the function locks the visible outbox rows of the users it took, `skip
/// locked`: the ones an open transaction holds are found without waiting, and their changes
/// stay in the log (`held`) for the next fold, however many there are, while the others are
/// folded in one statement again. Only a row no snapshot can see yet (a key change inserting
/// its new key's outbox row) is found by waiting: then the fold goes user by user, each in a
/// subtransaction waiting 5 ms at most, stopping after 100 such waits. The usual fold, with no
/// row held, costs one statement, as before (`cargo bench --bench perf -- --profile DIR`).
fn fold_function(table: &UserTable) -> String {
    let gone = |user_key: &str| {
        format!(
            "not exists (select from {t} u where u.{key} {eq} {user_key}::{key_type})",
            t = table.qualified,
            key = table.key,
            eq = table.key_eq,
            key_type = table.key_type,
        )
    };
    let (gone_batch, gone_one) = (gone("k.user_key"), gone("one.user_key"));
    let insert = "insert into keap_sync.outbox as o (user_key, key_gone, first_changed_at, changed_at, next_attempt_at)";
    let on_conflict = "on conflict (user_key) do update
           set version         = o.version + 1,
               changed_at      = greatest(o.changed_at, excluded.changed_at),
               priority        = 0,
               key_gone        = case when o.version = (select s.version from keap_sync.outbox s
                                                         where s.user_key = excluded.user_key)
                                      then excluded.key_gone else o.key_gone end,
               next_attempt_at = case when o.parked_at is not null then now() else o.next_attempt_at end,
               attempts        = case when o.parked_at is not null then 0 else o.attempts end,
               parked_at       = null";
    // The log rows `rows` (a condition on `c`) folded in one statement, which returns from the
    // function; a lock wait past `lock_timeout` falls through to what follows it.
    let batch = |rows: &str| {
        format!(
            "    begin
        with moved as (
            delete from keap_sync.change c
             where {rows}
            returning c.user_key, c.at
        ), keys as (
            select user_key, min(at) as first_at, max(at) as last_at from moved group by user_key
        ), upserted as (
            {insert}
            select k.user_key, {gone_batch}, k.first_at, k.last_at, k.first_at
              from keys k
             order by k.user_key
            {on_conflict}
            returning 1
        )
        select count(*) into taken from moved;
        return;
    exception when lock_not_available then
        taken := 0;
    end;
"
        )
    };
    let batch_all =
        batch("c.ctid = any (array(select ctid from keap_sync.change limit p_limit for update skip locked))");
    let batch_free = batch("c.ctid = any (v_rows) and c.user_key <> all (v_held)");
    format!(
        "declare
    one record;
    v_rows tid[];
    v_keys text[];
    v_locked text[];
    v_held text[];
    v_waits integer := 0;
begin
    taken := 0;
    held := 0;
    -- One fold at a time. Two overlap only while two instances both lead (a fail-over); one
    -- that decided from an older snapshot must not write after a newer one, or a present user
    -- is left marked gone. The later fold waits (lock_timeout) for the earlier one's commit,
    -- and its next statement sees what that one wrote; if it cannot wait, the next fold runs.
    begin
        perform pg_catalog.pg_advisory_xact_lock({FOLD_LOCK});
    exception when lock_not_available then
        return;
    end;
    -- The usual case, no outbox row held: one statement, waiting at most lock_timeout.
{batch_all}    select coalesce(array_agg(c.ctid), '{{}}'), coalesce(array_agg(distinct c.user_key), '{{}}')
      into v_rows, v_keys
      from (select ctid, user_key from keap_sync.change limit p_limit for update skip locked) c;
    if cardinality(v_rows) = 0 then
        return;
    end if;
    -- Some outbox row is held. Users whose row an open transaction holds (a key change, a
    -- truncate, not yet committed): found without waiting (rows taken in key order, like every writer of the
    -- outbox), and their changes stay in the log for the next fold.
    select coalesce(array_agg(l.user_key), '{{}}') into v_locked
      from (select o.user_key from keap_sync.outbox o where o.user_key = any (v_keys)
             order by o.user_key for update skip locked) l;
    select coalesce(array_agg(o.user_key), '{{}}') into v_held
      from keap_sync.outbox o where o.user_key = any (v_keys) and o.user_key <> all (v_locked);
    held := cardinality(v_held);
{batch_free}    -- An outbox row no statement can see yet (a key change inserting its new key's row) can
    -- only be found by waiting for it: user by user, 5 ms each, and after 100 such waits the
    -- fold stops (the rest waits for the next one), so the daemon is never held up for long.
    perform set_config('lock_timeout', '5ms', true);
    for one in select c.user_key, array_agg(c.ctid) as rows, min(c.at) as first_at, max(c.at) as last_at
               from keap_sync.change c
              where c.ctid = any (v_rows) and c.user_key <> all (v_held)
              group by c.user_key
              order by c.user_key
    loop
        begin
            delete from keap_sync.change where ctid = any (one.rows);
            {insert}
            values (one.user_key, {gone_one}, one.first_at, one.last_at, one.first_at)
            {on_conflict};
            taken := taken + cardinality(one.rows);
        exception when lock_not_available then
            held := held + 1;
            v_waits := v_waits + 1;
            exit when v_waits >= 100;
        end;
    end loop;
end"
    )
}

/// Function `name` taking `args` arguments as installed, if it exists.
async fn function_def(
    client: &impl GenericClient,
    name: &str,
    args: i16,
) -> Result<Option<FunctionDef>, SchemaError> {
    let row = client
        .query_opt(
            "select p.prosrc, coalesce(p.proconfig, '{}')
               from pg_catalog.pg_proc p join pg_catalog.pg_namespace n on n.oid = p.pronamespace
              where n.nspname = 'keap_sync' and p.proname = $1 and p.pronargs = $2",
            &[&name.trim_start_matches("keap_sync."), &args],
        )
        .await?;
    Ok(row.map(|r| FunctionDef { body: r.get(0), settings: r.get(1) }))
}

/// True when every capture trigger is installed, enabled `always`, calling its function with
/// the body the config generates.
pub(crate) async fn trigger_installed(
    client: &impl GenericClient,
    table: &UserTable,
) -> Result<bool, SchemaError> {
    Ok(trigger_problem(client, table).await?.is_none())
}

/// What is wrong with the capture triggers, if anything, phrased for the operator.
async fn trigger_problem(
    client: &impl GenericClient,
    table: &UserTable,
) -> Result<Option<String>, SchemaError> {
    let triggers = capture_triggers(table);
    for t in &triggers {
        if function_def(client, t.function, 0).await?
            != Some(FunctionDef::generated(t.body.clone(), t.settings))
        {
            return Ok(Some(format!(
                "the capture function {} captures other columns than the config names: changes to users are \
                 not all recorded; run `keap-sync migrate`",
                t.function
            )));
        }
    }
    for p in placements(table, &triggers) {
        let problem = match installed(client, &p.relation, p.name).await? {
            None => "is missing",
            Some(t) if !t.args.is_empty() || t.function != p.function || t.before != p.before() => {
                "is an older kind of trigger"
            }
            Some(t) if t.enabled == b'D' => "is disabled",
            Some(t) if t.enabled != p.enabled && p.enabled == b'R' => {
                "is not `enable replica` (changes applied by logical replication are missed)"
            }
            Some(t) if t.enabled != p.enabled => {
                "is not `enable always` (changes written under session_replication_role = replica are missed)"
            }
            Some(_) => continue,
        };
        let whose = if p.relation == table.qualified {
            String::new()
        } else {
            " (a partition of the users table)".to_owned()
        };
        return Ok(Some(format!(
            "the capture trigger {} on {}{whose} {problem}: changes to users are not all recorded; run `keap-sync migrate`",
            p.name, p.relation
        )));
    }
    if function_def(client, FOLD_FUNCTION, 1).await?
        != Some(FunctionDef::generated(fold_function(table), FOLD_SETTINGS))
    {
        return Ok(Some(format!(
            "the function {FOLD_FUNCTION} is missing or was generated for another configuration: captured \
             changes of {} are not queued for delivery; run `keap-sync migrate`",
            table.qualified
        )));
    }
    Ok(None)
}

/// What is wrong with capture right now, for the daemon's periodic check (`status`,
/// `/healthz`, the log): the table or a configured column gone (renamed or dropped: then no
/// user can be read, so `blocks_reads`), or a capture trigger missing, disabled, or out of
/// step with the config. `None` when all is well.
pub(crate) async fn capture_problem(
    client: &impl GenericClient,
    users: &UsersConfig,
) -> Result<Option<CaptureProblem>, DbError> {
    let table = match UserTable::resolve(client, users).await {
        Ok(t) => t,
        Err(SchemaError::Db(e)) => return Err(e),
        Err(e) => {
            return Ok(Some(CaptureProblem {
                message: format!("capture is broken: {e} (or rename it back), then restart keap-sync"),
                blocks_reads: true,
            }))
        }
    };
    match trigger_problem(client, &table).await {
        Ok(None) => Ok(None),
        Ok(Some(message)) => {
            Ok(Some(CaptureProblem { message: format!("capture is broken: {message}"), blocks_reads: false }))
        }
        Err(SchemaError::Db(e)) => Err(e),
        Err(e) => Ok(Some(CaptureProblem { message: format!("capture is broken: {e}"), blocks_reads: true })),
    }
}

/// A broken capture, as [`capture_problem`] found it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct CaptureProblem {
    /// What is wrong and the command (or config fix) that repairs it.
    pub(crate) message: String,
    /// A configured column or the table is gone: reading users would fail.
    pub(crate) blocks_reads: bool,
}

/// Creates the capture triggers and their generated functions unless identical ones are
/// installed (replacing the row trigger of releases before 0010's), and makes them fire
/// `always`. Returns whether anything changed.
///
/// `enable always`: a trigger in the default (`origin`) mode does not fire while
/// `session_replication_role = replica`, which is how a logical replication apply worker and
/// `pg_restore --disable-triggers` write; their changes would never reach Keap.
async fn install_trigger(
    tx: &tokio_postgres::Transaction<'_>,
    table: &UserTable,
) -> Result<bool, SchemaError> {
    let mut changed = false;
    let triggers = capture_triggers(table);
    for t in &triggers {
        if function_def(tx, t.function, 0).await? != Some(FunctionDef::generated(t.body.clone(), t.settings))
        {
            tx.batch_execute(&format!(
                "create or replace function {}() returns trigger
language plpgsql
security definer
{}as {}",
                t.function,
                set_clauses(t.settings),
                quote_literal(&t.body)
            ))
            .await?;
            changed = true;
        }
    }
    for p in placements(table, &triggers) {
        changed |= place(tx, &p).await?;
    }
    let fold = fold_function(table);
    if function_def(tx, FOLD_FUNCTION, 1).await? != Some(FunctionDef::generated(fold.clone(), FOLD_SETTINGS))
    {
        tx.batch_execute(&format!(
            "create or replace function {FOLD_FUNCTION}(p_limit integer, out taken integer, out held integer)
language plpgsql
{}as {}",
            set_clauses(FOLD_SETTINGS),
            quote_literal(&fold)
        ))
        .await?;
        changed = true;
    }
    Ok(changed)
}

/// Creates trigger `p` unless it is there calling its function, and enables it as it must be.
/// Returns whether anything changed.
async fn place(tx: &tokio_postgres::Transaction<'_>, p: &Placement) -> Result<bool, SchemaError> {
    let mut changed = false;
    let enabled = match installed(tx, &p.relation, p.name).await? {
        Some(i) if i.args.is_empty() && i.function == p.function && i.before == p.before() => i.enabled,
        other => {
            if other.is_some() {
                tx.batch_execute(&format!("drop trigger {} on {}", quote_ident(p.name), p.relation)).await?;
            }
            tx.batch_execute(&format!(
                "create trigger {} {} execute function {}()",
                quote_ident(p.name),
                p.definition,
                p.function
            ))
            .await?;
            changed = true;
            b'O'
        }
    };
    if enabled != p.enabled {
        tx.batch_execute(&format!(
            "alter table {} enable {} trigger {}",
            p.relation,
            if p.enabled == b'R' { "replica" } else { "always" },
            quote_ident(p.name)
        ))
        .await?;
        changed = true;
    }
    Ok(changed)
}

/// Removes the trigger (the only object on the application's side) and, with `drop_schema`,
/// everything keap-sync stored. Safe to run when nothing is installed.
pub async fn uninstall(
    client: &mut Client,
    users: &UsersConfig,
    drop_schema: bool,
) -> Result<(), SchemaError> {
    let tx = client.transaction().await?;
    tx.execute("select pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK]).await?;
    let (schema, table) = users.schema_and_table();
    let qualified = format!("{}.{}", quote_ident(schema), quote_ident(table));
    let oid = tx
        .query_opt("select pg_catalog.to_regclass($1)::oid", &[&qualified])
        .await?
        .and_then(|r| r.get::<_, Option<u32>>(0));
    if let Some(oid) = oid {
        for partition in partitions(&tx, oid).await? {
            for name in [TRIGGER_NAME, UPDATE_TRIGGER_NAME, DELETE_TRIGGER_NAME, TRUNCATE_TRIGGER_NAME] {
                tx.batch_execute(&format!("drop trigger if exists {} on {partition}", quote_ident(name)))
                    .await?;
            }
        }
        for name in [
            TRIGGER_NAME,
            UPDATE_TRIGGER_NAME,
            DELETE_TRIGGER_NAME,
            KEY_TRIGGER_NAME,
            APPLY_TRIGGER_NAME,
            TRUNCATE_TRIGGER_NAME,
        ] {
            tx.batch_execute(&format!("drop trigger if exists {} on {qualified}", quote_ident(name))).await?;
        }
    }
    if drop_schema {
        tx.batch_execute("drop schema if exists keap_sync cascade").await?;
    }
    tx.commit().await?;
    Ok(())
}

/// Checks that every embedded migration is applied, for commands that must not run on an
/// outdated schema (the daemon checks this before it starts).
pub(crate) async fn ensure_current(client: &Client) -> Result<(), SchemaError> {
    let exists: bool = client
        .query_one("select pg_catalog.to_regclass('keap_sync.schema_migrations') is not null", &[])
        .await?
        .get(0);
    if !exists {
        return Err(SchemaError::NotMigrated);
    }
    let have: i32 = client
        .query_one("select coalesce(max(version), 0) from keap_sync.schema_migrations", &[])
        .await?
        .get(0);
    let want = MIGRATIONS.last().map_or(0, |m| m.version);
    if have < want {
        return Err(SchemaError::Outdated { have, want });
    }
    if have > want {
        return Err(SchemaError::TooNew(have));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_sql_file_is_embedded_in_order() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("sql");
        let mut files: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .filter_map(|e| e.ok())
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n.len() > 5 && n[..4].chars().all(|c| c.is_ascii_digit()) && n.ends_with(".sql"))
            .collect();
        files.sort();
        let embedded: Vec<&str> = MIGRATIONS.iter().map(|m| m.name).collect();
        assert_eq!(files, embedded);
        for (i, m) in MIGRATIONS.iter().enumerate() {
            assert_eq!(m.version as usize, i + 1);
            assert!(m.name.starts_with(&format!("{:04}_", m.version)));
        }
    }
}
