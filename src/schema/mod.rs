//! The database side: versioned migrations of schema `keap_sync` (`migrate`), the users table
//! resolved against the catalog (`table`), the capture triggers and the fold they feed, generated
//! from the configuration (`capture`, `fold`), installed (`install`) and checked (`check`).
//!
//! Migrations are the files in `sql/`, embedded in the binary, applied in order in one
//! transaction under an advisory lock (so two instances starting together do not race), and
//! recorded with their sha256: a file edited after it was applied is refused rather than
//! silently diverging. The capture triggers and their functions are not migrations because
//! their SQL is generated from the configuration (statement-level triggers compare the synced
//! columns directly; see `capture::capture_triggers`); `migrate` (re)creates them when the generated SQL
//! differs from the installed one and leaves them alone otherwise.

use crate::db::DbError;

mod capture;
mod check;
mod fold;
mod install;
mod key;
mod migrate;
mod table;

pub(crate) use check::{capture_problem, trigger_installed, trigger_problem, CaptureProblem};
pub use install::uninstall;
pub(crate) use migrate::{ensure_current, newest_migration};
pub use migrate::{migrate, migrate_reporting, MigrateReport};
pub(crate) use table::{InboundColumn, UserTable};

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
