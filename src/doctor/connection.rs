//! The first checks: the configuration as `run` validates it, the database reached as the
//! daemon connects (which server, whether over TLS), and the users table with every mapped
//! column and expression resolved as `migrate` and the daemon resolve them.

use std::path::Path;

use tokio_postgres::error::SqlState;
use tokio_postgres::Client;

use super::{Check, Step, CONFIG, DATABASE, TABLE};
use crate::config::{Config, ConfigError, UsersConfig};
use crate::db::{self, DbError};
use crate::schema::{SchemaError, UserTable};

/// The oldest PostgreSQL keap-sync supports (`server_version_num`).
const OLDEST_SERVER: i32 = 120_000;

/// A connection as the daemon would open it, and where it goes.
pub(super) struct Connected {
    pub(super) client: Client,
    pub(super) target: db::Target,
}

/// The configuration, loaded and validated by [`Config::load`] (the file, the environment,
/// the credential's source), or why not.
pub(super) fn config(loaded: Result<Config, ConfigError>, file: Option<&Path>) -> Step<Config> {
    let source = match file {
        Some(path) => format!("{} and the environment", path.display()),
        None => "the environment and the defaults (no --config or KEAP_SYNC_CONFIG)".to_owned(),
    };
    match loaded {
        Ok(config) => {
            let detail = format!(
                "{source}: valid; {} mapped properties and {} tag rules for {}",
                config.users.fields().len(),
                config.users.contact.tags.rules.len(),
                config.users.table
            );
            Step::found(Check::ok(CONFIG, detail), config)
        }
        Err(e) => {
            let fix = match &e {
                ConfigError::Read { .. } => {
                    "check the path given with --config or KEAP_SYNC_CONFIG".to_owned()
                }
                ConfigError::Parse { .. } => "correct the file at the line and column named \
                    (keap-sync.example.toml lists every key with its default)"
                    .to_owned(),
                ConfigError::Missing(_) | ConfigError::Invalid(_) => {
                    format!("change the setting named, in {source} (keap-sync.example.toml lists every key)")
                }
            };
            Step::failed(Check::fail(CONFIG, e.to_string(), fix))
        }
    }
}

/// Connects as the daemon does and says to which server, and whether the session is
/// encrypted; a refused or failed connection says what to correct.
pub(super) async fn database(config: &Config) -> Step<Connected> {
    let target = match config
        .database()
        .map_err(|e| e.to_string())
        .and_then(|d| db::parse(d).map_err(|e| e.to_string()))
    {
        Ok(target) => target,
        Err(message) => {
            return Step::failed(Check::fail(
                DATABASE,
                message,
                "set DATABASE_URL, or `url` under [database] (postgresql://user@host:port/database, or \
                 host=… user=… dbname=…)",
            ))
        }
    };
    let client = match db::connect(&target).await {
        Ok(client) => client,
        Err(e) => return Step::failed(Check::fail(DATABASE, e.to_string(), connect_fix(&e))),
    };
    match session(&client).await {
        Ok(session) => Step::found(session.check(&target.describe()), Connected { client, target }),
        Err(e) => Step::failed(Check::fail(
            DATABASE,
            format!("connected to {}, but {e}", target.describe()),
            "see the server's log for why this role cannot run a query",
        )),
    }
}

/// What to do about a connection that failed, by the server's SQLSTATE when it refused us.
fn connect_fix(e: &DbError) -> String {
    let sqlstate = match e {
        DbError::Connect { sqlstate, .. } => sqlstate.as_ref(),
        _ => None,
    };
    match sqlstate {
        Some(s) if *s == SqlState::INVALID_PASSWORD => "the password for this role is wrong: correct it in \
            DATABASE_URL or [database] url, or set the role's password as a superuser with psql's \
            `\\password ROLE`"
            .into(),
        Some(s) if *s == SqlState::INVALID_AUTHORIZATION_SPECIFICATION => "the server refused this role from \
            here: check the user name in the URL, and that pg_hba.conf has a line for this database, role and \
            address"
            .into(),
        Some(s) if *s == SqlState::INVALID_CATALOG_NAME => "no database has this name: correct the database \
            name in DATABASE_URL or [database] url"
            .into(),
        Some(_) => "correct the connection settings as the server's message says".into(),
        None => "check that PostgreSQL runs at this host and port and accepts connections from here \
            (listen_addresses, firewalls), and the host and port in DATABASE_URL or [database] url; a \
            certificate problem says what to set"
            .into(),
    }
}

/// The session as the server sees it.
struct Session {
    version: String,
    version_num: i32,
    /// The TLS version when the session is encrypted.
    tls: Option<String>,
    /// How the session comes in: `None` over a Unix socket, else whether by loopback.
    loopback: Option<bool>,
}

/// Asks the server about this session: its version, TLS, and where the session comes in.
async fn session(client: &Client) -> Result<Session, DbError> {
    let row = client
        .query_one(
            "select pg_catalog.current_setting('server_version'),
                    pg_catalog.current_setting('server_version_num')::int4,
                    (select case when s.ssl then s.version end from pg_catalog.pg_stat_ssl s
                      where s.pid = pg_catalog.pg_backend_pid()),
                    pg_catalog.inet_server_addr() <<= inet '127.0.0.0/8'
                    or pg_catalog.inet_server_addr() = inet '::1'",
            &[],
        )
        .await?;
    Ok(Session { version: row.get(0), version_num: row.get(1), tls: row.get(2), loopback: row.get(3) })
}

impl Session {
    /// The database line: met, or a warning for an old server or plain text across a network.
    fn check(&self, target: &str) -> Check {
        let transport = match (&self.tls, self.loopback) {
            (Some(v), _) => format!("TLS in use ({v})"),
            (None, None) => "over a Unix socket (no TLS needed: nothing crosses a network)".to_owned(),
            (None, Some(true)) => "over loopback without TLS (nothing crosses a network)".to_owned(),
            (None, Some(false)) => "no TLS".to_owned(),
        };
        let detail = format!("{target}: PostgreSQL {}, {transport}", self.version);
        if self.version_num < OLDEST_SERVER {
            return Check::warn(
                DATABASE,
                detail,
                "keap-sync supports PostgreSQL 12 and later: upgrade the server",
            );
        }
        if self.tls.is_none() && self.loopback == Some(false) {
            return Check::warn(
                DATABASE,
                detail,
                "the session crosses a network unencrypted: turn on ssl in the server and add \
                 sslmode=require to DATABASE_URL (with `ca_file` under [database] for a private CA)",
            );
        }
        Check::ok(DATABASE, detail)
    }
}

/// The users table, its key and every mapped column and SQL expression, resolved and
/// type-checked as `migrate` and the daemon do.
pub(super) async fn table(client: &Client, users: &UsersConfig) -> Step<UserTable> {
    match UserTable::resolve(client, users).await {
        Ok(table) => {
            let mut read = vec![users.key.clone()];
            read.extend(table.synced.iter().filter(|c| **c != users.key).cloned());
            let detail = format!(
                "{}: key {} ({}); the mapping reads {}",
                users.table,
                users.key,
                table.key_type,
                read[1..].join(", ")
            );
            Step::found(Check::ok(TABLE, detail), table)
        }
        Err(e) => {
            let fix = match &e {
                SchemaError::MissingTable(_) => {
                    "create the table, or set `table` under [users] to the application's users table"
                        .to_owned()
                }
                SchemaError::MissingColumn { key, .. } => format!("set `{key}` to a column the table has"),
                SchemaError::BadMapping { key, .. } => format!("correct `{key}` in the configuration"),
                _ => "see the server's message".to_owned(),
            };
            Step::failed(Check::fail(TABLE, e.to_string(), fix))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::doctor::Outcome;

    fn session(tls: Option<&str>, loopback: Option<bool>, version_num: i32) -> Session {
        Session { version: "16.4".into(), version_num, tls: tls.map(str::to_owned), loopback }
    }

    #[test]
    fn plain_text_is_a_warning_only_across_a_network() {
        let outcome = |s: Session| s.check("host h port 5432 database d user u").outcome;
        assert_eq!(outcome(session(Some("TLSv1.3"), Some(false), 160_004)), Outcome::Ok);
        assert_eq!(outcome(session(None, None, 160_004)), Outcome::Ok);
        assert_eq!(outcome(session(None, Some(true), 160_004)), Outcome::Ok);
        assert_eq!(outcome(session(None, Some(false), 160_004)), Outcome::Warn);
        assert_eq!(outcome(session(Some("TLSv1.3"), Some(false), 110_000)), Outcome::Warn);
    }

    #[test]
    fn a_refused_connection_says_what_to_correct() {
        let refused = |sqlstate: Option<SqlState>| {
            connect_fix(&DbError::Connect { target: "t".into(), message: "m".into(), sqlstate })
        };
        assert!(refused(Some(SqlState::INVALID_PASSWORD)).contains("password"));
        assert!(refused(Some(SqlState::INVALID_CATALOG_NAME)).contains("database name"));
        assert!(refused(Some(SqlState::INVALID_AUTHORIZATION_SPECIFICATION)).contains("pg_hba.conf"));
        assert!(refused(None).contains("host and port"));
    }
}
