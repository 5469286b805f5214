//! `[hooks]`: the receiver of Keap's REST hooks (issue 29, scope 4). Off unless `listen` is
//! set. Keap only calls `https://` URLs, so the receiver speaks plain HTTP on a local address
//! and a reverse proxy (TLS) forwards `https://<host>/<path>` to it.
//!
//! ```toml
//! [hooks]
//! listen = "127.0.0.1:9188"
//! watch_secs = 300   # the watchdog: re-verify a hook that is not Verified (0: off)
//! # path: KEAP_SYNC_HOOK_PATH, `path_file`, or the systemd credential `keap-hook-path`
//! ```
//!
//! The path is the receiver's only authentication (Keap signs nothing): an unguessable segment,
//! read like the other secrets (never from the TOML itself) and never printed.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use super::secrets::read_secret;
use super::{ConfigError, Secret};

/// The shortest path secret accepted: 22 characters of `[A-Za-z0-9_-]` carry 128 bits.
const MIN_PATH_LEN: usize = 22;

/// The watchdog's default period: Keap's last retry comes 30 min after the first, so a hook
/// that went Inactive is found within a sixth of that.
const DEFAULT_WATCH_SECS: u64 = 300;

/// The hook receiver.
#[derive(Debug, Clone)]
pub struct HooksConfig {
    /// Where the receiver listens (plain HTTP; loopback unless a proxy elsewhere must reach it).
    pub listen: SocketAddr,
    /// The secret path segment: Keap posts to `https://<proxy>/<path>`. `Debug` shows no value.
    pub path: Secret,
    /// How often the active daemon, when idle, lists our hooks and verifies again one that is
    /// not Verified (`watch_secs`, default 300; 0: never). `None`: off.
    pub watch: Option<Duration>,
}

/// Off unless `listen` is set.
#[derive(Debug, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(super) struct FileHooks {
    pub(super) listen: Option<String>,
    pub(super) path_file: Option<PathBuf>,
    pub(super) watch_secs: Option<u64>,
}

impl FileHooks {
    /// The receiver's settings, with its path from `KEAP_SYNC_HOOK_PATH`, `path_file` or the
    /// credential `keap-hook-path`; `None` when `listen` is not set.
    pub(super) fn validate(
        self,
        base_dir: &Path,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<Option<HooksConfig>, ConfigError> {
        let Some(text) = self.listen else { return Ok(None) };
        let listen: SocketAddr = text.parse().map_err(|_| {
            ConfigError::Invalid(format!("hooks.listen = {text:?} is not an address like 127.0.0.1:9188"))
        })?;
        let file = self.path_file.as_deref();
        let path =
            read_secret(env, base_dir, "KEAP_SYNC_HOOK_PATH", "hooks.path_file", file, "keap-hook-path")?
                .ok_or_else(|| {
                    ConfigError::Missing(
                        "hooks.listen is set but the receiver has no secret path: set KEAP_SYNC_HOOK_PATH, \
                     `path_file` under [hooks], or a systemd credential named keap-hook-path \
                     (e.g. the output of `openssl rand -hex 24`)"
                            .into(),
                    )
                })?;
        let p = path.expose();
        let usable = |c: char| c.is_ascii_alphanumeric() || c == '-' || c == '_';
        if p.len() < MIN_PATH_LEN || !p.chars().all(usable) {
            return Err(ConfigError::Invalid(format!(
                "the hook receiver's secret path must be at least {MIN_PATH_LEN} characters of A-Z, a-z, \
                 0-9, '-' and '_' (e.g. the output of `openssl rand -hex 24`); the one given is not \
                 (its value is not shown)"
            )));
        }
        let watch_secs = self.watch_secs.unwrap_or(DEFAULT_WATCH_SECS);
        let watch = (watch_secs > 0).then(|| Duration::from_secs(watch_secs));
        Ok(Some(HooksConfig { listen, path, watch }))
    }
}
