//! The database side: versioned migrations of schema `keap_sync`, the capture trigger on the
//! application's table, and the catalog checks that turn a configured table or column name into
//! a safely quoted identifier.
//!
//! Migrations are the files in `sql/`, embedded in the binary, applied in order in one
//! transaction under an advisory lock (so two instances starting together do not race), and
//! recorded with their sha256: a file edited after it was applied is refused rather than
//! silently diverging. The trigger is not a migration because its arguments come from the
//! configuration; `migrate` (re)creates it when the configured columns differ from the installed
//! ones and leaves it alone otherwise.

use sha2::{Digest, Sha256};
use tokio_postgres::{Client, GenericClient};

use crate::config::UsersConfig;
use crate::db::{quote_ident, quote_literal, DbError};

/// One embedded migration file.
pub(crate) struct Migration {
    pub version: i32,
    pub name: &'static str,
    pub sql: &'static str,
}

/// Every file in `sql/` named `NNNN_*.sql`, in order. A unit test checks this list against the
/// folder, so a new file cannot be forgotten here.
pub(crate) const MIGRATIONS: &[Migration] = &[
    Migration { version: 1, name: "0001_core.sql", sql: include_str!("../sql/0001_core.sql") },
    Migration {
        version: 2,
        name: "0002_priorities_and_failures.sql",
        sql: include_str!("../sql/0002_priorities_and_failures.sql"),
    },
    Migration {
        version: 3,
        name: "0003_backfill_and_instances.sql",
        sql: include_str!("../sql/0003_backfill_and_instances.sql"),
    },
    Migration {
        version: 4,
        name: "0004_key_change_keeps_contact.sql",
        sql: include_str!("../sql/0004_key_change_keeps_contact.sql"),
    },
    Migration {
        version: 5,
        name: "0005_one_user_one_contact.sql",
        sql: include_str!("../sql/0005_one_user_one_contact.sql"),
    },
    Migration {
        version: 6,
        name: "0006_grant_account.sql",
        sql: include_str!("../sql/0006_grant_account.sql"),
    },
    Migration {
        version: 7,
        name: "0007_queue_counts.sql",
        sql: include_str!("../sql/0007_queue_counts.sql"),
    },
];

/// Name of the row trigger installed on the users table.
pub(crate) const TRIGGER_NAME: &str = "keap_sync_capture";
/// Key for `pg_advisory_xact_lock`: "keapsync" in ASCII, so it is recognisable in `pg_locks`.
const MIGRATION_LOCK: i64 = 0x6b65_6170_7379_6e63;

/// A problem with the database setup, phrased for the operator.
#[derive(Debug, thiserror::Error)]
pub enum SchemaError {
    /// The configured users table does not exist.
    #[error("table {0} does not exist: create it or set `table` under [users] in the config file")]
    MissingTable(String),
    /// A configured column does not exist.
    #[error("column {column} does not exist in table {table}: fix `{key}` under [users] in the config file")]
    MissingColumn {
        /// `schema.table`.
        table: String,
        /// The configured column name.
        column: String,
        /// The config key that named it.
        key: &'static str,
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
    /// Quoted key column.
    pub key: String,
    /// The key column's type as `format_type` prints it, for casting the text key back.
    pub key_type: String,
    pub email: String,
    pub given_name: Option<String>,
    pub family_name: Option<String>,
    /// Unquoted synced column names, in trigger-argument order.
    pub synced: Vec<String>,
    /// Unquoted key column name.
    pub key_name: String,
}

impl UserTable {
    /// Looks up the configured table and columns; any missing one is an error naming it.
    pub(crate) async fn resolve(
        client: &impl GenericClient,
        users: &UsersConfig,
    ) -> Result<UserTable, SchemaError> {
        let (schema, table) = users.schema_and_table();
        let shown = format!("{schema}.{table}");
        let rel = client
            .query_opt(
                "select c.oid from pg_catalog.pg_class c
                   join pg_catalog.pg_namespace n on n.oid = c.relnamespace
                  where n.nspname = $1 and c.relname = $2 and c.relkind in ('r', 'p')",
                &[&schema, &table],
            )
            .await?
            .ok_or_else(|| SchemaError::MissingTable(shown.clone()))?;
        let oid: u32 = rel.get(0);

        let column_type = |name: String, key: &'static str| {
            let shown = shown.clone();
            async move {
                let row = client
                    .query_opt(
                        "select pg_catalog.format_type(atttypid, atttypmod) from pg_catalog.pg_attribute
                          where attrelid = $1 and attname = $2 and attnum > 0 and not attisdropped",
                        &[&oid, &name],
                    )
                    .await?;
                match row {
                    Some(row) => Ok::<String, SchemaError>(row.get(0)),
                    None => Err(SchemaError::MissingColumn { table: shown, column: name, key }),
                }
            }
        };
        let key_type = column_type(users.key.clone(), "key").await?;
        column_type(users.email.clone(), "email").await?;
        if let Some(c) = &users.given_name {
            column_type(c.clone(), "given_name").await?;
        }
        if let Some(c) = &users.family_name {
            column_type(c.clone(), "family_name").await?;
        }

        Ok(UserTable {
            qualified: format!("{}.{}", quote_ident(schema), quote_ident(table)),
            key: quote_ident(&users.key),
            key_type,
            email: quote_ident(&users.email),
            given_name: users.given_name.as_deref().map(quote_ident),
            family_name: users.family_name.as_deref().map(quote_ident),
            synced: users.synced_columns().into_iter().map(str::to_owned).collect(),
            key_name: users.key.clone(),
        })
    }

    /// The trigger arguments: key column, then synced columns.
    fn trigger_args(&self) -> Vec<String> {
        std::iter::once(self.key_name.clone()).chain(self.synced.iter().cloned()).collect()
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

/// Applies pending migrations and installs (or updates) the capture trigger, all in one
/// transaction under an advisory lock. Running it again changes nothing.
pub async fn migrate(client: &mut Client, users: &UsersConfig) -> Result<MigrateReport, SchemaError> {
    let tx = client.transaction().await?;
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

/// The arguments of the installed capture trigger, if there is one.
async fn installed_args(
    client: &impl GenericClient,
    table: &UserTable,
) -> Result<Option<Vec<String>>, SchemaError> {
    let row = client
        .query_opt(
            &format!(
                "select tgargs from pg_catalog.pg_trigger where tgrelid = {}::regclass and tgname = $1",
                quote_literal(&table.qualified)
            ),
            &[&TRIGGER_NAME],
        )
        .await?;
    Ok(row.map(|row| {
        let raw: Vec<u8> = row.get(0);
        raw.split(|b| *b == 0)
            .filter(|s| !s.is_empty())
            .map(|s| String::from_utf8_lossy(s).into_owned())
            .collect()
    }))
}

/// True when the capture trigger is installed with exactly the configured columns.
pub(crate) async fn trigger_installed(
    client: &impl GenericClient,
    table: &UserTable,
) -> Result<bool, SchemaError> {
    Ok(installed_args(client, table).await?.as_ref() == Some(&table.trigger_args()))
}

/// Creates the trigger unless an identical one is installed. Returns whether it changed.
async fn install_trigger(
    tx: &tokio_postgres::Transaction<'_>,
    table: &UserTable,
) -> Result<bool, SchemaError> {
    let want = table.trigger_args();
    match installed_args(tx, table).await? {
        Some(have) if have == want => return Ok(false),
        Some(_) => {
            tx.batch_execute(&format!("drop trigger {} on {}", quote_ident(TRIGGER_NAME), table.qualified))
                .await?
        }
        None => {}
    }
    let args: Vec<String> = want.iter().map(|a| quote_literal(a)).collect();
    tx.batch_execute(&format!(
        "create trigger {} after insert or update or delete on {} for each row execute function keap_sync.capture({})",
        quote_ident(TRIGGER_NAME),
        table.qualified,
        args.join(", ")
    ))
    .await?;
    Ok(true)
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
    let exists = tx
        .query_opt("select pg_catalog.to_regclass($1)::oid", &[&qualified])
        .await?
        .and_then(|r| r.get::<_, Option<u32>>(0))
        .is_some();
    if exists {
        tx.batch_execute(&format!("drop trigger if exists {} on {qualified}", quote_ident(TRIGGER_NAME)))
            .await?;
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
