//! Loading: the file parsed into its own shape (defaults filled in), the environment applied,
//! the credential read, and every section validated into the public [`Config`].

use std::path::Path;

use serde::Deserialize;

use super::database::FileDatabase;
use super::delivery::FileDelivery;
use super::keap::FileKeap;
use super::limits::FileLimits;
use super::secrets::read_credential;
use super::users::FileUsers;
use super::{contact, Config, ConfigError, Credential};

impl Config {
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
        file.validate(credential, base_dir, &env)
    }
}

// ---- the file's shape and the built-in defaults ----------------------------------------------
//
// Every section is `#[serde(default)]`: a key the file leaves out takes the value from the
// section's `Default` impl, written next to the struct. `Option` marks what has no default
// (off, or not configured) and the limits, whose defaults depend on the credential.

#[derive(Debug, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(super) struct FileConfig {
    pub(super) database: FileDatabase,
    pub(super) users: FileUsers,
    pub(super) contact: contact::FileContact,
    pub(super) tags: contact::FileTags,
    pub(super) keap: FileKeap,
    pub(super) delivery: FileDelivery,
    pub(super) limits: FileLimits,
    pub(super) metrics: FileMetrics,
    pub(super) mirror: super::mirror::FileMirror,
    pub(super) inbound: super::inbound::FileInbound,
    pub(super) hooks: super::hooks::FileHooks,
}

/// Off unless `listen` is set.
#[derive(Debug, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(super) struct FileMetrics {
    pub(super) listen: Option<String>,
}

/// Parses the file; a syntax error or unknown key becomes one line that never quotes the file.
pub(super) fn parse(text: &str, path: &Path) -> Result<FileConfig, ConfigError> {
    toml::from_str(text)
        .map_err(|e| ConfigError::Parse { path: path.to_owned(), message: parse_message(text, e) })
}

/// toml's `Display` quotes the offending source line under the message, and that line may hold a
/// password (`url = "postgres://user:secret@…"`); the CLI also promises one line. So the message
/// is rebuilt from toml's parts: our own line and column, and toml's description, which `Display`
/// prints without any excerpt once the input is detached.
pub(super) fn parse_message(text: &str, mut error: toml::de::Error) -> String {
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
pub(super) fn line_and_column(text: &str, offset: usize) -> (usize, usize) {
    let before = &text.as_bytes()[..offset.min(text.len())];
    let line_start = before.iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1);
    let line = before.iter().filter(|&&b| b == b'\n').count() + 1;
    let column = String::from_utf8_lossy(&before[line_start..]).chars().count() + 1;
    (line, column)
}

impl FileConfig {
    /// Environment variables win over the file. Secrets are not here: [`read_credential`].
    pub(super) fn with_env(mut self, env: &dyn Fn(&str) -> Option<String>) -> FileConfig {
        self.database.url = env("DATABASE_URL").or(self.database.url);
        self.keap.api_url = env("KEAP_API_URL").unwrap_or(self.keap.api_url);
        self.keap.token_url = env("KEAP_TOKEN_URL").unwrap_or(self.keap.token_url);
        self.keap.client_id = env("KEAP_CLIENT_ID").or(self.keap.client_id);
        self
    }
}

impl FileConfig {
    /// The whole file checked section by section; the lease is checked against `[keap]`'s timeouts and the
    /// limits default by the credential's kind. Relative paths start at `base_dir`.
    pub(super) fn validate(
        self,
        credential: Option<Credential>,
        base_dir: &Path,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<Config, ConfigError> {
        let database = self.database.validate(base_dir)?;
        let (mut users, owned_names) = self.users.validate()?;
        users.contact = self.contact.validate()?;
        users.own_names(owned_names);
        users.contact.tags = self.tags.validate()?;
        users.inbound = self.inbound.validate(&users)?;
        let keap = self.keap.validate(credential)?;
        let delivery = self.delivery.validate(&keap)?;
        let limits = self.limits.validate(keap.credential.as_ref())?;
        let metrics_listen = self.metrics.validate()?;
        let mirror = self.mirror.validate()?;
        let hooks = self.hooks.validate(base_dir, env)?;
        Ok(Config { metrics_listen, database, users, keap, delivery, limits, mirror, hooks })
    }
}

impl FileMetrics {
    /// The metrics listen address, if set: loopback only, so the endpoint is never exposed without a proxy.
    pub(super) fn validate(self) -> Result<Option<std::net::SocketAddr>, ConfigError> {
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
