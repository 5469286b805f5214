//! `[mirror]`: how the daemon keeps keap-sync's picture of Keap fresh, by sweeping the
//! contacts Keap changed (the v2 listing filtered by update time).

use std::time::Duration;

use serde::Deserialize;

use super::ConfigError;

/// The daemon's sweep of Keap's changes into the mirror (`keap_sync.mirror`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MirrorConfig {
    /// How often the active daemon lists the contacts Keap changed since the last sweep, when
    /// no change is waiting for delivery; `None`: never (`reconcile` still refreshes it).
    pub sweep: Option<Duration>,
    /// How far behind now a sweep's window ends: Keap's listing by update time may not show a
    /// write at once (unverified), so the last moments are left to the next sweep.
    pub lag: Duration,
    /// How far before the last sweep's end the next one starts, so a contact whose update time
    /// was recorded late is still seen.
    pub overlap: Duration,
}

/// Sweep every 5 minutes, 60 s behind now, overlapping the last window by 5 minutes.
#[derive(Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(super) struct FileMirror {
    pub(super) sweep_secs: u64,
    pub(super) lag_secs: u64,
    pub(super) overlap_secs: u64,
}

impl Default for FileMirror {
    fn default() -> Self {
        FileMirror { sweep_secs: 300, lag_secs: 60, overlap_secs: 300 }
    }
}

impl FileMirror {
    /// `sweep_secs = 0` turns the sweep off; a day or more of lag would leave the mirror stale.
    pub(super) fn validate(self) -> Result<MirrorConfig, ConfigError> {
        if self.lag_secs >= 86_400 || self.overlap_secs >= 86_400 {
            return Err(ConfigError::Invalid(
                "mirror.lag_secs and mirror.overlap_secs must each be under a day (86400)".into(),
            ));
        }
        Ok(MirrorConfig {
            sweep: (self.sweep_secs > 0).then(|| Duration::from_secs(self.sweep_secs)),
            lag: Duration::from_secs(self.lag_secs),
            overlap: Duration::from_secs(self.overlap_secs),
        })
    }
}
