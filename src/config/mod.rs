//! Configuration: one TOML file (`--config PATH`) plus environment overrides.
//!
//! Precedence, highest first: environment variable, config file, built-in default. Secrets are
//! never read from the TOML itself (config files get copied, committed and pasted into tickets);
//! they come from the environment, from a file named in the config (`*_file`), or from systemd's
//! `$CREDENTIALS_DIRECTORY` (`LoadCredential=`). Unknown keys are an error naming the key, so a
//! typo never silently falls back to a default, and a syntax error names the line and column but
//! never quotes the file (a `database.url` may hold a password).
//!
//! Loading is three steps. The file is parsed into its own shape (`FileConfig` and one struct
//! per section), where `#[serde(default)]` fills every key left out from the section's `Default`
//! impl — those impls, next to each section struct, are the one place the built-in defaults are
//! written (the rate limits' defaults are [`LimitsConfig::OAUTH`] and [`LimitsConfig::API_KEY`],
//! chosen by the credential). Then the environment overrides are applied and the Keap credential
//! is read. Last, `validate` checks each section and builds the public [`Config`].
//!
//! The annotated example is `keap-sync.example.toml` at the top of the repository; the README's
//! configuration reference lists the same keys. Keep the three in step (a test checks that the
//! example's values are the defaults).

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::secret::Secret;

mod contact;

pub use contact::{
    AddressPart, ContactMapping, CustomFieldRef, Empty, Field, FieldMapping, PhonePart, Scalar, ScalarKind,
    Source, TagRef, TagRule, TagTemplate, TagsConfig, ADDRESS_FIELDS, SCALARS,
};

/// Keap's production REST base; `/v1/contacts` is appended.
pub const DEFAULT_API_URL: &str = "https://api.infusionsoft.com/crm/rest";
/// Keap's OAuth token endpoint.
pub const DEFAULT_TOKEN_URL: &str = "https://api.infusionsoft.com/token";

/// A configuration problem, phrased for the operator: what is wrong and how to fix it.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read config file {path}: {source}")]
    Read {
        /// The file named by `--config` or `KEAP_SYNC_CONFIG`.
        path: PathBuf,
        /// Why reading failed.
        source: std::io::Error,
    },
    /// The file is not valid TOML for this shape (the message never quotes the file's text).
    #[error("config file {path}: {message}")]
    Parse {
        /// The file, or `<inline>`.
        path: PathBuf,
        /// One line: where and what.
        message: String,
    },
    /// A required setting is absent; the message says how to provide it.
    #[error("{0}")]
    Missing(String),
    /// A setting has a value that cannot work; the message names the key and the fix.
    #[error("{0}")]
    Invalid(String),
}

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

/// The application's table and the columns that are synced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UsersConfig {
    /// `schema.table` or `table` (then `public`).
    pub table: String,
    /// The primary key column: any type whose text form is exact (`schema::key` refuses the rest).
    pub key: String,
    /// The column sent as the contact's EMAIL1.
    pub email: String,
    /// The column sent as `given_name`; `None` when not synced.
    pub given_name: Option<String>,
    /// The column sent as `family_name`; `None` when not synced.
    pub family_name: Option<String>,
    /// Every other mapped property and the tags (`[contact]`, `[tags]`).
    pub contact: ContactMapping,
}

impl UsersConfig {
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

/// How the daemon authenticates to Keap.
#[derive(Debug, Clone)]
pub enum Credential {
    /// Personal Access Token or Service Account Key, sent as `X-Keap-API-Key`; never refreshed.
    ApiKey(Secret),
    /// OAuth2 client; the access/refresh pair lives in `keap_sync.oauth_token`.
    OAuth {
        /// The app's client id (not a secret).
        client_id: String,
        /// The app's client secret.
        client_secret: Secret,
    },
}

/// Where and how keap-sync talks to Keap.
#[derive(Debug, Clone)]
pub struct KeapConfig {
    /// The REST base, e.g. `https://api.infusionsoft.com/crm/rest`.
    pub api_url: String,
    /// The OAuth token endpoint.
    pub token_url: String,
    /// Keap's consent page, for `auth login`.
    pub authorize_url: String,
    /// The redirect URL registered for the Keap app, for `auth login`.
    pub redirect_uri: Option<String>,
    /// `None` when nothing is configured; commands that talk to Keap call [`Config::credential`].
    pub credential: Option<Credential>,
    /// How long one Keap call may take in all.
    pub request_timeout: Duration,
    /// How long connecting to Keap may take.
    pub connect_timeout: Duration,
    /// OAuth: refresh when the access token expires within this margin.
    pub refresh_margin: Duration,
    /// OAuth: refresh a grant whose refresh token is this old even when idle (Keap's refresh
    /// tokens lapse after 45 days).
    pub refresh_token_max_age: Duration,
}

/// What happens in Keap when a user row is deleted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OnDelete {
    /// Leave the contact in Keap (marketing history, consent records) — the default. The
    /// mapping stays, so a user restored under the same key updates the same contact.
    Keep,
    /// `DELETE /v1/contacts/{id}`, and forget the mapping.
    DeleteContact,
    /// Keep the contact but apply `tag` (e.g. "Account deleted"); with `opt_out`, also opt its
    /// email out of marketing (`PUT /v1/emailAddresses/{email}`, this reason). The mapping is
    /// forgotten: a user restored later is linked again by email.
    Tag {
        /// The tag to apply.
        tag: TagRef,
        /// The opt-out reason, when the email is to be opted out.
        opt_out: Option<String>,
    },
}

/// `on_delete` as written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
enum FileOnDelete {
    Keep,
    DeleteContact,
    Tag,
}

/// How changes are delivered: concurrency, timing, retries, deletes, stopping.
#[derive(Debug, Clone)]
pub struct DeliveryConfig {
    /// Keap calls in flight at once (never two for the same user).
    pub concurrency: usize,
    /// How often the outbox is scanned even without a notification.
    pub poll_interval: Duration,
    /// How long a claim is valid; a crashed daemon's claims are retried after this.
    pub lease: Duration,
    /// A change waits this long for further changes to the same user, so a burst costs one call.
    pub settle: Duration,
    /// The first retry's delay; each further one doubles it (with jitter).
    pub retry_base: Duration,
    /// The longest retry delay.
    pub retry_max: Duration,
    /// What a deleted user does to its Keap contact.
    pub on_delete: OnDelete,
    /// How long a graceful stop waits for calls in flight.
    pub shutdown_grace: Duration,
    /// How often the daemon checks that capture still works (the trigger installed and enabled,
    /// the key and synced columns present).
    pub capture_check: Duration,
}

/// Client-side rate limits. Defaults are Keap's documented OAuth limits; the API-key defaults
/// apply when an API key is the credential and the file sets nothing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LimitsConfig {
    /// Calls per second (Keap's spike arrest).
    pub per_second: u32,
    /// Calls per rolling minute (Keap's throttle).
    pub per_minute: u32,
    /// Calls per day (Keap's quota).
    pub per_day: u32,
}

impl LimitsConfig {
    /// Keap's documented limits for an OAuth app.
    pub const OAUTH: LimitsConfig = LimitsConfig { per_second: 25, per_minute: 1_500, per_day: 150_000 };
    /// Keap's documented limits for a Personal Access Token or Service Account Key.
    pub const API_KEY: LimitsConfig = LimitsConfig { per_second: 10, per_minute: 240, per_day: 30_000 };
}

/// The whole, validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// Loopback address for `/metrics` and `/healthz`; off when `None`.
    pub metrics_listen: Option<std::net::SocketAddr>,
    /// `None` until `DATABASE_URL` or `[database] url` is set; see [`Config::database`].
    pub database: Option<DatabaseConfig>,
    /// The application's table and the synced columns.
    pub users: UsersConfig,
    /// Keap's URLs, the credential and timeouts.
    pub keap: KeapConfig,
    /// Delivery tuning.
    pub delivery: DeliveryConfig,
    /// Client-side rate limits.
    pub limits: LimitsConfig,
}

impl Config {
    /// The database settings, or the error telling the operator how to provide them.
    pub fn database(&self) -> Result<&DatabaseConfig, ConfigError> {
        self.database.as_ref().ok_or_else(|| {
            ConfigError::Missing(
                "no database configured: set DATABASE_URL or `url` under [database] in the config file"
                    .into(),
            )
        })
    }

    /// The Keap credential, or the error telling the operator how to provide one.
    pub fn credential(&self) -> Result<&Credential, ConfigError> {
        self.keap.credential.as_ref().ok_or_else(|| {
            ConfigError::Missing(
                "no Keap credential: set KEAP_API_KEY (a Personal Access Token or Service Account Key), \
                 or KEAP_CLIENT_ID and KEAP_CLIENT_SECRET for OAuth (then run `keap-sync auth import`)"
                    .into(),
            )
        })
    }

    /// Loads `path` (if any) and applies the environment through `env`.
    ///
    /// `env` is a lookup function rather than `std::env::var` so tests can pass a map without
    /// touching the process environment (which is shared by every test thread).
    pub fn load(path: Option<&Path>, env: &dyn Fn(&str) -> Option<String>) -> Result<Config, ConfigError> {
        let file = match path {
            Some(path) => {
                let text = std::fs::read_to_string(path)
                    .map_err(|source| ConfigError::Read { path: path.to_owned(), source })?;
                parse(&text, path)?
            }
            None => FileConfig::default(),
        };
        let base_dir = path.and_then(Path::parent).unwrap_or(Path::new("."));
        Self::from_parts(file, base_dir, env)
    }

    /// Configuration from the environment alone (no file).
    pub fn from_env(env: &dyn Fn(&str) -> Option<String>) -> Result<Config, ConfigError> {
        Self::load(None, env)
    }

    /// Configuration from TOML text (relative `*_file` paths resolve against the current
    /// directory). For tests and embedding; the CLI uses [`Config::load`].
    pub fn from_toml(text: &str, env: &dyn Fn(&str) -> Option<String>) -> Result<Config, ConfigError> {
        let file = parse(text, Path::new("<inline>"))?;
        Self::from_parts(file, Path::new("."), env)
    }

    /// The file (defaults already filled in), then the environment and secrets, then validation.
    fn from_parts(
        file: FileConfig,
        base_dir: &Path,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<Config, ConfigError> {
        // A variable set to nothing (`DATABASE_URL=` in a unit file) counts as unset.
        let env = |name: &str| env(name).filter(|v| !v.trim().is_empty());
        let file = file.with_env(&env);
        let credential = read_credential(&file.keap, base_dir, &env)?;
        file.validate(credential)
    }
}

// ---- the file's shape and the built-in defaults ----------------------------------------------
//
// Every section is `#[serde(default)]`: a key the file leaves out takes the value from the
// section's `Default` impl, written next to the struct. `Option` marks what has no default
// (off, or not configured) and the limits, whose defaults depend on the credential.

#[derive(Debug, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct FileConfig {
    database: FileDatabase,
    users: FileUsers,
    contact: contact::FileContact,
    tags: contact::FileTags,
    keap: FileKeap,
    delivery: FileDelivery,
    limits: FileLimits,
    metrics: FileMetrics,
}

#[derive(Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct FileDatabase {
    /// Or `DATABASE_URL`; commands that need the database refuse to start without one.
    url: Option<String>,
    connect_timeout_secs: u64,
    statement_timeout_secs: u64,
    lock_timeout_secs: u64,
    idle_in_transaction_timeout_secs: u64,
    keepalive_idle_secs: u64,
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

#[derive(Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct FileUsers {
    table: String,
    key: String,
    email: String,
    /// `""` means "do not sync this field" (also for `family_name`).
    given_name: String,
    family_name: String,
}

impl Default for FileUsers {
    fn default() -> Self {
        FileUsers {
            table: "public.users".into(),
            key: "id".into(),
            email: "email".into(),
            given_name: "first_name".into(),
            family_name: "last_name".into(),
        }
    }
}

#[derive(Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct FileKeap {
    api_url: String,
    token_url: String,
    authorize_url: String,
    redirect_uri: Option<String>,
    client_id: Option<String>,
    /// Where secrets are, never the secrets themselves.
    client_secret_file: Option<PathBuf>,
    api_key_file: Option<PathBuf>,
    request_timeout_secs: u64,
    connect_timeout_secs: u64,
    refresh_margin_secs: u64,
    refresh_token_max_age_days: u64,
}

impl Default for FileKeap {
    fn default() -> Self {
        FileKeap {
            api_url: DEFAULT_API_URL.into(),
            token_url: DEFAULT_TOKEN_URL.into(),
            authorize_url: "https://accounts.infusionsoft.com/app/oauth/authorize".into(),
            redirect_uri: None,
            client_id: None,
            client_secret_file: None,
            api_key_file: None,
            request_timeout_secs: 30,
            connect_timeout_secs: 10,
            refresh_margin_secs: 300,
            refresh_token_max_age_days: 30,
        }
    }
}

#[derive(Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct FileDelivery {
    concurrency: usize,
    poll_interval_ms: u64,
    lease_secs: u64,
    settle_ms: u64,
    retry_base_ms: u64,
    retry_max_secs: u64,
    on_delete: FileOnDelete,
    /// With `on_delete = "tag"`: the tag (name or id).
    on_delete_tag: contact::FileTagRefOrDefault,
    /// With `on_delete = "tag"`: also opt the email out of marketing.
    on_delete_opt_out: bool,
    on_delete_opt_out_reason: String,
    shutdown_grace_secs: u64,
    capture_check_secs: u64,
}

impl Default for FileDelivery {
    fn default() -> Self {
        FileDelivery {
            concurrency: 4,
            poll_interval_ms: 5_000,
            lease_secs: 120,
            settle_ms: 100,
            retry_base_ms: 1_000,
            retry_max_secs: 3_600,
            on_delete: FileOnDelete::Keep,
            on_delete_tag: contact::FileTagRefOrDefault::default(),
            on_delete_opt_out: false,
            on_delete_opt_out_reason: "Account deleted in the application".into(),
            shutdown_grace_secs: 20,
            capture_check_secs: 30,
        }
    }
}

/// A key left out takes Keap's documented limit for the credential in use:
/// [`LimitsConfig::OAUTH`], or [`LimitsConfig::API_KEY`] when an API key is the credential.
#[derive(Debug, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct FileLimits {
    per_second: Option<u32>,
    per_minute: Option<u32>,
    per_day: Option<u32>,
}

/// Off unless `listen` is set.
#[derive(Debug, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct FileMetrics {
    listen: Option<String>,
}

/// Parses the file; a syntax error or unknown key becomes one line that never quotes the file.
fn parse(text: &str, path: &Path) -> Result<FileConfig, ConfigError> {
    toml::from_str(text)
        .map_err(|e| ConfigError::Parse { path: path.to_owned(), message: parse_message(text, e) })
}

/// toml's `Display` quotes the offending source line under the message, and that line may hold a
/// password (`url = "postgres://user:secret@…"`); the CLI also promises one line. So the message
/// is rebuilt from toml's parts: our own line and column, and toml's description, which `Display`
/// prints without any excerpt once the input is detached.
fn parse_message(text: &str, mut error: toml::de::Error) -> String {
    error.set_input(None);
    let what = error.to_string().split_whitespace().collect::<Vec<_>>().join(" ");
    match error.span() {
        Some(span) => {
            let (line, column) = line_and_column(text, span.start);
            format!("TOML parse error at line {line}, column {column}: {what}")
        }
        None => what,
    }
}

/// 1-based line and column (in characters) of a byte offset.
fn line_and_column(text: &str, offset: usize) -> (usize, usize) {
    let before = &text.as_bytes()[..offset.min(text.len())];
    let line_start = before.iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1);
    let line = before.iter().filter(|&&b| b == b'\n').count() + 1;
    let column = String::from_utf8_lossy(&before[line_start..]).chars().count() + 1;
    (line, column)
}

// ---- environment overrides and secrets ---------------------------------------------------------

impl FileConfig {
    /// Environment variables win over the file. Secrets are not here: [`read_credential`].
    fn with_env(mut self, env: &dyn Fn(&str) -> Option<String>) -> FileConfig {
        self.database.url = env("DATABASE_URL").or(self.database.url);
        self.keap.api_url = env("KEAP_API_URL").unwrap_or(self.keap.api_url);
        self.keap.token_url = env("KEAP_TOKEN_URL").unwrap_or(self.keap.token_url);
        self.keap.client_id = env("KEAP_CLIENT_ID").or(self.keap.client_id);
        self
    }
}

/// The Keap credential: an API key wins over an OAuth client; both halves of a client or neither.
fn read_credential(
    keap: &FileKeap,
    base_dir: &Path,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<Option<Credential>, ConfigError> {
    let secret = |var: &str, file_key: &str, file: Option<&Path>, credential: &str| {
        read_secret(env, base_dir, var, file_key, file, credential)
    };
    let api_key = secret("KEAP_API_KEY", "keap.api_key_file", keap.api_key_file.as_deref(), "keap-api-key")?;
    let client_secret = secret(
        "KEAP_CLIENT_SECRET",
        "keap.client_secret_file",
        keap.client_secret_file.as_deref(),
        "keap-client-secret",
    )?;
    match (api_key, keap.client_id.clone(), client_secret) {
        (Some(key), _, _) => Ok(Some(Credential::ApiKey(key))),
        (None, Some(client_id), Some(client_secret)) => Ok(Some(Credential::OAuth { client_id, client_secret })),
        (None, Some(_), None) => Err(ConfigError::Missing(
            "KEAP_CLIENT_ID is set but the client secret is not: set KEAP_CLIENT_SECRET, \
             `client_secret_file` under [keap], or a systemd credential named keap-client-secret"
                .into(),
        )),
        (None, None, Some(_)) => Err(ConfigError::Missing(
            "a Keap client secret is set but the client id is not: set KEAP_CLIENT_ID or `client_id` under [keap]"
                .into(),
        )),
        (None, None, None) => Ok(None),
    }
}

/// A secret from, in order: the variable `var`, the file the config names under `file_key`
/// (relative to the config file's directory), or systemd's credential called `credential`.
fn read_secret(
    env: &dyn Fn(&str) -> Option<String>,
    base_dir: &Path,
    var: &str,
    file_key: &str,
    file: Option<&Path>,
    credential: &str,
) -> Result<Option<Secret>, ConfigError> {
    if let Some(v) = env(var) {
        return Ok(Some(Secret::new(v.trim())));
    }
    if let Some(path) = file {
        return secret_from_file(&base_dir.join(path), file_key).map(Some);
    }
    if let Some(dir) = env("CREDENTIALS_DIRECTORY") {
        let path = Path::new(&dir).join(credential);
        if path.exists() {
            return secret_from_file(&path, "systemd credential").map(Some);
        }
    }
    Ok(None)
}

fn secret_from_file(path: &Path, what: &str) -> Result<Secret, ConfigError> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| ConfigError::Invalid(format!("cannot read {what} {}: {e}", path.display())))?;
    let value = text.trim();
    if value.is_empty() {
        return Err(ConfigError::Invalid(format!("{what} {} is empty", path.display())));
    }
    Ok(Secret::new(value))
}

// ---- validation: the file's shape to the public `Config` ---------------------------------------

impl FileConfig {
    fn validate(self, credential: Option<Credential>) -> Result<Config, ConfigError> {
        let database = self.database.validate()?;
        let mut users = self.users.validate()?;
        users.contact = self.contact.validate()?;
        users.contact.tags = self.tags.validate()?;
        let keap = self.keap.validate(credential)?;
        let delivery = self.delivery.validate(&keap)?;
        let limits = self.limits.validate(keap.credential.as_ref())?;
        let metrics_listen = self.metrics.validate()?;
        Ok(Config { metrics_listen, database, users, keap, delivery, limits })
    }
}

impl FileDatabase {
    fn validate(self) -> Result<Option<DatabaseConfig>, ConfigError> {
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

impl FileUsers {
    fn validate(self) -> Result<UsersConfig, ConfigError> {
        validate_identifier("users.table", &self.table, true)?;
        let column = |key: &str, name: String| validate_identifier(key, &name, false).map(|()| name);
        let optional =
            |key: &str, name: String| if name.is_empty() { Ok(None) } else { column(key, name).map(Some) };
        Ok(UsersConfig {
            key: column("users.key", self.key)?,
            email: column("users.email", self.email)?,
            given_name: optional("users.given_name", self.given_name)?,
            family_name: optional("users.family_name", self.family_name)?,
            table: self.table,
            contact: ContactMapping::default(),
        })
    }
}

impl FileKeap {
    fn validate(self, credential: Option<Credential>) -> Result<KeapConfig, ConfigError> {
        let refresh_token_max_age =
            secs("keap.refresh_token_max_age_days", self.refresh_token_max_age_days.saturating_mul(86_400))?;
        if refresh_token_max_age >= Duration::from_secs(45 * 86_400) {
            return Err(ConfigError::Invalid(
                "keap.refresh_token_max_age_days must be below 45: Keap's refresh tokens lapse after 45 days"
                    .into(),
            ));
        }
        Ok(KeapConfig {
            api_url: keap_url("keap.api_url (KEAP_API_URL)", self.api_url)?,
            token_url: keap_url("keap.token_url (KEAP_TOKEN_URL)", self.token_url)?,
            authorize_url: keap_url("keap.authorize_url", self.authorize_url)?,
            // Kept exactly as written: Keap compares it with the registered redirect URL.
            redirect_uri: match self.redirect_uri {
                Some(uri) => keap_url("keap.redirect_uri", uri.clone()).map(|_| Some(uri))?,
                None => None,
            },
            credential,
            request_timeout: secs("keap.request_timeout_secs", self.request_timeout_secs)?,
            connect_timeout: secs("keap.connect_timeout_secs", self.connect_timeout_secs)?,
            refresh_margin: secs("keap.refresh_margin_secs", self.refresh_margin_secs)?,
            refresh_token_max_age,
        })
    }
}

impl FileDelivery {
    fn validate(self, keap: &KeapConfig) -> Result<DeliveryConfig, ConfigError> {
        if !(1..=64).contains(&self.concurrency) {
            return Err(ConfigError::Invalid(format!(
                "delivery.concurrency = {} is out of range: use 1 to 64",
                self.concurrency
            )));
        }
        // A claim must outlive a call started under it (calls that could not finish in time are
        // not started), with room for a retry after a 401; else a slow call could be sent twice.
        let lease = secs("delivery.lease_secs", self.lease_secs)?;
        let worst_call = keap.connect_timeout.saturating_add(keap.request_timeout).saturating_mul(2);
        if lease <= worst_call {
            return Err(ConfigError::Invalid(format!(
                "delivery.lease_secs = {} is too short: it must exceed 2 x (keap.request_timeout_secs + \
                 keap.connect_timeout_secs) = {} s so a claim never expires while its call is in flight",
                lease.as_secs(),
                worst_call.as_secs()
            )));
        }
        Ok(DeliveryConfig {
            concurrency: self.concurrency,
            poll_interval: millis("delivery.poll_interval_ms", self.poll_interval_ms)?,
            lease,
            settle: Duration::from_millis(self.settle_ms),
            retry_base: millis("delivery.retry_base_ms", self.retry_base_ms)?,
            retry_max: secs("delivery.retry_max_secs", self.retry_max_secs)?,
            on_delete: self.on_delete()?,
            shutdown_grace: secs("delivery.shutdown_grace_secs", self.shutdown_grace_secs)?,
            capture_check: secs("delivery.capture_check_secs", self.capture_check_secs)?,
        })
    }
}

impl FileDelivery {
    fn on_delete(&self) -> Result<OnDelete, ConfigError> {
        let opt_out = self.on_delete_opt_out.then(|| self.on_delete_opt_out_reason.clone());
        match self.on_delete {
            FileOnDelete::Tag => {
                if opt_out.as_ref().is_some_and(|r| r.trim().is_empty()) {
                    return Err(ConfigError::Invalid(
                        "delivery.on_delete_opt_out_reason is empty: Keap needs a reason for an opt-out".into(),
                    ));
                }
                Ok(OnDelete::Tag { tag: self.on_delete_tag.validate("delivery.on_delete_tag")?, opt_out })
            }
            _ if opt_out.is_some() => Err(ConfigError::Invalid(
                "delivery.on_delete_opt_out needs on_delete = \"tag\" (a deleted contact has no email to opt out; \
                 a kept one is left alone)"
                    .into(),
            )),
            FileOnDelete::Keep => Ok(OnDelete::Keep),
            FileOnDelete::DeleteContact => Ok(OnDelete::DeleteContact),
        }
    }
}

impl FileLimits {
    fn validate(self, credential: Option<&Credential>) -> Result<LimitsConfig, ConfigError> {
        let keap = match credential {
            Some(Credential::ApiKey(_)) => LimitsConfig::API_KEY,
            _ => LimitsConfig::OAUTH,
        };
        Ok(LimitsConfig {
            per_second: positive("limits.per_second", self.per_second.unwrap_or(keap.per_second))?,
            per_minute: positive("limits.per_minute", self.per_minute.unwrap_or(keap.per_minute))?,
            per_day: positive("limits.per_day", self.per_day.unwrap_or(keap.per_day))?,
        })
    }
}

impl FileMetrics {
    fn validate(self) -> Result<Option<std::net::SocketAddr>, ConfigError> {
        let Some(text) = self.listen else { return Ok(None) };
        let addr: std::net::SocketAddr = text.parse().map_err(|_| {
            ConfigError::Invalid(format!("metrics.listen = {text:?} is not an address like 127.0.0.1:9187"))
        })?;
        if !addr.ip().is_loopback() {
            return Err(ConfigError::Invalid(format!(
                "metrics.listen = {text:?} must be a loopback address (127.0.0.1 or [::1]); \
                 put a reverse proxy in front to expose it"
            )));
        }
        Ok(Some(addr))
    }
}

/// Identifiers are later checked against the catalog and always quoted; this early check only
/// turns an obviously broken value into an error that names the key.
fn validate_identifier(key: &str, value: &str, qualified: bool) -> Result<(), ConfigError> {
    let parts: Vec<&str> = if qualified { value.split('.').collect() } else { vec![value] };
    let ok = !parts.is_empty()
        && parts.len() <= 2
        && parts.iter().all(|p| !p.is_empty() && p.len() <= 63 && !p.contains('\0') && !p.contains('"'));
    if ok {
        Ok(())
    } else {
        Err(ConfigError::Invalid(format!(
            "{key} = {value:?} is not a valid {}: use 1 to 63 characters without double quotes{}",
            if qualified { "table name" } else { "column name" },
            if qualified { ", optionally as schema.table" } else { "" }
        )))
    }
}

/// A URL keap-sync sends credentials to, or has Keap send the browser to, without trailing
/// slashes: https only, except on a loopback host (localhost, 127.0.0.0/8, ::1), where the
/// tests and the demo serve plain http (ARCHITECTURE.md, invariant 16). A user name or
/// password inside it is refused without echoing the value.
fn keap_url(key: &str, value: String) -> Result<String, ConfigError> {
    let trimmed = value.trim_end_matches('/').to_owned();
    // Quoted in errors, unless it might hold a user name and password (`user:pass@host`) or a
    // token in its query or fragment (`?access_token=…`).
    let shown = if value.contains(['@', '?', '#']) { String::new() } else { format!(" = {value:?}") };
    let Ok(parsed) = reqwest::Url::parse(&trimmed) else {
        return Err(ConfigError::Invalid(format!(
            "{key}{shown} is not a URL: write it in full, starting with https://"
        )));
    };
    if !parsed.username().is_empty() || parsed.password().is_some() {
        return Err(ConfigError::Invalid(format!(
            "{key} holds a user name or password: remove them (Keap credentials come from \
             KEAP_API_KEY or the OAuth client settings, never from a URL)"
        )));
    }
    match parsed.scheme() {
        "https" => Ok(trimmed),
        "http" if is_loopback_host(&parsed) => Ok(trimmed),
        "http" => Err(ConfigError::Invalid(format!(
            "{key}{shown} is plain http, which would send Keap credentials unencrypted: use \
             https:// (plain http is allowed only for a loopback host: localhost, 127.0.0.1, ::1)"
        ))),
        _ => Err(ConfigError::Invalid(format!("{key}{shown} is not an https:// URL"))),
    }
}

/// `localhost`, an address in 127.0.0.0/8, or `::1`.
fn is_loopback_host(url: &reqwest::Url) -> bool {
    let Some(host) = url.host_str() else { return false };
    if host.eq_ignore_ascii_case("localhost") {
        return true;
    }
    let bare = host.strip_prefix('[').and_then(|h| h.strip_suffix(']')).unwrap_or(host);
    bare.parse::<std::net::IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

fn secs(key: &str, value: u64) -> Result<Duration, ConfigError> {
    positive(key, value).map(Duration::from_secs)
}

fn millis(key: &str, value: u64) -> Result<Duration, ConfigError> {
    positive(key, value).map(Duration::from_millis)
}

/// Refuses zero.
fn positive<T: PartialEq + Default>(key: &str, value: T) -> Result<T, ConfigError> {
    if value == T::default() {
        return Err(ConfigError::Invalid(format!("{key} must be at least 1")));
    }
    Ok(value)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    #[test]
    fn the_lock_timeout_must_be_below_the_statement_timeout() {
        let toml = "[database]\nurl = \"postgres://h/db\"\nlock_timeout_secs = 30\n";
        let err = load_str(toml, &[]).unwrap_err().to_string();
        assert!(
            err.contains("lock_timeout_secs (30)") && err.contains("statement_timeout_secs (30)"),
            "{err}"
        );
        let err = load_str("[database]\nurl = \"postgres://h/db\"\nkeepalive_idle_secs = 0\n", &[])
            .unwrap_err()
            .to_string();
        assert!(err.contains("database.keepalive_idle_secs must be at least 1"), "{err}");
    }

    fn load_str(toml_text: &str, env: &[(&str, &str)]) -> Result<Config, ConfigError> {
        let dir = std::env::temp_dir().join(format!(
            "keap-sync-config-{}-{}",
            std::process::id(),
            rand::random::<u64>()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("keap-sync.toml");
        std::fs::write(&path, toml_text).unwrap();
        let env: HashMap<String, String> = env.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        let result = Config::load(Some(&path), &|k| env.get(k).cloned());
        std::fs::remove_dir_all(&dir).ok();
        result
    }

    #[test]
    fn defaults_apply() {
        let c = load_str("", &[]).unwrap();
        assert!(c.database.is_none());
        assert_eq!(c.users.table, "public.users");
        assert_eq!(c.users.synced_columns(), vec!["email", "first_name", "last_name"]);
        assert_eq!(c.keap.api_url, DEFAULT_API_URL);
        assert_eq!(c.delivery.concurrency, 4);
        assert_eq!(c.limits, LimitsConfig::OAUTH);
        assert!(c.credential().is_err());
    }

    #[test]
    fn the_example_file_parses_to_the_defaults() {
        let example = Config::from_toml(include_str!("../../keap-sync.example.toml"), &|_| None).unwrap();
        let defaults = Config::from_toml("", &|_| None).unwrap();
        assert_eq!(format!("{example:?}"), format!("{defaults:?}"));
    }

    #[test]
    fn unknown_key_is_named() {
        let err = load_str("[delivery]\nconcurency = 3\n", &[]).unwrap_err().to_string();
        assert!(err.contains("concurency"), "{err}");
        assert!(!err.contains('\n'), "one line: {err}");
    }

    #[test]
    fn environment_wins_over_file() {
        let c = load_str(
            "[database]\nurl = \"postgres://file/db\"\n[keap]\napi_url = \"https://file.example/crm/rest\"\n",
            &[("DATABASE_URL", "postgres://env/db"), ("KEAP_API_URL", "http://127.0.0.1:9/crm/rest/")],
        )
        .unwrap();
        assert_eq!(c.database().unwrap().url.expose(), "postgres://env/db");
        assert_eq!(c.keap.api_url, "http://127.0.0.1:9/crm/rest");
    }

    #[test]
    fn keap_urls_must_be_https_except_on_loopback() {
        let load = |key: &str, value: &str| load_str(&format!("[keap]\n{key} = {value:?}\n"), &[]);
        for key in ["api_url", "token_url", "authorize_url", "redirect_uri"] {
            // Plain http to a real host: refused, naming the key and the fix, on one line.
            let err = load(key, "http://api.example.com/crm/rest").unwrap_err().to_string();
            assert!(err.starts_with(&format!("keap.{key}")), "{err}");
            assert!(err.contains("http://api.example.com/crm/rest") && err.contains("use https://"), "{err}");
            assert!(!err.contains('\n'), "one line: {err}");
            // Another scheme, or no URL at all.
            for bad in ["ftp://api.example.com/x", "api.example.com/crm/rest"] {
                let err = load(key, bad).unwrap_err().to_string();
                assert!(err.contains(&format!("keap.{key}")) && err.contains("https://"), "{err}");
            }
            // Credentials inside the URL: refused without quoting them.
            let err = load(key, "https://user:hunter2@api.example.com/").unwrap_err().to_string();
            assert!(err.contains("user name or password") && !err.contains("hunter2"), "{err}");
            // https anywhere, and plain http on loopback hosts (the tests, the demo, `--listen`).
            for good in [
                "https://api.example.com/crm/rest",
                "http://127.0.0.1:8080/crm/rest",
                "http://127.9.9.9/token",
                "http://[::1]:9/token",
                "http://localhost:1234/keap/callback",
                "http://LOCALHOST/cb",
            ] {
                assert!(load(key, good).is_ok(), "keap.{key} = {good}: {:?}", load(key, good).err());
            }
        }
        // Lookalikes of loopback are not loopback.
        for bad in ["http://localhost.example.com/", "http://127.0.0.1.example.com/", "http://[::2]/"] {
            assert!(load("api_url", bad).is_err(), "{bad}");
        }
        // The environment's value is checked the same way, and the message names the variable.
        let err =
            load_str("", &[("KEAP_TOKEN_URL", "http://token.example.com/token")]).unwrap_err().to_string();
        assert!(err.contains("KEAP_TOKEN_URL") && err.contains("keap.token_url"), "{err}");
        // The redirect URL is kept exactly as registered; the endpoints lose trailing slashes.
        let c = load_str("[keap]\nredirect_uri = \"https://app.example.com/cb/\"\n", &[]).unwrap();
        assert_eq!(c.keap.redirect_uri.as_deref(), Some("https://app.example.com/cb/"));
    }

    #[test]
    fn api_key_selects_api_key_limits_and_is_redacted() {
        let c = load_str("", &[("KEAP_API_KEY", "KeapAK-secretvalue")]).unwrap();
        assert!(matches!(c.credential().unwrap(), Credential::ApiKey(_)));
        assert_eq!(c.limits, LimitsConfig::API_KEY);
        assert!(!format!("{c:?}").contains("secretvalue"));
    }

    #[test]
    fn half_an_oauth_client_is_an_error() {
        let err = load_str("", &[("KEAP_CLIENT_ID", "abc")]).unwrap_err().to_string();
        assert!(err.contains("KEAP_CLIENT_SECRET"), "{err}");
    }

    #[test]
    fn lease_shorter_than_a_call_is_refused() {
        let err = load_str("[delivery]\nlease_secs = 60\n", &[]).unwrap_err().to_string();
        assert!(err.contains("delivery.lease_secs"), "{err}");
    }

    #[test]
    fn empty_optional_column_disables_it() {
        let c = load_str("[users]\ngiven_name = \"\"\n", &[]).unwrap();
        assert_eq!(c.users.synced_columns(), vec!["email", "last_name"]);
    }

    #[test]
    fn quoted_identifier_is_refused() {
        let err = load_str("[users]\ntable = 'x\"; drop table y'\n", &[]).unwrap_err().to_string();
        assert!(err.contains("users.table"), "{err}");
    }

    /// A scratch directory for secret files; the caller removes it.
    fn scratch_dir() -> PathBuf {
        let dir = std::env::temp_dir().join(format!(
            "keap-sync-secrets-{}-{}",
            std::process::id(),
            rand::random::<u64>()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn defaults_are_written_once() {
        // Leaving a key out of the file means the section's `Default`, and the example's values
        // are exactly those.
        assert_eq!(toml::from_str::<FileConfig>("").unwrap(), FileConfig::default());
        assert_eq!(toml::from_str::<FileConfig>("[delivery]\n").unwrap(), FileConfig::default());
        let example = toml::from_str::<FileConfig>(include_str!("../../keap-sync.example.toml")).unwrap();
        assert_eq!(example, FileConfig::default());
        // And the file shape's `Default` validated is what an empty file gives.
        let validated = FileConfig::default().validate(None).unwrap();
        let empty = Config::from_toml("", &|_| None).unwrap();
        assert_eq!(format!("{validated:?}"), format!("{empty:?}"));
    }

    #[test]
    fn the_example_mapping_once_uncommented_is_valid() {
        // The commented `[contact]` and `[tags]` of the example are documentation: each line
        // must still be a valid setting when a user uncomments it.
        let text = include_str!("../../keap-sync.example.toml");
        let start = text.find("# [contact]").unwrap();
        let end = text.find("[keap]").unwrap();
        let mapping: String = text[start..end]
            .lines()
            .map(|l| l.strip_prefix("# ").unwrap_or(""))
            .collect::<Vec<_>>()
            .join("\n");
        let c = Config::from_toml(&mapping, &|_| None).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(c.users.contact.fields.len(), 27, "every field the example shows");
        assert_eq!(c.users.contact.tags.rules.len(), 2);
        assert_eq!(c.users.contact.tags.on_create.len(), 1);
    }

    #[test]
    fn a_key_left_out_keeps_its_default_beside_one_set() {
        let c = load_str("[delivery]\nconcurrency = 8\n[limits]\nper_day = 1000\n", &[]).unwrap();
        assert_eq!(c.delivery.concurrency, 8);
        assert_eq!(c.delivery.lease, Duration::from_secs(120));
        assert_eq!(c.limits, LimitsConfig { per_day: 1000, ..LimitsConfig::OAUTH });
        let c = load_str("[limits]\nper_second = 5\n", &[("KEAP_API_KEY", "k")]).unwrap();
        assert_eq!(c.limits, LimitsConfig { per_second: 5, ..LimitsConfig::API_KEY });
    }

    #[test]
    fn an_environment_secret_wins_over_the_secret_file() {
        let dir = scratch_dir();
        let key_file = dir.join("api-key");
        std::fs::write(&key_file, "from-file\n").unwrap();
        let text = format!("[keap]\napi_key_file = {:?}\n", key_file.to_str().unwrap());
        let api_key = |c: &Config| match c.credential().unwrap() {
            Credential::ApiKey(key) => key.expose().to_owned(),
            other => panic!("{other:?}"),
        };
        assert_eq!(api_key(&load_str(&text, &[]).unwrap()), "from-file");
        assert_eq!(api_key(&load_str(&text, &[("KEAP_API_KEY", " from-env\n")]).unwrap()), "from-env");

        // The OAuth client secret: systemd's credential, unless the environment has one.
        std::fs::write(dir.join("keap-client-secret"), "from-systemd").unwrap();
        let creds = ("CREDENTIALS_DIRECTORY", dir.to_str().unwrap());
        let client_secret = |env: &[(&str, &str)]| match load_str("[keap]\nclient_id = \"file-id\"\n", env)
            .unwrap()
            .credential()
            .unwrap()
        {
            Credential::OAuth { client_id, client_secret } => {
                (client_id.clone(), client_secret.expose().to_owned())
            }
            other => panic!("{other:?}"),
        };
        assert_eq!(client_secret(&[creds]), ("file-id".into(), "from-systemd".into()));
        assert_eq!(
            client_secret(&[creds, ("KEAP_CLIENT_SECRET", "from-env"), ("KEAP_CLIENT_ID", "env-id")]),
            ("env-id".into(), "from-env".into())
        );
        std::fs::remove_dir_all(&dir).ok();

        // Never from the TOML itself.
        let err = load_str("[keap]\nclient_secret = \"hunter2\"\n", &[]).unwrap_err().to_string();
        assert!(err.contains("client_secret"), "{err}");
        assert!(!err.contains("hunter2"), "{err}");
    }

    #[test]
    fn a_syntax_error_never_echoes_the_source() {
        for (text, line) in [
            ("[database]\nurl = \"postgres://u:secret@h/db\" oops\n", 2),
            ("[database]\nurl = \"postgres://u:secret@h/db\"\n= 3\n", 3),
            ("[database]\nurl = \"postgres://u:secret@h/db\n", 2),
            ("[database]\nurl = postgres://u:secret@h/db\n", 2),
            ("[database]\nurl = \"postgres://u:secret@h/db\"\nurl = \"postgres://u:secret@h/db\"\n", 3),
        ] {
            let err = load_str(text, &[]).unwrap_err().to_string();
            assert!(!err.contains("secret"), "{err}");
            assert!(!err.contains('\n'), "one line: {err}");
            assert!(err.contains(&format!("TOML parse error at line {line}, column ")), "{err}");
        }
    }
}
