//! Which gone instances' claims the delivery lock's holder may release, and when.
//!
//! An instance none of whose database sessions is connected any more looks the same from the
//! database whether it was killed, is alive on the other side of a database fail-over, or runs
//! under a role whose sessions this one cannot see. Releasing its claims at once lets a second
//! call for a user go out while the first may still be on the wire (two calls for one user at
//! once, ARCHITECTURE.md invariant 3). So its claims are released only when it cannot be
//! calling any more:
//!
//! - **Dead for certain:** it ran on this host and its process is gone (no `/proc/<pid>`).
//!   This is the common case (a SIGKILL, a crash, a restart), and its claims go at once.
//! - **Silent for long enough:** its last heartbeat is older than [`grace`]: the longest one
//!   delivery's calls can take, plus a heartbeat. A live instance heartbeats every few seconds
//!   whatever its sessions look like from here, so it never gets that old.
//!
//! A process hidden from this one's `/proc` (a unit with `ProtectProc=invisible` under another
//! user on the same host) would pass for dead: instances of one deployment on one host run as
//! one user (`systemd/`).

use std::path::Path;
use std::time::Duration;

use crate::config::Config;
use crate::outbox::Orphan;

/// How long after its last heartbeat an instance with no session left may still have a call to
/// Keap on the wire: the longest a delivery's calls can take (a call and its retry after a 401,
/// each with its connection; what `delivery.lease_secs` must exceed) and one heartbeat.
pub(super) fn grace(config: &Config, heartbeat: Duration) -> Duration {
    let keap = &config.keap;
    keap.connect_timeout.saturating_add(keap.request_timeout).saturating_mul(2).saturating_add(heartbeat)
}

/// The instances among `orphans` whose claims can be released now, by this instance on `host`.
pub(super) fn releasable(orphans: &[Orphan], host: &str, grace: Duration) -> Vec<String> {
    orphans
        .iter()
        .filter(|o| o.silent_for >= grace || (o.host == host && process_gone(o.pid)))
        .map(|o| o.instance.clone())
        .collect()
}

/// Whether process `pid` of this host is certainly gone: procfs is there and has no entry for
/// it. Without procfs nothing is certain.
fn process_gone(pid: i32) -> bool {
    Path::new("/proc/self").exists() && !Path::new(&format!("/proc/{pid}")).exists()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn orphan(host: &str, pid: i32, silent_secs: u64) -> Orphan {
        Orphan {
            instance: format!("{host}:{pid}"),
            host: host.into(),
            pid,
            silent_for: Duration::from_secs(silent_secs),
        }
    }

    #[test]
    fn only_a_dead_local_process_or_a_long_silence_releases() {
        let grace = Duration::from_secs(85);
        let alive = std::process::id() as i32;
        let orphans = [
            orphan("here", alive, 1),     // alive here: kept
            orphan("here", i32::MAX, 1),  // no such process here: released
            orphan("there", i32::MAX, 1), // elsewhere, heartbeat fresh: kept
            orphan("there", 7, 90),       // elsewhere, silent past the grace: released
        ];
        assert_eq!(releasable(&orphans, "here", grace), [format!("here:{}", i32::MAX), "there:7".to_owned()]);
    }
}
