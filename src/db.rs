//! Postgres connections: TLS when the server offers it (or `sslmode=require` demands it), with
//! the server's certificate verified against the system's CAs and those of `ca_file`; a
//! connect timeout; and a driver task per connection.
//!
//! tokio-postgres splits a connection into a `Client` (cheap to share; queries from many tasks
//! are pipelined over the one socket) and a `Connection` that must be polled to make progress.
//! [`connect`] spawns the `Connection`; [`connect_listener`] polls it by hand instead, because
//! that is the only way to receive `NOTIFY` messages.

use std::sync::Arc;
use std::time::Duration;

use futures_util::future::poll_fn;
use tokio::sync::{mpsc, Notify};
use tokio_postgres::error::SqlState;
use tokio_postgres::types::ToSql;
use tokio_postgres::{AsyncMessage, Client, Config as PgConfig, Row, Statement};
use tokio_postgres_rustls::MakeRustlsConnect;

use crate::config::DatabaseConfig;

/// The channel the capture trigger `NOTIFY`s and the daemon `LISTEN`s on. It lives here, in the
/// lowest layer that speaks SQL, because the migrations in `sql/` spell the same name and every
/// layer above (backfill, failures, auth import) wakes the daemon through it; a test checks that
/// `sql/` agrees.
pub(crate) const NOTIFY_CHANNEL: &str = "keap_sync";

/// Session-level advisory lock held by the delivering instance ("keapdlvr"). It lives here
/// because besides the daemon, which holds it while it delivers, switching the grant to another
/// Keap app (`auth import --switch-account`, in `token`) takes it to be sure no delivery runs.
pub(crate) const DELIVERY_LOCK: i64 = 0x6b65_6170_646c_7672;

/// Wakes every listening daemon (a notification is a wake-up only, never data: ARCHITECTURE.md,
/// invariant 1).
pub(crate) async fn wake_daemons(client: &Client) -> Result<(), DbError> {
    client.execute("select pg_notify($1, '')", &[&NOTIFY_CHANNEL]).await?;
    Ok(())
}

/// A database problem, classified so callers can tell "try again later" from "fix the setup".
#[derive(Debug, thiserror::Error)]
pub enum DbError {
    /// The URL does not parse (the message never quotes it: it may hold a password).
    #[error("invalid database URL ({0}): check DATABASE_URL or [database] url")]
    BadUrl(String),
    /// The server could not be reached, or the connection ended.
    #[error("cannot connect to the database ({target}): {message}")]
    Connect {
        /// Host, port, database and user: never the password.
        target: String,
        /// Why.
        message: String,
        /// The server's SQLSTATE when the server refused the session (`28P01`: wrong password,
        /// `3D000`: no such database), so a caller can say what to fix without reading the
        /// message, which the server may send in another language.
        sqlstate: Option<SqlState>,
    },
    /// A statement failed.
    #[error("database error: {0}")]
    Query(#[from] tokio_postgres::Error),
    /// A delivery's result went to the session's recorder of results, which ended before
    /// answering (only a bug can make it): whether the result was recorded is unknown, and the
    /// change is delivered again when its lease ends (every call is safe to repeat).
    #[error("the result was not recorded: the session's recorder of results stopped before answering")]
    Unrecorded,
    /// A column of keap-sync's own schema holds a value this version does not know: the schema
    /// is newer than the binary, or was edited by hand.
    #[error("{column} holds {value:?}, which this version of keap-sync does not know: run the newest `keap-sync migrate`, or repair the row")]
    UnknownValue {
        /// `schema.table.column`.
        column: &'static str,
        /// The text found there.
        value: String,
    },
}

impl DbError {
    /// The error for a value of ours in `column` this version does not know.
    pub(crate) fn unknown_value(column: &'static str, value: &str) -> DbError {
        DbError::UnknownValue { column, value: value.to_owned() }
    }

    /// The server's code and message ("55P03: canceling statement due to lock timeout"), which
    /// the driver's `Display` leaves out ("db error"); empty when the server did not answer.
    pub(crate) fn server_message(&self) -> String {
        match self {
            DbError::Query(q) => {
                q.as_db_error().map(|d| format!("{}: {}", d.code().code(), d.message())).unwrap_or_default()
            }
            _ => String::new(),
        }
    }

    /// True when the connection is gone (as opposed to a bad statement), so the caller should
    /// reconnect rather than give up.
    pub fn is_connection_lost(&self) -> bool {
        match self {
            DbError::Connect { .. } => true,
            DbError::Query(e) => {
                e.is_closed() || std::error::Error::source(e).is_some_and(|s| s.is::<std::io::Error>())
            }
            DbError::BadUrl(_) | DbError::UnknownValue { .. } | DbError::Unrecorded => false,
        }
    }
}

/// Where and how to connect: the parsed URL with keap-sync's session settings, and the TLS
/// connector for `[database] ca_file` (built once per distinct CA; a clone shares it).
#[derive(Clone)]
pub(crate) struct Target {
    pg: PgConfig,
    tls: MakeRustlsConnect,
    /// `ca_file`, for the message when the server's certificate is not trusted.
    ca_file: Option<std::path::PathBuf>,
}

impl Target {
    /// "host H port P database D user U" ([`describe`]).
    pub(crate) fn describe(&self) -> String {
        describe(&self.pg)
    }

    /// A connect that failed, as the operator should read it: tokio-postgres' own message
    /// stops at its kind ("error performing TLS handshake", "db error"), so the causes are
    /// added, and a certificate the client refused says what to do about it.
    fn connect_failed(&self, error: &tokio_postgres::Error) -> DbError {
        let mut message = error.to_string();
        let mut cause = std::error::Error::source(error);
        while let Some(e) = cause {
            // One line: a server's message puts its DETAIL and HINT on lines of their own.
            message.push_str(": ");
            message.push_str(&e.to_string().lines().collect::<Vec<_>>().join("; "));
            cause = e.source();
        }
        if let Some(advice) = rustls_error(error).and_then(|e| self.certificate_advice(e)) {
            message = format!("{advice} ({message})");
        }
        DbError::Connect { target: self.describe(), message, sqlstate: error.code().cloned() }
    }

    /// What to do about a server certificate this client refused; `None` for other TLS errors.
    fn certificate_advice(&self, error: &rustls::Error) -> Option<String> {
        use rustls::CertificateError as C;
        let rustls::Error::InvalidCertificate(why) = error else { return None };
        Some(match why {
            C::UnknownIssuer | C::BadSignature => match &self.ca_file {
                None => "the server's TLS certificate is not trusted: it is not signed by a CA this \
                         system trusts; set `ca_file` under [database] to the PEM file of the CA \
                         that signed it"
                    .to_owned(),
                Some(path) => format!(
                    "the server's TLS certificate is not trusted: it is signed neither by a CA in \
                     `ca_file` ({}) nor by one this system trusts; put the CA that signed it in that \
                     file",
                    path.display()
                ),
            },
            C::NotValidForName | C::NotValidForNameContext { .. } => {
                "the server's TLS certificate does not name the host connected to: use a host name \
                 or address the certificate lists in the database URL"
                    .to_owned()
            }
            C::Expired | C::ExpiredContext { .. } | C::NotValidYet | C::NotValidYetContext { .. } => {
                "the server's TLS certificate is expired or not yet valid (check the server's \
                 certificate and this machine's clock)"
                    .to_owned()
            }
            _ => "the server's TLS certificate is not trusted".to_owned(),
        })
    }
}

/// The rustls error under a failed connect, if TLS is what failed. tokio-rustls hands it over
/// inside an `io::Error`, whose `source` skips it, so each link is also looked into.
fn rustls_error(error: &tokio_postgres::Error) -> Option<&rustls::Error> {
    let mut cause = std::error::Error::source(error);
    while let Some(e) = cause {
        if let Some(found) = e.downcast_ref::<rustls::Error>() {
            return Some(found);
        }
        let inner = e.downcast_ref::<std::io::Error>().and_then(std::io::Error::get_ref);
        if let Some(found) = inner.and_then(|inner| inner.downcast_ref::<rustls::Error>()) {
            return Some(found);
        }
        cause = e.source();
    }
    None
}

impl std::fmt::Debug for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the URL: it may hold a password.
        f.debug_struct("Target").field("target", &self.describe()).field("ca_file", &self.ca_file).finish()
    }
}

/// Parses the configured URL (either a `postgresql://` URL or a `key=value` string) and picks
/// the TLS connector for its `ca_file`.
pub(crate) fn parse(db: &DatabaseConfig) -> Result<Target, DbError> {
    Ok(Target {
        pg: parse_url(db)?,
        tls: crate::tls::postgres(db.ca_file.as_ref()),
        ca_file: db.ca_file.as_ref().map(|ca| ca.path().to_owned()),
    })
}

/// The configured URL with keap-sync's connect timeout, application name, keepalives and
/// session settings.
fn parse_url(db: &DatabaseConfig) -> Result<PgConfig, DbError> {
    let mut cfg: PgConfig = db
        .url
        .expose()
        .parse()
        .map_err(|e: tokio_postgres::Error| DbError::BadUrl(redact_password(&e.to_string())))?;
    if cfg.get_connect_timeout().is_none() {
        cfg.connect_timeout(db.connect_timeout);
    }
    if cfg.get_application_name().is_none() {
        cfg.application_name("keap-sync");
    }
    // A cut connection (failover, a firewall dropping idle flows) is noticed within about
    // idle + 3 × 10 s instead of the kernel's two hours, and the session reconnects.
    cfg.keepalives(true)
        .keepalives_idle(db.keepalive_idle)
        .keepalives_interval(Duration::from_secs(10))
        .keepalives_retries(3);
    let ours = session_options(db);
    // Options already in the URL come last, so an operator's explicit `-c` setting wins.
    let options = match cfg.get_options() {
        Some(theirs) if !theirs.trim().is_empty() => format!("{ours} {theirs}"),
        _ => ours,
    };
    cfg.options(options);
    Ok(cfg)
}

/// The server settings every connection starts with (libpq's `options`): a stuck statement,
/// a row an app transaction holds, or a transaction of ours left open costs one statement,
/// never the session (ARCHITECTURE.md, "Where concurrency lives"). Milliseconds, the unit
/// these settings take without a suffix on every supported server (PostgreSQL 12 and later).
fn session_options(db: &DatabaseConfig) -> String {
    let ms = |d: Duration| d.as_millis();
    format!(
        "-c statement_timeout={} -c lock_timeout={} -c idle_in_transaction_session_timeout={}",
        ms(db.statement_timeout),
        ms(db.lock_timeout),
        ms(db.idle_in_transaction_timeout)
    )
}

/// The hosts of `cfg` as written: a name, an address or a Unix socket's directory.
pub(crate) fn host_names(cfg: &PgConfig) -> Vec<String> {
    cfg.get_hosts()
        .iter()
        .map(|h| match h {
            tokio_postgres::config::Host::Tcp(name) => name.clone(),
            tokio_postgres::config::Host::Unix(path) => path.display().to_string(),
        })
        .collect()
}

/// "host H port P database D user U": what to print instead of the URL, which may hold a password.
pub(crate) fn describe(cfg: &PgConfig) -> String {
    let hosts = host_names(cfg);
    let port = cfg.get_ports().first().copied().unwrap_or(5432);
    format!(
        "host {} port {} database {} user {}",
        if hosts.is_empty() { "localhost".into() } else { hosts.join(",") },
        port,
        cfg.get_dbname().unwrap_or("(default)"),
        cfg.get_user().unwrap_or("(default)")
    )
}

/// A URL parse error's message, or a generic one if it mentions a password, so no password is logged.
fn redact_password(message: &str) -> String {
    // tokio-postgres' parse errors do not echo the input, but be safe if that ever changes.
    if message.contains("password") {
        "the URL could not be parsed".into()
    } else {
        message.to_owned()
    }
}

/// Opens a connection whose driver runs in a spawned task. The returned `Client` fails with a
/// "closed" error once the connection is lost.
pub(crate) async fn connect(target: &Target) -> Result<Client, DbError> {
    let (client, connection) =
        target.pg.connect(target.tls.clone()).await.map_err(|e| target.connect_failed(&e))?;
    #[allow(
        clippy::disallowed_methods,
        reason = "the connection's driver: it ends with its Client, which the caller owns"
    )]
    tokio::spawn(async move {
        if let Err(e) = connection.await {
            tracing::debug!(error = %e, "database connection ended");
        }
    });
    client.batch_execute(NO_IDLE_SESSION_TIMEOUT).await?;
    Ok(client)
}

/// Turns `idle_session_timeout` (PostgreSQL 14 and later) off for this session. An operator may
/// set it for the database or the role to end forgotten sessions, but the daemon's connections
/// are idle by design: the one that LISTENs holds the delivery lock, and ending it restarted the
/// session and moved the lock to a standby, over and over. Not a startup option like the
/// others ([`session_options`]): a server before 14 refuses a setting it does not know.
const NO_IDLE_SESSION_TIMEOUT: &str = "select pg_catalog.set_config('idle_session_timeout', '0', false)
  where pg_catalog.current_setting('server_version_num')::integer >= 140000";

/// A session's connection with its prepared statements: each statement the delivery path runs
/// is parsed and planned once per connection (`Client::prepare`) and then only bound and
/// executed, one round trip instead of two and no parse or plan on the server. Derefs to the
/// [`Client`] for everything else.
pub(crate) struct Db {
    client: Client,
    /// By SQL text. A std mutex: held for a lookup or an insert, never across an await.
    prepared: std::sync::Mutex<std::collections::HashMap<String, Statement>>,
}

impl Db {
    /// A session's connection with no statement prepared yet.
    pub(crate) fn new(client: Client) -> Db {
        Db { client, prepared: std::sync::Mutex::default() }
    }

    /// `sql` prepared on this connection (once; then from the cache).
    async fn statement(&self, sql: &str) -> Result<Statement, tokio_postgres::Error> {
        if let Some(s) = self.cache().get(sql) {
            return Ok(s.clone());
        }
        let statement = self.client.prepare(sql).await?;
        self.cache().insert(sql.to_owned(), statement.clone());
        Ok(statement)
    }

    /// The prepared statements; a panic while they were held does not lock out the rest (a poisoned
    /// lock is taken anyway).
    fn cache(&self) -> std::sync::MutexGuard<'_, std::collections::HashMap<String, Statement>> {
        self.prepared.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// A prepared statement the server no longer has, or whose result type a schema change
    /// altered, is dropped from the cache, so the next try prepares it again.
    fn forget_if_stale(&self, sql: &str, e: &tokio_postgres::Error) {
        if e.code() == Some(&SqlState::INVALID_SQL_STATEMENT_NAME)
            || e.code() == Some(&SqlState::FEATURE_NOT_SUPPORTED)
        {
            self.cache().remove(sql);
        }
    }

    /// [`Client::query`] with the statement prepared once per connection.
    pub(crate) async fn cached_query(
        &self,
        sql: &str,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<Vec<Row>, tokio_postgres::Error> {
        let statement = self.statement(sql).await?;
        let result = self.client.query(&statement, params).await;
        if let Err(e) = &result {
            self.forget_if_stale(sql, e);
        }
        result
    }

    /// [`Client::query_one`], prepared once per connection.
    pub(crate) async fn cached_query_one(
        &self,
        sql: &str,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<Row, tokio_postgres::Error> {
        let statement = self.statement(sql).await?;
        let result = self.client.query_one(&statement, params).await;
        if let Err(e) = &result {
            self.forget_if_stale(sql, e);
        }
        result
    }

    /// [`Client::query_opt`], prepared once per connection.
    pub(crate) async fn cached_query_opt(
        &self,
        sql: &str,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<Option<Row>, tokio_postgres::Error> {
        let statement = self.statement(sql).await?;
        let result = self.client.query_opt(&statement, params).await;
        if let Err(e) = &result {
            self.forget_if_stale(sql, e);
        }
        result
    }

    /// [`Client::execute`], prepared once per connection.
    pub(crate) async fn cached_execute(
        &self,
        sql: &str,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<u64, tokio_postgres::Error> {
        let statement = self.statement(sql).await?;
        let result = self.client.execute(&statement, params).await;
        if let Err(e) = &result {
            self.forget_if_stale(sql, e);
        }
        result
    }
}

impl std::ops::Deref for Db {
    type Target = Client;
    fn deref(&self) -> &Client {
        &self.client
    }
}

/// A connection that has run `LISTEN channel`. Every notification wakes `wake` (a permit is
/// stored if nobody is waiting, so a notification between two waits is never missed); `lost`
/// yields once when the connection ends.
pub(crate) struct Listener {
    pub client: Client,
    pub lost: mpsc::Receiver<String>,
}

/// A new connection that LISTENs on `channel`, driven by its own task, with no idle-session timeout
/// since it is idle by design.
pub(crate) async fn connect_listener(
    target: &Target,
    channel: &str,
    wake: Arc<Notify>,
) -> Result<Listener, DbError> {
    let (client, mut connection) =
        target.pg.connect(target.tls.clone()).await.map_err(|e| target.connect_failed(&e))?;
    let (lost_tx, lost) = mpsc::channel(1);
    #[allow(
        clippy::disallowed_methods,
        reason = "the LISTEN connection's driver: it ends with its Client, which the Listener owns"
    )]
    tokio::spawn(async move {
        let reason = loop {
            match poll_fn(|cx| connection.poll_message(cx)).await {
                Some(Ok(AsyncMessage::Notification(_))) => wake.notify_one(),
                Some(Ok(_)) => {}
                Some(Err(e)) => break e.to_string(),
                None => break "connection closed".to_owned(),
            }
        };
        let _ = lost_tx.send(reason).await;
    });
    client.batch_execute(&format!("listen {}; {NO_IDLE_SESSION_TIMEOUT}", quote_ident(channel))).await?;
    Ok(Listener { client, lost })
}

/// Quotes an SQL identifier (`"a""b"`). Callers validate names against the catalog first; this
/// makes odd but legal names (capitals, spaces) work and keeps injection impossible.
pub(crate) fn quote_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// Quotes an SQL string literal (`'it''s'`).
pub(crate) fn quote_literal(value: &str) -> String {
    format!("'{}'", value.replace('\'', "''"))
}

/// How long to wait before reconnect attempt `n` (1-based): 0.5 s doubling to 30 s.
pub(crate) fn reconnect_delay(attempt: u32) -> Duration {
    let ms = 500u64.saturating_mul(1u64 << attempt.saturating_sub(1).min(6));
    Duration::from_millis(ms.min(30_000))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_migrations_notify_the_channel_the_daemon_listens_on() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("sql");
        let mut notifies = 0;
        for entry in std::fs::read_dir(dir).unwrap() {
            let text = std::fs::read_to_string(entry.unwrap().path()).unwrap();
            for (at, _) in text.match_indices("pg_notify(") {
                let channel = text[at + "pg_notify(".len()..].split(',').next().unwrap().trim();
                assert_eq!(
                    channel,
                    format!("'{NOTIFY_CHANNEL}'"),
                    "a pg_notify in sql/ uses another channel"
                );
                notifies += 1;
            }
        }
        assert!(notifies > 0, "the capture trigger in sql/ sends no notification");
    }

    #[test]
    fn quoting() {
        assert_eq!(quote_ident("Users"), "\"Users\"");
        assert_eq!(quote_ident("a\"b"), "\"a\"\"b\"");
        assert_eq!(quote_literal("it's"), "'it''s'");
    }

    #[test]
    fn a_url_that_does_not_parse_is_never_echoed() {
        let bad = [
            "postgresql://app:Zq9secretPW@db:notaport/crm",
            "postgresql://app:Zq9secretPW%zz@db/crm",
            "postgresql://app@db/crm?password=Zq9secretPW&sslmode=Zq9secretPW",
            "host=db password=Zq9secretPW port=Zq9secretPW",
            "host=db password='Zq9secretPW",
            "host=db Zq9secretPW",
            "postgresql://app:Zq9secretPW@db/crm?Zq9secretPW=1",
        ];
        for url in bad {
            let message = parse_url(&database(url)).err().map(|e| e.to_string()).unwrap_or_default();
            assert!(!message.contains("Zq9secretPW"), "{url} → {message}");
        }
    }

    #[test]
    fn describe_hides_the_password() {
        let text = describe(&parse_url(&database("postgresql://app:s3cret@db.internal:6543/crm")).unwrap());
        assert_eq!(text, "host db.internal port 6543 database crm user app");
    }

    fn database(url: &str) -> DatabaseConfig {
        DatabaseConfig {
            url: crate::secret::Secret::new(url),
            connect_timeout: Duration::from_secs(1),
            statement_timeout: Duration::from_secs(30),
            lock_timeout: Duration::from_secs(5),
            idle_in_transaction_timeout: Duration::from_secs(60),
            keepalive_idle: Duration::from_secs(30),
            ca_file: None,
        }
    }

    #[test]
    fn every_connection_has_timeouts_and_keepalives() {
        let cfg = parse_url(&database("postgresql://app@db/crm")).unwrap();
        assert_eq!(
            cfg.get_options(),
            Some("-c statement_timeout=30000 -c lock_timeout=5000 -c idle_in_transaction_session_timeout=60000")
        );
        assert!(cfg.get_keepalives());
        assert_eq!(cfg.get_keepalives_idle(), Duration::from_secs(30));
        // The operator's own options come last, so they win.
        let cfg = parse_url(&database("postgresql://app@db/crm?options=-c%20lock_timeout%3D100")).unwrap();
        assert!(cfg.get_options().unwrap().ends_with("-c lock_timeout=100"), "{:?}", cfg.get_options());
    }

    #[test]
    fn reconnect_backoff_is_capped() {
        assert_eq!(reconnect_delay(1), Duration::from_millis(500));
        assert_eq!(reconnect_delay(2), Duration::from_millis(1000));
        assert_eq!(reconnect_delay(50), Duration::from_secs(30));
    }
}
