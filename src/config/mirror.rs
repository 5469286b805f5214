//! `[mirror]`: how the daemon keeps keap-sync's picture of Keap fresh, by sweeping the
//! contacts Keap changed (the v2 listing filtered by update time).

use std::time::Duration;

use serde::Deserialize;

use super::ConfigError;

/// The longest period of the scheduled report, in hours: 30 days.
const MAX_RECONCILE_HOURS: u64 = 720;

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
    /// Whether a new user's contact is looked up in the mirror instead of by a call per user
    /// (`GET /v1/contacts?email=…`), once a full listing has filled it. A backfill then starts
    /// with that listing when the mirror has none.
    pub lookups: bool,
    /// How old the mirror's knowledge of Keap's latest changes may be when it answers a
    /// lookup: older, and the contacts Keap changed since are listed first (one call, shared
    /// by every lookup in that time). This bounds the window in which a contact made in Keap
    /// by someone else can be missed.
    pub confirm: Duration,
    /// How often the active daemon runs the drift report (`keap-sync reconcile` without
    /// `--apply`: a full listing, then every user) and logs its counts; `None`: never.
    pub reconcile: Option<Duration>,
}

/// Sweep every 5 minutes, 60 s behind now, overlapping the last window by 5 minutes; answer
/// lookups from the mirror, with Keap's changes listed at most 10 s before; no scheduled report.
#[derive(Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(super) struct FileMirror {
    pub(super) sweep_secs: u64,
    pub(super) lag_secs: u64,
    pub(super) overlap_secs: u64,
    pub(super) lookups: bool,
    pub(super) confirm_secs: u64,
    pub(super) reconcile_hours: u64,
}

impl Default for FileMirror {
    fn default() -> Self {
        FileMirror {
            sweep_secs: 300,
            lag_secs: 60,
            overlap_secs: 300,
            lookups: true,
            confirm_secs: 10,
            reconcile_hours: 0,
        }
    }
}

impl FileMirror {
    /// `sweep_secs = 0` turns the sweep off; a day or more of lag would leave the mirror stale,
    /// and a lookup must not trust a picture of Keap more than an hour old. `reconcile_hours = 0`
    /// turns the scheduled report off; each run lists every contact (a call per 1,000), so it
    /// runs at most hourly, and at least monthly when on.
    pub(super) fn validate(self) -> Result<MirrorConfig, ConfigError> {
        if self.lag_secs >= 86_400 || self.overlap_secs >= 86_400 {
            return Err(ConfigError::Invalid(
                "mirror.lag_secs and mirror.overlap_secs must each be under a day (86400)".into(),
            ));
        }
        if !(1..=3_600).contains(&self.confirm_secs) {
            return Err(ConfigError::Invalid(format!(
                "mirror.confirm_secs = {} is out of range: give 1 to 3600 seconds (10 is the default), \
                 or set mirror.lookups = false to look every new user up in Keap instead",
                self.confirm_secs
            )));
        }
        if self.reconcile_hours > MAX_RECONCILE_HOURS {
            return Err(ConfigError::Invalid(format!(
                "mirror.reconcile_hours = {} is out of range: give 1 to {MAX_RECONCILE_HOURS} hours between \
                 the daemon's drift reports (24: daily), or 0 to turn them off",
                self.reconcile_hours
            )));
        }
        Ok(MirrorConfig {
            sweep: (self.sweep_secs > 0).then(|| Duration::from_secs(self.sweep_secs)),
            lag: Duration::from_secs(self.lag_secs),
            overlap: Duration::from_secs(self.overlap_secs),
            lookups: self.lookups,
            confirm: Duration::from_secs(self.confirm_secs),
            reconcile: (self.reconcile_hours > 0).then(|| Duration::from_secs(self.reconcile_hours * 3_600)),
        })
    }
}
