//! The hooks' watchdog (`[hooks] watch_secs`): Keap gives up on a receiver after four tries
//! over about 36 minutes and marks the hook Inactive, and then sends nothing more until it is
//! verified again. So the active daemon, when idle, lists our hooks every `watch_secs`:
//!
//! - one not Verified is verified again (logged), which works once the receiver answers;
//! - finding one not Verified means deliveries were dropped, so the next sweep is brought
//!   forward to now: the sweep's listing by update time finds what the hooks did not bring;
//! - while any of ours is not Verified, the sweep runs every `sweep_secs / 5` (at least 30 s,
//!   never slower than `sweep_secs`), so nothing waits long for a hook that will not come;
//! - what it found goes to `keap_sync.hook_state` (`status`), the `keap_sync_hooks` gauge and
//!   `/healthz` (degraded, not failing, while one is not Verified).
//!
//! Started like the sweep: one of the session's `tasks`, only when none is in flight; its
//! calls share the limiter and the day's quota. It tells the session what it found through two
//! flags (the task cannot touch the session), read by [`Session::sweep_when_idle`].

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use super::session::Session;
use crate::db::Db;
use crate::deliver::Outcome;
use crate::hooks::{self, HookApi, Survey, VERIFIED};
use crate::keap::KeapClient;
use crate::metrics::Metrics;
use crate::secret::Secret;
use crate::token::{TokenError, TokenSource};

/// The fastest the sweep runs while a hook is not Verified.
const FAST_SWEEP_FLOOR: Duration = Duration::from_secs(30);

/// What the watchdog found, for the session: shared with its task.
#[derive(Debug, Default)]
pub(super) struct HookWatch {
    /// One of our hooks is not Verified: the sweep runs at [`sweep_period`]'s faster pace.
    pub(super) unverified: AtomicBool,
    /// Deliveries were missed: the next sweep is due now (taken by the sweep).
    pub(super) sweep_now: AtomicBool,
}

/// The sweep's period: `every`, or a fifth of it (at least [`FAST_SWEEP_FLOOR`], at most
/// `every`) while one of our hooks is not Verified.
pub(super) fn sweep_period(every: Duration, unverified: bool) -> Duration {
    if unverified {
        (every / 5).max(FAST_SWEEP_FLOOR).min(every)
    } else {
        every
    }
}

/// What one look needs, moved into its task.
struct Look {
    db: Arc<Db>,
    keap: KeapClient,
    tokens: Arc<TokenSource>,
    metrics: Arc<Metrics>,
    path: Secret,
    timeout: Duration,
    found: Arc<HookWatch>,
}

impl Session<'_> {
    /// Starts a look at our hooks when one is due and no task is in flight; returns how long
    /// the loop may wait: until it is due, at most `wait`.
    pub(super) fn watch_hooks_when_idle(&mut self, wait: Duration) -> Duration {
        let Some(hooks) = &self.ctx.config.hooks else { return wait };
        let Some(every) = hooks.watch else { return wait };
        let now = Instant::now();
        if now < self.next_watch {
            return wait.min(self.next_watch - now);
        }
        if !self.tasks.is_empty() {
            return wait;
        }
        self.next_watch = now + every;
        let look = Look {
            db: Arc::clone(&self.db),
            keap: self.ctx.keap.clone(),
            tokens: Arc::clone(&self.ctx.tokens),
            metrics: Arc::clone(&self.ctx.metrics),
            path: hooks.path.clone(),
            timeout: self.ctx.config.keap.request_timeout,
            found: Arc::clone(&self.hook_watch),
        };
        self.tasks.spawn(look.run());
        wait.min(every)
    }
}

impl Look {
    /// Lists our hooks, verifies again those not Verified, and records what it found.
    async fn run(self) -> Outcome {
        let auth = match self.tokens.auth(&self.db).await {
            Ok(auth) => auth,
            Err(TokenError::Db(e)) => return Outcome::DbLost(e),
            Err(e) => {
                tracing::warn!(error = %e, "hook watchdog: no usable credential; looking again later");
                return Outcome::Handled;
            }
        };
        // Lists and verifies only: which keys to subscribe is `install`'s business.
        let api =
            HookApi { keap: &self.keap, auth: &auth, timeout: self.timeout, path: &self.path, tags: false };
        let survey = match self.look(&api).await {
            Ok(survey) => survey,
            Err(e) => {
                tracing::warn!(error = %e, "hook watchdog: could not list the hooks; looking again later");
                return Outcome::Handled;
            }
        };
        let states: Vec<&str> = survey.ours.iter().map(|h| h.status.as_str()).collect();
        self.metrics.set_hooks(&states);
        self.found.unverified.store(states.iter().any(|s| *s != VERIFIED), Ordering::Relaxed);
        match hooks::record(&self.db, &survey).await {
            Err(e) if e.is_connection_lost() => Outcome::DbLost(e),
            Err(e) => {
                tracing::warn!(error = %e, "hook watchdog: could not record the hooks' states");
                Outcome::Handled
            }
            Ok(()) => Outcome::Handled,
        }
    }

    /// Our hooks; those not Verified are verified again first (and the sweep brought forward).
    async fn look(&self, api: &HookApi<'_>) -> Result<Survey, hooks::HookError> {
        let found = api.status().await?;
        let bad: Vec<_> = found.ours.iter().filter(|h| h.status != VERIFIED).collect();
        if bad.is_empty() {
            return Ok(found);
        }
        self.found.sweep_now.store(true, Ordering::Relaxed);
        for h in &bad {
            tracing::warn!(event_key = %h.event_key, state = %h.status, "a Keap hook of ours is not Verified: Keap dropped its deliveries; sweeping now and verifying it again");
        }
        let after = api.verify(false).await?;
        for h in &after.ours {
            if bad.iter().any(|b| b.key == h.key) {
                match h.status.as_str() {
                    VERIFIED => {
                        tracing::info!(event_key = %h.event_key, "a Keap hook of ours is Verified again")
                    }
                    state => {
                        tracing::warn!(event_key = %h.event_key, state, "a Keap hook of ours is still not Verified: does the reverse proxy reach the receiver?")
                    }
                }
            }
        }
        Ok(after)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_sweep_runs_faster_while_a_hook_is_not_verified() {
        let s = Duration::from_secs;
        assert_eq!(sweep_period(s(300), false), s(300));
        assert_eq!(sweep_period(s(300), true), s(60));
        assert_eq!(sweep_period(s(60), true), s(30));
        assert_eq!(sweep_period(s(10), true), s(10));
    }
}
