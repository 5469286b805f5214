//! `[database]`: the connection URL and the session's timeouts.

use std::time::Duration;

use serde::Deserialize;

use super::values::secs;
use super::{ConfigError, Secret};

/// Where the daemon finds Postgres.
#[derive(Debug, Clone)]
pub struct DatabaseConfig {
    /// libpq-style URL or `key=value` string; may hold a password, so it is a [`Secret`] and
    /// only its host, port, database and user are ever printed.
    pub url: Secret,
    /// How long a connection attempt may take.
    pub connect_timeout: Duration,
    /// Server-side limit on any one statement (`statement_timeout`): a stuck statement costs
    /// that statement, not the session.
    pub statement_timeout: Duration,
    /// Server-side limit on waiting for a row or table lock (`lock_timeout`): an app
    /// transaction holding a user's row holds up that user's delivery, not everyone's.
    pub lock_timeout: Duration,
    /// `idle_in_transaction_session_timeout`: a transaction of ours left open (a bug, a stalled
    /// task) never holds its locks for longer.
    pub idle_in_transaction_timeout: Duration,
    /// TCP keepalive idle time: a connection silently cut by a firewall or failover is noticed
    /// within about this plus a few probes, instead of the kernel's two hours.
    pub keepalive_idle: Duration,
}

#[derive(Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(super) struct FileDatabase {
    /// Or `DATABASE_URL`; commands that need the database refuse to start without one.
    pub(super) url: Option<String>,
    pub(super) connect_timeout_secs: u64,
    pub(super) statement_timeout_secs: u64,
    pub(super) lock_timeout_secs: u64,
    pub(super) idle_in_transaction_timeout_secs: u64,
    pub(super) keepalive_idle_secs: u64,
}

impl Default for FileDatabase {
    fn default() -> Self {
        FileDatabase {
            url: None,
            connect_timeout_secs: 10,
            statement_timeout_secs: 30,
            lock_timeout_secs: 5,
            idle_in_transaction_timeout_secs: 60,
            keepalive_idle_secs: 30,
        }
    }
}

impl FileDatabase {
    /// `[database]` checked, or `None` without a URL; the lock timeout must be below the statement timeout.
    pub(super) fn validate(self) -> Result<Option<DatabaseConfig>, ConfigError> {
        let Some(url) = self.url else { return Ok(None) };
        let statement_timeout = secs("database.statement_timeout_secs", self.statement_timeout_secs)?;
        let lock_timeout = secs("database.lock_timeout_secs", self.lock_timeout_secs)?;
        if lock_timeout >= statement_timeout {
            // Otherwise a lock wait always ends as a statement timeout, and the retry cannot
            // tell a locked row from a slow statement.
            return Err(ConfigError::Invalid(format!(
                "database.lock_timeout_secs ({}) must be less than database.statement_timeout_secs ({})",
                self.lock_timeout_secs, self.statement_timeout_secs
            )));
        }
        Ok(Some(DatabaseConfig {
            url: Secret::new(url),
            connect_timeout: secs("database.connect_timeout_secs", self.connect_timeout_secs)?,
            statement_timeout,
            lock_timeout,
            idle_in_transaction_timeout: secs(
                "database.idle_in_transaction_timeout_secs",
                self.idle_in_transaction_timeout_secs,
            )?,
            keepalive_idle: secs("database.keepalive_idle_secs", self.keepalive_idle_secs)?,
        }))
    }
}
