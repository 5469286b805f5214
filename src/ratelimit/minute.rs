//! The per-minute window: an exact sliding log of calls, and the permit an admitted call holds
//! until it has ended.

use std::collections::VecDeque;

use tokio::time::Instant;

use super::{Limiter, MINUTE};

/// The exact sliding log of the per-minute window (see the module docs).
pub(super) struct MinuteLog {
    /// The limit in force: the configured one, or a lower one Keap reported.
    pub(super) limit: u32,
    /// Admitted calls that have not ended yet: they count until 60 s after they end.
    pub(super) in_flight: u32,
    /// When each call of the last 60 s ended, oldest first (pushed under the lock with the time
    /// read under it, so the order holds).
    pub(super) ended: VecDeque<Instant>,
}

impl MinuteLog {
    /// Drops the calls that ended 60 s or more before `now`: they no longer count in the window.
    fn forget_old(&mut self, now: Instant) {
        while self.ended.front().is_some_and(|t| now.saturating_duration_since(*t) >= MINUTE) {
            self.ended.pop_front();
        }
    }

    /// `None` if a call fits now, else the earliest moment one could.
    pub(super) fn next_slot(&mut self, now: Instant) -> Option<Instant> {
        self.forget_old(now);
        let counted = self.in_flight as usize + self.ended.len();
        let limit = self.limit.max(1) as usize;
        if counted < limit {
            return None;
        }
        // `counted - limit + 1` calls must age out (more than one if the limit was lowered),
        // oldest first. If calls still in flight must end too, each of them frees its slot 60 s
        // after an end still to come: now + 60 s is the earliest, and the sender looks again then.
        Some(self.ended.get(counted - limit).map_or(now + MINUTE, |t| *t + MINUTE))
    }
}

/// One admitted call. Hold it until the call has ended (an answer, an error, or abandoned):
/// dropping it starts the 60 s after which its per-minute slot is free again.
#[must_use = "the call's per-minute slot is counted from when the permit drops"]
pub(crate) struct Permit<'a> {
    pub(super) limiter: &'a Limiter,
}

impl Drop for Permit<'_> {
    fn drop(&mut self) {
        let mut w = self.limiter.windows();
        w.minute.in_flight = w.minute.in_flight.saturating_sub(1);
        // Read under the lock, so `ended` stays in order.
        let now = Instant::now();
        w.minute.ended.push_back(now);
    }
}
