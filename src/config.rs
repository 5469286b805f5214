//! Configuration: one TOML file (`--config PATH`) plus environment overrides.
//!
//! Precedence, highest first: environment variable, config file, built-in default. Secrets are
//! never read from the TOML itself (config files get copied, committed and pasted into tickets);
//! they come from the environment, from a file named in the config (`*_file`), or from systemd's
//! `$CREDENTIALS_DIRECTORY` (`LoadCredential=`). Unknown keys are an error naming the key, so a
//! typo never silently falls back to a default.
//!
//! The annotated example is `keap-sync.example.toml` at the top of the repository; the README's
//! configuration reference lists the same keys. Keep the three in step.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::secret::Secret;

/// Keap's production REST base; `/v1/contacts` is appended.
pub const DEFAULT_API_URL: &str = "https://api.infusionsoft.com/crm/rest";
/// Keap's OAuth token endpoint.
pub const DEFAULT_TOKEN_URL: &str = "https://api.infusionsoft.com/token";

/// A configuration problem, phrased for the operator: what is wrong and how to fix it.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("config file {path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("{0}")]
    Missing(String),
    #[error("{0}")]
    Invalid(String),
}

/// Where the daemon finds Postgres.
#[derive(Debug, Clone)]
pub struct DatabaseConfig {
    /// libpq-style URL or `key=value` string; may hold a password, so it is a [`Secret`] and
    /// only [`crate::db::describe`] (host, port, database, user) is ever printed.
    pub url: Secret,
    pub connect_timeout: Duration,
}

/// The application's table and the columns that are synced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UsersConfig {
    /// `schema.table` or `table` (then `public`).
    pub table: String,
    pub key: String,
    pub email: String,
    pub given_name: Option<String>,
    pub family_name: Option<String>,
}

impl UsersConfig {
    /// The table split into schema and name.
    pub fn schema_and_table(&self) -> (&str, &str) {
        match self.table.split_once('.') {
            Some((schema, table)) => (schema, table),
            None => ("public", self.table.as_str()),
        }
    }

    /// The columns whose change must reach Keap, in a stable order (email first).
    pub fn synced_columns(&self) -> Vec<&str> {
        let mut cols = vec![self.email.as_str()];
        cols.extend(self.given_name.as_deref());
        cols.extend(self.family_name.as_deref());
        cols
    }
}

/// How the daemon authenticates to Keap.
#[derive(Debug, Clone)]
pub enum Credential {
    /// Personal Access Token or Service Account Key, sent as `X-Keap-API-Key`; never refreshed.
    ApiKey(Secret),
    /// OAuth2 client; the access/refresh pair lives in `keap_sync.oauth_token`.
    OAuth { client_id: String, client_secret: Secret },
}

#[derive(Debug, Clone)]
pub struct KeapConfig {
    pub api_url: String,
    pub token_url: String,
    pub authorize_url: String,
    pub redirect_uri: Option<String>,
    /// `None` when nothing is configured; commands that talk to Keap call [`Config::credential`].
    pub credential: Option<Credential>,
    pub request_timeout: Duration,
    pub connect_timeout: Duration,
    /// OAuth: refresh when the access token expires within this margin.
    pub refresh_margin: Duration,
    /// OAuth: refresh a grant whose refresh token is this old even when idle (Keap's refresh
    /// tokens lapse after 45 days).
    pub refresh_token_max_age: Duration,
}

/// What happens in Keap when a user row is deleted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OnDelete {
    /// Leave the contact in Keap (marketing history, consent records) — the default.
    Keep,
    /// `DELETE /v1/contacts/{id}`.
    DeleteContact,
}

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
    pub retry_base: Duration,
    pub retry_max: Duration,
    pub on_delete: OnDelete,
    /// How long a graceful stop waits for calls in flight.
    pub shutdown_grace: Duration,
}

/// Client-side rate limits. Defaults are Keap's documented OAuth limits; the API-key defaults
/// apply when an API key is the credential and the file sets nothing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LimitsConfig {
    pub per_second: u32,
    pub per_minute: u32,
    pub per_day: u32,
}

impl LimitsConfig {
    pub const OAUTH: LimitsConfig = LimitsConfig { per_second: 25, per_minute: 1_500, per_day: 150_000 };
    pub const API_KEY: LimitsConfig = LimitsConfig { per_second: 10, per_minute: 240, per_day: 30_000 };
}

/// The whole, validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// Loopback address for `/metrics` and `/healthz`; off when `None`.
    pub metrics_listen: Option<std::net::SocketAddr>,
    pub database: Option<DatabaseConfig>,
    pub users: UsersConfig,
    pub keap: KeapConfig,
    pub delivery: DeliveryConfig,
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
                toml::from_str::<FileConfig>(&text).map_err(|e| ConfigError::Parse {
                    path: path.to_owned(),
                    message: one_line(&e.to_string()),
                })?
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
        let file = toml::from_str::<FileConfig>(text).map_err(|e| ConfigError::Parse {
            path: PathBuf::from("<inline>"),
            message: one_line(&e.to_string()),
        })?;
        Self::from_parts(file, Path::new("."), env)
    }

    fn from_parts(
        file: FileConfig,
        base_dir: &Path,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<Config, ConfigError> {
        let env = |name: &str| env(name).filter(|v| !v.trim().is_empty());
        let read_secret = |name: &str, file_key: &str, file: &Option<PathBuf>, credential: &str| {
            read_secret(&env, name, file_key, file.as_deref(), credential, base_dir)
        };

        let database = match env("DATABASE_URL").or(file.database.url) {
            Some(url) => Some(DatabaseConfig {
                url: Secret::new(url),
                connect_timeout: secs(
                    "database.connect_timeout_secs",
                    file.database.connect_timeout_secs.unwrap_or(10),
                )?,
            }),
            None => None,
        };

        let u = file.users;
        let users = UsersConfig {
            table: u.table.unwrap_or_else(|| "public.users".into()),
            key: u.key.unwrap_or_else(|| "id".into()),
            email: u.email.unwrap_or_else(|| "email".into()),
            given_name: optional_column(u.given_name, "first_name"),
            family_name: optional_column(u.family_name, "last_name"),
        };
        validate_identifier("users.table", &users.table, true)?;
        for (key, col) in
            [("users.key", Some(&users.key)), ("users.email", Some(&users.email))].into_iter().chain([
                ("users.given_name", users.given_name.as_ref()),
                ("users.family_name", users.family_name.as_ref()),
            ])
        {
            if let Some(col) = col {
                validate_identifier(key, col, false)?;
            }
        }

        let k = file.keap;
        let api_key = read_secret("KEAP_API_KEY", "keap.api_key_file", &k.api_key_file, "keap-api-key")?;
        let client_id = env("KEAP_CLIENT_ID").or(k.client_id);
        let client_secret = read_secret(
            "KEAP_CLIENT_SECRET",
            "keap.client_secret_file",
            &k.client_secret_file,
            "keap-client-secret",
        )?;
        let credential = match (api_key, client_id, client_secret) {
            (Some(key), _, _) => Some(Credential::ApiKey(key)),
            (None, Some(client_id), Some(client_secret)) => Some(Credential::OAuth { client_id, client_secret }),
            (None, Some(_), None) => {
                return Err(ConfigError::Missing(
                    "KEAP_CLIENT_ID is set but the client secret is not: set KEAP_CLIENT_SECRET, \
                     `client_secret_file` under [keap], or a systemd credential named keap-client-secret"
                        .into(),
                ))
            }
            (None, None, Some(_)) => {
                return Err(ConfigError::Missing(
                    "a Keap client secret is set but the client id is not: set KEAP_CLIENT_ID or `client_id` under [keap]"
                        .into(),
                ))
            }
            (None, None, None) => None,
        };
        let keap = KeapConfig {
            api_url: url("KEAP_API_URL", env("KEAP_API_URL").or(k.api_url), DEFAULT_API_URL)?,
            token_url: url("KEAP_TOKEN_URL", env("KEAP_TOKEN_URL").or(k.token_url), DEFAULT_TOKEN_URL)?,
            authorize_url: url(
                "keap.authorize_url",
                k.authorize_url,
                "https://accounts.infusionsoft.com/app/oauth/authorize",
            )?,
            redirect_uri: k.redirect_uri,
            request_timeout: secs("keap.request_timeout_secs", k.request_timeout_secs.unwrap_or(30))?,
            connect_timeout: secs("keap.connect_timeout_secs", k.connect_timeout_secs.unwrap_or(10))?,
            refresh_margin: secs("keap.refresh_margin_secs", k.refresh_margin_secs.unwrap_or(300))?,
            refresh_token_max_age: secs(
                "keap.refresh_token_max_age_days",
                k.refresh_token_max_age_days.unwrap_or(30).saturating_mul(86_400),
            )?,
            credential,
        };

        let d = file.delivery;
        let delivery = DeliveryConfig {
            concurrency: d.concurrency.unwrap_or(4),
            poll_interval: millis("delivery.poll_interval_ms", d.poll_interval_ms.unwrap_or(5_000))?,
            lease: secs("delivery.lease_secs", d.lease_secs.unwrap_or(120))?,
            settle: Duration::from_millis(d.settle_ms.unwrap_or(100)),
            retry_base: millis("delivery.retry_base_ms", d.retry_base_ms.unwrap_or(1_000))?,
            retry_max: secs("delivery.retry_max_secs", d.retry_max_secs.unwrap_or(3_600))?,
            on_delete: d.on_delete.unwrap_or(OnDelete::Keep),
            shutdown_grace: secs("delivery.shutdown_grace_secs", d.shutdown_grace_secs.unwrap_or(20))?,
        };
        if keap.refresh_token_max_age >= Duration::from_secs(45 * 86_400) {
            return Err(ConfigError::Invalid(
                "keap.refresh_token_max_age_days must be below 45: Keap's refresh tokens lapse after 45 days"
                    .into(),
            ));
        }
        if !(1..=64).contains(&delivery.concurrency) {
            return Err(ConfigError::Invalid(format!(
                "delivery.concurrency = {} is out of range: use 1 to 64",
                delivery.concurrency
            )));
        }
        // A claim must outlive a call started under it (calls that could not finish in time are
        // not started), with room for a retry after a 401; else a slow call could be sent twice.
        let worst_call = (keap.connect_timeout + keap.request_timeout) * 2;
        if delivery.lease <= worst_call {
            return Err(ConfigError::Invalid(format!(
                "delivery.lease_secs = {} is too short: it must exceed 2 x (keap.request_timeout_secs + \
                 keap.connect_timeout_secs) = {} s so a claim never expires while its call is in flight",
                delivery.lease.as_secs(),
                worst_call.as_secs()
            )));
        }

        let defaults = match keap.credential {
            Some(Credential::ApiKey(_)) => LimitsConfig::API_KEY,
            _ => LimitsConfig::OAUTH,
        };
        let l = file.limits;
        let limits = LimitsConfig {
            per_second: positive("limits.per_second", l.per_second.unwrap_or(defaults.per_second))?,
            per_minute: positive("limits.per_minute", l.per_minute.unwrap_or(defaults.per_minute))?,
            per_day: positive("limits.per_day", l.per_day.unwrap_or(defaults.per_day))?,
        };

        let metrics_listen = match file.metrics.listen {
            None => None,
            Some(text) => {
                let addr: std::net::SocketAddr = text.parse().map_err(|_| {
                    ConfigError::Invalid(format!(
                        "metrics.listen = {text:?} is not an address like 127.0.0.1:9187"
                    ))
                })?;
                if !addr.ip().is_loopback() {
                    return Err(ConfigError::Invalid(format!(
                        "metrics.listen = {text:?} must be a loopback address (127.0.0.1 or [::1]); \
                         put a reverse proxy in front to expose it"
                    )));
                }
                Some(addr)
            }
        };

        Ok(Config { metrics_listen, database, users, keap, delivery, limits })
    }
}

/// `given_name = ""` in the file means "do not sync this field".
fn optional_column(value: Option<String>, default: &str) -> Option<String> {
    match value {
        None => Some(default.to_owned()),
        Some(v) if v.is_empty() => None,
        Some(v) => Some(v),
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

fn read_secret(
    env: &dyn Fn(&str) -> Option<String>,
    var: &str,
    file_key: &str,
    file: Option<&Path>,
    credential: &str,
    base_dir: &Path,
) -> Result<Option<Secret>, ConfigError> {
    if let Some(v) = env(var) {
        return Ok(Some(Secret::new(v.trim())));
    }
    let from_file = |path: &Path, what: &str| -> Result<Option<Secret>, ConfigError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| ConfigError::Invalid(format!("cannot read {what} {}: {e}", path.display())))?;
        let value = text.trim();
        if value.is_empty() {
            return Err(ConfigError::Invalid(format!("{what} {} is empty", path.display())));
        }
        Ok(Some(Secret::new(value)))
    };
    if let Some(path) = file {
        let path = if path.is_relative() { base_dir.join(path) } else { path.to_owned() };
        return from_file(&path, file_key);
    }
    if let Some(dir) = env("CREDENTIALS_DIRECTORY") {
        let path = Path::new(&dir).join(credential);
        if path.exists() {
            return from_file(&path, "systemd credential");
        }
    }
    Ok(None)
}

fn url(key: &str, value: Option<String>, default: &str) -> Result<String, ConfigError> {
    let value = value.unwrap_or_else(|| default.to_owned());
    let trimmed = value.trim_end_matches('/').to_owned();
    if trimmed.starts_with("https://") || trimmed.starts_with("http://") {
        Ok(trimmed)
    } else {
        Err(ConfigError::Invalid(format!("{key} = {value:?} is not an http(s) URL")))
    }
}

fn secs(key: &str, value: u64) -> Result<Duration, ConfigError> {
    if value == 0 {
        return Err(ConfigError::Invalid(format!("{key} must be at least 1")));
    }
    Ok(Duration::from_secs(value))
}

fn millis(key: &str, value: u64) -> Result<Duration, ConfigError> {
    if value == 0 {
        return Err(ConfigError::Invalid(format!("{key} must be at least 1")));
    }
    Ok(Duration::from_millis(value))
}

fn positive(key: &str, value: u32) -> Result<u32, ConfigError> {
    if value == 0 {
        return Err(ConfigError::Invalid(format!("{key} must be at least 1")));
    }
    Ok(value)
}

/// toml's messages span several lines (a source excerpt); the CLI promises one line.
fn one_line(message: &str) -> String {
    message
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('|') && !l.chars().all(|c| c == '^' || c == ' '))
        .collect::<Vec<_>>()
        .join(" ")
}

// ---- the file's shape ----------------------------------------------------------------------

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    #[serde(default)]
    database: FileDatabase,
    #[serde(default)]
    users: FileUsers,
    #[serde(default)]
    keap: FileKeap,
    #[serde(default)]
    delivery: FileDelivery,
    #[serde(default)]
    limits: FileLimits,
    #[serde(default)]
    metrics: FileMetrics,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileMetrics {
    listen: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileDatabase {
    url: Option<String>,
    connect_timeout_secs: Option<u64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileUsers {
    table: Option<String>,
    key: Option<String>,
    email: Option<String>,
    given_name: Option<String>,
    family_name: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileKeap {
    api_url: Option<String>,
    token_url: Option<String>,
    authorize_url: Option<String>,
    redirect_uri: Option<String>,
    client_id: Option<String>,
    client_secret_file: Option<PathBuf>,
    api_key_file: Option<PathBuf>,
    request_timeout_secs: Option<u64>,
    connect_timeout_secs: Option<u64>,
    refresh_margin_secs: Option<u64>,
    refresh_token_max_age_days: Option<u64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileDelivery {
    concurrency: Option<usize>,
    poll_interval_ms: Option<u64>,
    lease_secs: Option<u64>,
    settle_ms: Option<u64>,
    retry_base_ms: Option<u64>,
    retry_max_secs: Option<u64>,
    on_delete: Option<OnDelete>,
    shutdown_grace_secs: Option<u64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileLimits {
    per_second: Option<u32>,
    per_minute: Option<u32>,
    per_day: Option<u32>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

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
        let example = Config::from_toml(include_str!("../keap-sync.example.toml"), &|_| None).unwrap();
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
}
