//! `[limits]`: the client-side rate limits, defaulting to Keap's documented limits for the
//! credential in use.

use serde::Deserialize;

use super::values::positive;
use super::{ConfigError, Credential};

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

/// A key left out takes Keap's documented limit for the credential in use:
/// [`LimitsConfig::OAUTH`], or [`LimitsConfig::API_KEY`] when an API key is the credential.
#[derive(Debug, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(super) struct FileLimits {
    pub(super) per_second: Option<u32>,
    pub(super) per_minute: Option<u32>,
    pub(super) per_day: Option<u32>,
}

impl FileLimits {
    /// The call limits: each as the file sets it, else Keap's limit for the credential's kind (API key or
    /// OAuth); none may be zero.
    pub(super) fn validate(self, credential: Option<&Credential>) -> Result<LimitsConfig, ConfigError> {
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
