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
//!
//! One section a file: `database`, `users` (with the contact mapping in `contact` and the
//! columns Keap's data lands in in `inbound`), `keap`, `delivery`, `limits`, `mirror`, `hooks`; `load`
//! reads the file and the environment and `secrets` the credential; `values` holds the checks
//! the sections share.

use std::path::PathBuf;

use crate::secret::Secret;

mod contact;
mod database;
mod delivery;
mod hooks;
mod inbound;
mod keap;
mod limits;
mod load;
mod mirror;
mod secrets;
mod users;
mod values;

pub use contact::{
    AddressPart, ContactMapping, CustomFieldRef, Empty, Field, FieldMapping, Owner, PhonePart, Prefer,
    Scalar, ScalarKind, Source, TagRef, TagRule, TagTemplate, TagsConfig, ADDRESS_FIELDS, SCALARS,
};
pub use database::{CaFile, DatabaseConfig};
pub use delivery::{DeliveryConfig, OnDelete};
pub use hooks::HooksConfig;
pub use inbound::{InboundConfig, InboundData, InboundTags, TagCategory};
pub use keap::{Credential, KeapConfig, DEFAULT_API_URL, DEFAULT_TOKEN_URL};
pub use limits::LimitsConfig;
pub use mirror::MirrorConfig;
pub use users::UsersConfig;

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
    /// The daemon's sweep of Keap's changes into keap-sync's mirror.
    pub mirror: MirrorConfig,
    /// The receiver of Keap's REST hooks; off when `None`.
    pub hooks: Option<HooksConfig>,
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
}

#[cfg(test)]
mod tests;
