//! The queue, for information: what `keap-sync status` reads (`status::read`), in one line.
//! A backlog, parked changes or no daemon running is the state of the sync, not a broken
//! prerequisite, so this check is met whatever the numbers are; it fails only when the queue
//! cannot be read.

use super::{Check, QUEUE};
use crate::db::DbError;
use crate::status::{human_secs, InstanceRole, Status};

/// The queue's depth, the parked changes, the oldest pending change and the instances running.
pub(super) fn check(status: &Result<Status, DbError>) -> Check {
    let s = match status {
        Ok(s) => s,
        Err(e) => {
            return Check::fail(QUEUE, format!("cannot read the queue: {e}"), "see the server's message")
        }
    };
    let o = &s.outbox;
    let parked = match o.parked {
        0 => "0 parked".to_owned(),
        n => format!("{n} parked (`keap-sync failures list` says why)"),
    };
    let oldest = s
        .oldest_pending_age_secs
        .map_or_else(|| "nothing pending".to_owned(), |age| format!("oldest pending {}", human_secs(age)));
    let active = s.instances_alive.iter().filter(|i| i.role == InstanceRole::Active).count();
    let instances = match (s.instances_alive.len(), active) {
        (0, _) => "no daemon running".to_owned(),
        (n, a) => format!("{n} daemon instances running ({a} active)"),
    };
    Check::ok(
        QUEUE,
        format!(
            "{} live, {} retrying, {} backfill, {parked}; {} captured not yet queued; {oldest}; {instances}",
            o.live, o.retry, o.backfill, o.captured
        ),
    )
}
