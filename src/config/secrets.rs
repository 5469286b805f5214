//! The Keap credential and other secrets: from the environment, a file the config names, or a
//! systemd credential; never from the TOML itself.

use std::path::Path;

use super::keap::FileKeap;
use super::{ConfigError, Credential, Secret};

/// The Keap credential: an API key wins over an OAuth client; both halves of a client or neither.
pub(super) fn read_credential(
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
pub(super) fn read_secret(
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

/// The secret in the file at `path`, trimmed; an unreadable or empty file is an error naming `what`.
pub(super) fn secret_from_file(path: &Path, what: &str) -> Result<Secret, ConfigError> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| ConfigError::Invalid(format!("cannot read {what} {}: {e}", path.display())))?;
    let value = text.trim();
    if value.is_empty() {
        return Err(ConfigError::Invalid(format!("{what} {} is empty", path.display())));
    }
    Ok(Secret::new(value))
}
