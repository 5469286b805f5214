//! `[keap]`: Keap's URLs (https only, except on loopback), the credential's kind and the
//! client's timeouts.

use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

use super::values::secs;
use super::{ConfigError, Secret};

/// Keap's production REST base; `/v1/contacts` is appended.
pub const DEFAULT_API_URL: &str = "https://api.infusionsoft.com/crm/rest";
/// Keap's OAuth token endpoint.
pub const DEFAULT_TOKEN_URL: &str = "https://api.infusionsoft.com/token";

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
    /// `None` when nothing is configured; commands that talk to Keap call
    /// [`Config::credential`](super::Config::credential).
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

#[derive(Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(super) struct FileKeap {
    pub(super) api_url: String,
    pub(super) token_url: String,
    pub(super) authorize_url: String,
    pub(super) redirect_uri: Option<String>,
    pub(super) client_id: Option<String>,
    /// Where secrets are, never the secrets themselves.
    pub(super) client_secret_file: Option<PathBuf>,
    pub(super) api_key_file: Option<PathBuf>,
    pub(super) request_timeout_secs: u64,
    pub(super) connect_timeout_secs: u64,
    pub(super) refresh_margin_secs: u64,
    pub(super) refresh_token_max_age_days: u64,
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

impl FileKeap {
    /// `[keap]` checked: each URL by [`keap_url`], timeouts positive, and a refresh token's maximum age
    /// below the 45 days after which Keap lets it lapse.
    pub(super) fn validate(self, credential: Option<Credential>) -> Result<KeapConfig, ConfigError> {
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

/// A URL keap-sync sends credentials to, or has Keap send the browser to, without trailing
/// slashes: https only, except on a loopback host (localhost, 127.0.0.0/8, ::1), where the
/// tests and the demo serve plain http (ARCHITECTURE.md, invariant 16). A user name or
/// password inside it is refused without echoing the value.
pub(super) fn keap_url(key: &str, value: String) -> Result<String, ConfigError> {
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
pub(super) fn is_loopback_host(url: &reqwest::Url) -> bool {
    let Some(host) = url.host_str() else { return false };
    if host.eq_ignore_ascii_case("localhost") {
        return true;
    }
    let bare = host.strip_prefix('[').and_then(|h| h.strip_suffix(']')).unwrap_or(host);
    bare.parse::<std::net::IpAddr>().is_ok_and(|ip| ip.is_loopback())
}
