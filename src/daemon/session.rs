//! One connected, delivering stretch: the loop that folds captured changes, claims, spawns
//! deliveries and reads their outcomes, and pauses while Keap refuses the credential.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Notify;
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::{orphans, Context, HEARTBEAT};
use crate::db::{self, DbError};
use crate::deliver::{Deliverer, Outcome};
use crate::mirror::{self, InboundError, MirrorError};
use crate::outbox;
use crate::schema;
use crate::status::InstanceRole;
use crate::token::TokenError;

/// While paused for authorisation, how often the token store is checked (a NOTIFY from
/// `auth import` wakes the loop sooner).
const AUTH_RECHECK: Duration = Duration::from_secs(5);

/// After Keap refuses a credential that should work (a 403, or a 401 even with a freshly
/// refreshed token), deliveries pause this long before one probe delivery tries again...
const REFUSED_FIRST_PROBE: Duration = Duration::from_secs(5);

/// ...and twice as long after each refused probe, up to this. Constants, not settings: the
/// cause is on Keap's side or needs a person, and at the cap a refusal costs one probe (two
/// calls and a refresh at most) every 5 minutes, a few hundred calls a day.
const REFUSED_MAX_PROBE: Duration = Duration::from_secs(300);

/// How often an idle daemon checks whether its OAuth grant needs a refresh (near expiry, or
/// a refresh token old enough that it could lapse).
const TOKEN_CHECK: Duration = Duration::from_secs(60);

/// How soon the loop claims again when a due change was skipped because an open transaction
/// holds its row. Usually the holder is an application transaction that changed the user, and
/// its commit sends a NOTIFY that wakes the loop at once; this only bounds the wait for other
/// holders (a `select … for update` in psql, say) at one claim a second, instead of a re-claim
/// every few milliseconds for as long as the transaction stays open.
const LOCKED_RECHECK: Duration = Duration::from_secs(1);

/// How often the change log is folded without a notification. Every capturing commit notifies
/// and a new session folds first, so this only bounds how long a change can wait if a
/// notification was somehow not heard; it stays off the hot path.
const FOLD_SWEEP: Duration = Duration::from_secs(30);

/// How often the loop looks at the hook queue without a wake-up from its own receiver: ids
/// queued by another instance's receiver (a standby's) wait this long at most.
const HOOK_CHECK: Duration = Duration::from_secs(5);

/// Without `[hooks]` (no receiver queues anything) the same pass only confirms the contacts a
/// full listing suspected gone: it runs after each of the daemon's sweeps (the first may list
/// all), and every this long for those the drift report or another process (`reconcile`)
/// queued.
const GONE_CHECK: Duration = Duration::from_secs(60);

/// Deliveries paused because Keap refuses a credential that should work (a 403, or a 401 even
/// with a freshly refreshed token): a loop of calls (and refreshes) would only burn the day's
/// quota, and parking would blame every change for the credential's fault. One probe delivery
/// at a time tries again after [`REFUSED_FIRST_PROBE`], doubling to [`REFUSED_MAX_PROBE`];
/// the pause ends when Keap accepts a probe's call.
pub(super) struct Refusal {
    /// Keap's answer and what a person can do about it.
    pub(super) reason: String,
    /// The wait before the next probe.
    pub(super) delay: Duration,
    pub(super) next_probe: Instant,
    /// The probe delivery in flight, if any: only its outcome ends or extends the pause.
    pub(super) probe: Option<tokio::task::Id>,
}

/// The state of one connected, delivering stretch. Owned by the session's loop alone, so none
/// of it needs a lock.
pub(super) struct Session<'a> {
    pub(super) ctx: &'a Context,
    /// Shared with every delivery; prepares the statements of the delivery path once.
    pub(super) db: Arc<db::Db>,
    /// The LISTEN connection; also holds the delivery lock (a session-level advisory lock).
    pub(super) listener: db::Listener,
    /// Woken by every notification (a stored permit covers one that arrives between waits).
    pub(super) wake: Arc<Notify>,
    pub(super) deliverer: Arc<Deliverer>,
    /// Deliveries (and the idle token check) in flight; at most `delivery.concurrency`.
    pub(super) tasks: JoinSet<Outcome>,
    /// Why deliveries are paused (authorisation needed, or Keap refusing the credential), if
    /// they are: what the heartbeat reports to `status` and `/healthz`.
    pub(super) paused: Option<String>,
    /// While Keap refuses the credential: the probe schedule (`paused` says why).
    pub(super) refusal: Option<Refusal>,
    /// Set by a task that found the connection gone; ends the session at the next turn.
    pub(super) lost: Option<DbError>,
    /// When the idle token check last ran. `None`: not yet in this session, so it runs at once.
    /// (Not `now() - interval`: the monotonic clock starts at boot, and a service can start
    /// within a minute of it.)
    pub(super) token_checked: Option<Instant>,
    /// When the heartbeat last ran; `None` as above.
    pub(super) beat: Option<Instant>,
    /// What is wrong with capture (trigger, key, synced columns), as the last check found it.
    pub(super) capture: Option<schema::CaptureProblem>,
    /// When capture was last checked; `None` as above.
    pub(super) capture_checked: Option<Instant>,
    /// Whether the change log may hold changes to fold into the outbox: set by a notification
    /// (every capturing commit sends one), by a fold that filled its batch, and at the start
    /// of a session (a new LISTEN connection: notifications sent before it were not heard).
    pub(super) fold_due: bool,
    /// When to fold without a notification: [`FOLD_SWEEP`] after the last fold, or a poll
    /// interval after one that had to leave changes in the log.
    pub(super) next_fold: Instant,
    /// When the next sweep of Keap's changes into the mirror is due (`[mirror] sweep_secs`).
    pub(super) next_sweep: Instant,
    /// When to look again whether the drift report is due (`[mirror] reconcile_hours`;
    /// `super::report`).
    pub(super) next_report: Instant,
    /// Whether the hook queue may hold ids, or contacts wait to be confirmed gone: set at the
    /// start, by the receiver's wake-up, when a sweep starts, and every
    /// [`HOOK_CHECK`] (with `[hooks]`) or [`GONE_CHECK`]; cleared when a pass is started.
    pub(super) hooks_due: bool,
    /// When to look at the hook queue without a wake-up.
    pub(super) next_hook_check: Instant,
    /// When the hook watchdog looks next (`[hooks] watch_secs`; `super::watch`).
    pub(super) next_watch: Instant,
    /// What the watchdog found: a hook not Verified, missed deliveries.
    pub(super) hook_watch: Arc<super::watch::HookWatch>,
}

impl Session<'_> {
    /// Turns the loop until a stop (`Ok`) or a lost connection (`Err`).
    pub(super) async fn deliver(&mut self, stop: &CancellationToken) -> Result<(), DbError> {
        loop {
            if stop.is_cancelled() {
                return Ok(());
            }
            if let Some(e) = self.lost.take() {
                return Err(e);
            }
            let wait = self.turn().await?;
            self.wait(wait, stop).await;
        }
    }

    /// We hold the delivery lock, so no other instance is delivering: the claims of one whose
    /// sessions are all gone are released once it cannot be calling Keap any more
    /// ([`orphans`]).
    pub(super) async fn release_orphaned_claims(&self) -> Result<(), DbError> {
        let found = outbox::orphans(&self.db, &self.ctx.instance).await?;
        if found.is_empty() {
            return Ok(());
        }
        let grace = orphans::grace(&self.ctx.config, HEARTBEAT);
        let gone = orphans::releasable(&found, &self.ctx.host, grace);
        let released = outbox::release_instances(&self.db, &gone).await?;
        if released > 0 {
            tracing::info!(released, instances = ?gone, "released the claims of an instance that is gone");
        }
        Ok(())
    }

    /// One turn: heartbeat when due, then either check whether a pause can end or start work.
    /// Returns how long to wait for something to happen.
    pub(super) async fn turn(&mut self) -> Result<Duration, DbError> {
        // The loop turns at least every HEARTBEAT, whatever else waits (a quota pause waits
        // inside the deliveries), so the watchdog keeps being fed.
        self.ctx.notifier.watchdog();
        let wait = self.ctx.config.delivery.poll_interval.min(TOKEN_CHECK).min(HEARTBEAT);
        self.check_capture_when_due().await?;
        if self.beat.is_none_or(|t| t.elapsed() >= HEARTBEAT) {
            self.beat = Some(Instant::now());
            let reason = match (&self.paused, &self.capture) {
                (Some(p), Some(c)) => Some(format!("{p}; {}", c.message)),
                (p, c) => p.clone().or_else(|| c.as_ref().map(|c| c.message.clone())),
            };
            self.ctx.metrics.set_fatal(reason.clone());
            self.ctx.heartbeat(&self.db, InstanceRole::Active, reason.as_deref()).await?;
            // Checked on every heartbeat, not only after taking the lock, since a killed
            // instance's backend may take a moment to exit.
            self.release_orphaned_claims().await?;
        }
        if self.capture.as_ref().is_some_and(|c| c.blocks_reads) {
            // No user can be read as configured: claiming (and folding, which reads the key)
            // would only fail.
            return Ok(wait);
        }
        // Whatever else pauses deliveries, captured changes reach the outbox: it coalesces
        // them per user, and `status` counts them there.
        self.fold_when_due().await?;
        let wait = if self.refusal.is_some() {
            self.probe_when_due(wait).await?
        } else if self.paused.is_some() {
            self.check_pause().await?
        } else {
            self.check_token_when_due();
            let wait = self.claim_when_free(wait).await?;
            let wait = self.read_hooked_when_idle(wait);
            let wait = self.watch_hooks_when_idle(wait);
            let wait = self.sweep_when_idle(wait);
            self.report_when_idle(wait).await?
        };
        // A fold that filled its batch left more in the log: turn again at once.
        Ok(if self.fold_due {
            Duration::ZERO
        } else {
            wait.min(self.next_fold.saturating_duration_since(Instant::now()))
        })
    }

    /// Checks capture (the triggers, the key and synced columns) every `delivery.capture_check`,
    /// not only at start: a trigger dropped or disabled, or a column renamed, while the daemon
    /// runs would otherwise lose changes silently. A change of state is logged and reported by
    /// the next heartbeat at once (`status`, `/healthz`).
    pub(super) async fn check_capture_when_due(&mut self) -> Result<(), DbError> {
        if self.capture_checked.is_some_and(|t| t.elapsed() < self.ctx.config.delivery.capture_check) {
            return Ok(());
        }
        self.capture_checked = Some(Instant::now());
        let found = schema::capture_problem(&**self.db, &self.ctx.config.users).await?;
        if found != self.capture {
            match &found {
                Some(p) => tracing::error!(problem = %p.message, "capture is broken"),
                None => tracing::info!("capture works again"),
            }
            self.beat = None;
            self.capture = found;
        }
        Ok(())
    }

    /// Folds the change log into the outbox when a notification (or a full batch) says there
    /// may be something to fold, and at `next_fold` in any case. A fold that fails for a
    /// reason other than the connection (the generated function missing or out of step with
    /// the config: the capture check reports that) is logged and tried again a poll interval
    /// later; the changes stay in the log.
    pub(super) async fn fold_when_due(&mut self) -> Result<(), DbError> {
        let now = Instant::now();
        if !self.fold_due && now < self.next_fold {
            return Ok(());
        }
        let poll = self.ctx.config.delivery.poll_interval;
        self.fold_due = false;
        self.next_fold = now + FOLD_SWEEP;
        match outbox::fold(&self.db).await {
            Ok(folded) => {
                // A full batch: more may be waiting; fold again next turn, after the claims.
                self.fold_due = folded.taken >= outbox::FOLD_BATCH;
                if folded.held > 0 {
                    tracing::warn!(users = folded.held, "an open transaction holds the outbox row of some changed users (a key change not yet committed); their changes wait in keap_sync.change until it ends");
                    self.next_fold = now + poll;
                }
                Ok(())
            }
            Err(e) if e.is_connection_lost() => Err(e),
            Err(e) => {
                tracing::error!(error = %e, detail = %e.server_message(), "cannot move captured changes into the outbox; they stay in keap_sync.change (run `keap-sync migrate` if the config changed)");
                self.next_fold = now + poll;
                Ok(())
            }
        }
    }

    /// While paused: resumes (and turns again at once) when the credential is usable again,
    /// else looks again after [`AUTH_RECHECK`].
    pub(super) async fn check_pause(&mut self) -> Result<Duration, DbError> {
        match self.ctx.tokens.usable_again(&self.db).await {
            Ok(true) => {
                tracing::info!("Keap credential usable again; resuming deliveries");
                self.paused = None;
                Ok(Duration::ZERO)
            }
            Ok(false) => Ok(AUTH_RECHECK),
            Err(TokenError::Db(e)) => Err(e),
            Err(e) => {
                tracing::warn!(error = %e, "cannot read the token store");
                Ok(AUTH_RECHECK)
            }
        }
    }

    /// Starts the idle token check when due. In a task like a delivery: a refresh may wait on
    /// the token row lock and the token endpoint, and the loop must keep turning (and feeding
    /// the watchdog).
    pub(super) fn check_token_when_due(&mut self) {
        if !self.ctx.tokens.is_oauth() || self.token_checked.is_some_and(|t| t.elapsed() < TOKEN_CHECK) {
            return;
        }
        self.token_checked = Some(Instant::now());
        let (tokens, db) = (Arc::clone(&self.ctx.tokens), Arc::clone(&self.db));
        self.tasks.spawn(async move {
            match tokens.auth(&db).await {
                Ok(_) => Outcome::Handled,
                Err(TokenError::NeedsAuthorization(reason)) => Outcome::NeedsAuthorization(reason),
                Err(TokenError::Db(e)) => Outcome::DbLost(e),
                Err(e) => {
                    tracing::warn!(error = %e, "idle token check failed; will retry");
                    Outcome::Handled
                }
            }
        });
    }

    /// Starts a sweep of Keap's changes into the mirror when one is due and no task is in
    /// flight: no delivery (live changes go first; a sweep's calls share the limiter and the
    /// day's quota) and no sweep (it is one of `tasks`). Returns how long the loop may wait:
    /// until the sweep is due, at most `wait`; while tasks run, the end of one wakes the loop.
    /// While a hook of ours is not Verified the period is shorter, and missed deliveries make
    /// it due at once (`super::watch`).
    pub(super) fn sweep_when_idle(&mut self, wait: Duration) -> Duration {
        let Some(every) = self.ctx.config.mirror.sweep else { return wait };
        let every = super::watch::sweep_period(every, self.hook_watch.unverified.load(Ordering::Relaxed));
        let now = Instant::now();
        if self.hook_watch.sweep_now.swap(false, Ordering::Relaxed) {
            self.next_sweep = now;
        }
        if now < self.next_sweep {
            return wait.min(self.next_sweep - now);
        }
        if !self.tasks.is_empty() {
            return wait;
        }
        self.next_sweep = now + every;
        self.hooks_due = true;
        let db = Arc::clone(&self.db);
        let (client, tokens, mapper) =
            (self.ctx.keap.clone(), Arc::clone(&self.ctx.tokens), Arc::clone(&self.ctx.mapper));
        let (timing, timeout) = (self.ctx.config.mirror.clone(), self.ctx.config.keap.request_timeout);
        let metrics = Arc::clone(&self.ctx.metrics);
        let table = (!self.ctx.table.inbound.is_empty()).then(|| self.ctx.table.clone());
        let (book, catalog) = (Arc::clone(&self.ctx.tag_book), Arc::clone(&self.ctx.catalog));
        self.tasks.spawn(async move {
            let keap = mirror::Keap { client: &client, tokens: &tokens, timeout, retries: mirror::RETRIES };
            let swept = match mirror::sweep(&db, &keap, &mapper, &timing).await {
                Ok(swept) => {
                    tracing::debug!(pages = swept.pages, contacts = swept.contacts, full = swept.full, "swept Keap's changes into the mirror");
                    if let Ok((watermark, drift)) = mirror::gauges(&db).await {
                        metrics.set_mirror(watermark, &drift);
                    }
                    Outcome::Handled
                }
                Err(MirrorError::Db(e)) if e.is_connection_lost() => return Outcome::DbLost(e),
                Err(e) => {
                    tracing::warn!(error = %e, "could not sweep Keap's changes into the mirror; trying again at the next sweep");
                    Outcome::Handled
                }
            };
            // What a sweep cut short did store is applied too: every stored row is due.
            match table {
                Some(table) => {
                    let tags = mirror::Tagging { book: &book, catalog: &catalog, keap: &keap };
                    apply_inbound(&db, &table, tags).await.unwrap_or(swept)
                }
                None => swept,
            }
        });
        wait.min(every)
    }

    /// Starts a pass over the hook queue (`mirror::read_hooked`, then the inbound pass) and
    /// over the contacts waiting for Keap to confirm them gone (`mirror::confirm_gone`) when
    /// one may be due and no task is in flight: like the sweep, it goes after live changes and
    /// its calls share the limiter and the day's quota. Returns how long the loop may wait.
    pub(super) fn read_hooked_when_idle(&mut self, wait: Duration) -> Duration {
        let now = Instant::now();
        if !(self.hooks_due || now >= self.next_hook_check) || !self.tasks.is_empty() {
            return wait.min(self.next_hook_check.saturating_duration_since(now));
        }
        self.hooks_due = false;
        let every = if self.ctx.config.hooks.is_some() { HOOK_CHECK } else { GONE_CHECK };
        self.next_hook_check = now + every;
        let db = Arc::clone(&self.db);
        let (client, tokens, mapper) =
            (self.ctx.keap.clone(), Arc::clone(&self.ctx.tokens), Arc::clone(&self.ctx.mapper));
        let timeout = self.ctx.config.keap.request_timeout;
        let table = self.ctx.table.clone();
        let (book, catalog) = (Arc::clone(&self.ctx.tag_book), Arc::clone(&self.ctx.catalog));
        self.tasks.spawn(async move {
            let keap = mirror::Keap { client: &client, tokens: &tokens, timeout, retries: mirror::RETRIES };
            let read = match mirror::read_hooked(&db, &keap, &mapper).await {
                Ok(read) if read.taken == 0 => {
                    if read.skipped > 0 {
                        tracing::debug!(skipped = read.skipped, "Keap's hooks named only changes the mirror holds (our own writes' echoes); no call");
                    }
                    false
                }
                Ok(read) => {
                    tracing::debug!(calls = read.calls, contacts = read.contacts, taken = read.taken, skipped = read.skipped, "read the contacts Keap's hooks named into the mirror");
                    true
                }
                Err(MirrorError::Db(e)) if e.is_connection_lost() => return Outcome::DbLost(e),
                Err(e) => {
                    tracing::warn!(error = %e, "could not read the contacts Keap's hooks named; they stay queued");
                    // What it did store is applied: every stored row is due.
                    true
                }
            };
            if read && !table.inbound.is_empty() {
                let tags = mirror::Tagging { book: &book, catalog: &catalog, keap: &keap };
                if let Some(lost) = apply_inbound(&db, &table, tags).await {
                    return lost;
                }
            }
            confirm_gone(&db, &keap, &table).await.unwrap_or(Outcome::Handled)
        });
        wait.min(every)
    }

    /// Claims as many changes as there are free delivery slots (unless every sender is paused
    /// by Keap's quota or a 429) and returns how long to wait: until the next change is due, at
    /// most `wait`.
    pub(super) async fn claim_when_free(&mut self, mut wait: Duration) -> Result<Duration, DbError> {
        let free = self.ctx.config.delivery.concurrency.saturating_sub(self.tasks.len());
        // While Keap's quota or a 429 pauses every sender, claiming would only start leases
        // ticking; wait for the pause to end instead.
        if let Some(until) = self.ctx.limiter.paused_until() {
            return Ok(
                wait.min(until.saturating_duration_since(Instant::now()).max(Duration::from_millis(5)))
            );
        }
        // Claim in batches under load: while a quarter of the slots or more are busy, wait for a
        // quarter of them to free up, so that a backlog costs one claim and one read per batch
        // rather than per delivery (each finished delivery wakes the loop). An idle daemon
        // claims what arrives at once.
        let batch = (self.ctx.config.delivery.concurrency / 4).max(1);
        if free == 0 || (free < batch && self.tasks.len() >= batch) {
            return Ok(wait);
        }
        let asked = Instant::now();
        let claimed = self.claim_and_spawn(free).await?.len();
        // The first drain has begun: migrations checked, LISTEN in place.
        self.ctx.mark_ready();
        if claimed < free {
            // Driven by the next *claimable* time: a due row that an open transaction holds is
            // skipped by every claim until it commits, so it must not set the wait to zero.
            let next = outbox::next_due_in(&self.db, self.ctx.claim_timing(), asked.elapsed()).await?;
            if let Some(due) = next.due_in {
                wait = wait.min(due.max(Duration::from_millis(5)));
            }
            if next.skipped_locked {
                wait = wait.min(LOCKED_RECHECK);
            }
        }
        Ok(wait)
    }

    /// Claims up to `free` changes and starts a delivery for each. Returns their task ids.
    pub(super) async fn claim_and_spawn(&mut self, free: usize) -> Result<Vec<tokio::task::Id>, DbError> {
        let timing = self.ctx.claim_timing();
        let claimed_at = Instant::now();
        let claims = outbox::claim(&self.db, &self.ctx.instance, free as i64, timing).await?;
        // Our clock's view of the lease end, with a margin for clock steps and the result write.
        let deadline = claimed_at + timing.lease.mul_f64(0.9);
        if claims.is_empty() {
            return Ok(Vec::new());
        }
        let keys: Vec<String> = claims.iter().map(|c| c.user_key.clone()).collect();
        let mut rows = outbox::read_users(&self.db, &self.ctx.table, &keys).await?;
        let mut ids = Vec::with_capacity(claims.len());
        for claim in claims {
            let row = rows.remove(&claim.user_key);
            let deliverer = Arc::clone(&self.deliverer);
            ids.push(self.tasks.spawn(async move { deliverer.deliver(claim, row, deadline).await }).id());
        }
        Ok(ids)
    }

    /// While Keap refuses the credential: once the backoff has passed and no probe is in
    /// flight, claims one change and delivers it as the probe; its outcome (in [`Self::handle`])
    /// ends the pause or doubles the wait. Returns how long to wait.
    pub(super) async fn probe_when_due(&mut self, wait: Duration) -> Result<Duration, DbError> {
        let Some(refusal) = &self.refusal else { return Ok(wait) };
        let now = Instant::now();
        if refusal.probe.is_some() {
            // Its end wakes the loop.
            return Ok(wait);
        }
        if refusal.next_probe > now {
            return Ok(wait.min(refusal.next_probe - now));
        }
        if let Some(until) = self.ctx.limiter.paused_until() {
            return Ok(wait.min(until.saturating_duration_since(now).max(Duration::from_millis(5))));
        }
        if self.tasks.len() >= self.ctx.config.delivery.concurrency {
            return Ok(wait);
        }
        // With nothing due, no probe starts: the loop looks again after `wait` (a notification
        // wakes it sooner).
        let probe = self.claim_and_spawn(1).await?.first().copied();
        if let (Some(refusal), Some(id)) = (self.refusal.as_mut(), probe) {
            tracing::info!("Keap refused the credential; probing with one delivery");
            refusal.probe = Some(id);
        }
        Ok(wait)
    }

    /// A delivery reported that Keap refuses the credential. Starts the pause, or after a
    /// refused probe doubles the wait for the next one; a refusal from another delivery that
    /// was in flight when the pause began changes only the reason shown.
    pub(super) fn refused(&mut self, reason: String, was_probe: bool) {
        let now = Instant::now();
        let delay = match &mut self.refusal {
            None => {
                tracing::error!(
                    reason = %reason,
                    next_probe_in_secs = REFUSED_FIRST_PROBE.as_secs(),
                    "deliveries paused: Keap refuses the credential; every change stays queued, and one \
                     probe delivery retries at growing intervals until Keap accepts it"
                );
                self.refusal = Some(Refusal {
                    reason,
                    delay: REFUSED_FIRST_PROBE,
                    next_probe: now + REFUSED_FIRST_PROBE,
                    probe: None,
                });
                REFUSED_FIRST_PROBE
            }
            Some(r) if was_probe => {
                r.delay = (r.delay * 2).min(REFUSED_MAX_PROBE);
                r.next_probe = now + r.delay;
                tracing::warn!(reason = %reason, next_probe_in_secs = r.delay.as_secs(), "deliveries still paused: Keap refused the probe");
                r.reason = reason;
                r.delay
            }
            Some(r) => {
                r.reason = reason;
                r.delay
            }
        };
        let reason = self.refusal.as_ref().map(|r| r.reason.as_str()).unwrap_or_default();
        self.paused = Some(format!(
            "{reason}; deliveries paused, every change stays queued; one probe delivery after {} s, \
             doubling up to {} min, resumes them once Keap accepts it",
            delay.as_secs(),
            REFUSED_MAX_PROBE.as_secs() / 60
        ));
        // Report the pause now (status, /healthz), not at the next heartbeat.
        self.beat = None;
    }

    /// A probe delivery got through: the refusal is over.
    pub(super) fn resume_after_refusal(&mut self) {
        if self.refusal.take().is_some() {
            tracing::info!("Keap accepted the probe delivery; resuming deliveries");
            self.paused = None;
            self.beat = None;
        }
    }

    /// Waits for a notification, a finished task, `wait`, a lost LISTEN connection or a stop.
    pub(super) async fn wait(&mut self, wait: Duration, stop: &CancellationToken) {
        tokio::select! {
            _ = self.wake.notified() => self.fold_due = true,
            _ = self.ctx.hooked.notified() => self.hooks_due = true,
            Some(joined) = self.tasks.join_next_with_id(), if !self.tasks.is_empty() => self.handle(joined),
            _ = tokio::time::sleep(wait) => {}
            reason = self.listener.lost.recv() => {
                self.lost = Some(DbError::Connect {
                    target: self.ctx.pg.describe(),
                    message: reason.unwrap_or_else(|| "listener ended".into()),
                    sqlstate: None,
                });
            }
            _ = stop.cancelled() => {}
        }
    }

    /// What a finished delivery means for the session: a probe's verdict on a refused credential, a
    /// pause until a person authorises, or a lost connection.
    pub(super) fn handle(&mut self, joined: Result<(tokio::task::Id, Outcome), tokio::task::JoinError>) {
        let id = match &joined {
            Ok((id, _)) => *id,
            Err(e) => e.id(),
        };
        let was_probe = match self.refusal.as_mut() {
            Some(r) if r.probe == Some(id) => {
                r.probe = None;
                true
            }
            _ => false,
        };
        match joined.map(|(_, outcome)| outcome) {
            Ok(Outcome::Accepted) if was_probe => self.resume_after_refusal(),
            Ok(Outcome::Handled) if was_probe => {
                // Settled without Keap accepting a call (nothing to send, a 5xx, a failed
                // refresh): no verdict on the credential. Probe again after the same wait, not
                // at once: a probe that keeps failing that way must not become a busy loop.
                if let Some(r) = self.refusal.as_mut() {
                    r.next_probe = Instant::now() + r.delay;
                }
            }
            Ok(Outcome::Handled | Outcome::Accepted) => {}
            Ok(Outcome::Refused(reason)) => self.refused(reason, was_probe),
            Ok(Outcome::NeedsAuthorization(reason)) => {
                if self.paused.is_none() || self.refusal.is_some() {
                    tracing::error!(reason = %reason, "deliveries paused: Keap authorisation needed; every change stays queued");
                }
                // A person must act; the authorisation pause (which watches the token store)
                // takes over from probing.
                self.refusal = None;
                self.paused = Some(reason);
            }
            Ok(Outcome::DbLost(e)) => {
                self.lost.get_or_insert(e);
            }
            Err(e) if e.is_cancelled() => {}
            Err(e) => {
                tracing::error!(error = %e, "a delivery task failed; its change will be retried when the claim expires")
            }
        }
    }
}

/// Asks Keap about the linked contacts a listing did not return (`mirror::confirm_gone`) and
/// unlinks those it no longer has. A failure is logged; the rest stay queued for the next
/// pass. `Some(DbLost)` ends the session.
async fn confirm_gone(db: &db::Db, keap: &mirror::Keap<'_>, table: &schema::UserTable) -> Option<Outcome> {
    match mirror::confirm_gone(db, keap, table).await {
        Ok(done) => {
            if done.calls > 0 {
                tracing::debug!(
                    calls = done.calls,
                    unlinked = done.unlinked,
                    kept = done.kept,
                    "asked Keap about linked contacts a listing did not return"
                );
            }
            None
        }
        Err(MirrorError::Db(e)) if e.is_connection_lost() => Some(Outcome::DbLost(e)),
        Err(e) => {
            tracing::warn!(error = %e, "could not ask Keap whether linked contacts are gone; asking again at the next pass");
            None
        }
    }
}

/// Writes what the mirror holds into the `[inbound]` columns (`mirror::apply_inbound`). A
/// failure is logged and left to the next sweep (the rows stay due); a refused privilege is an
/// error naming the columns and the grant, and deliveries go on. `Some(DbLost)` ends the session.
async fn apply_inbound(db: &db::Db, table: &schema::UserTable, tags: mirror::Tagging<'_>) -> Option<Outcome> {
    match mirror::apply_inbound(db, table, Some(tags)).await {
        Ok(applied) => {
            tracing::debug!(
                contacts = applied.contacts,
                rows = applied.rows,
                events = applied.events,
                "applied Keap's data to the inbound columns"
            );
            None
        }
        Err(InboundError::Db(e) | InboundError::Mirror(MirrorError::Db(e))) if e.is_connection_lost() => {
            Some(Outcome::DbLost(e))
        }
        Err(e @ (InboundError::Refused { .. } | InboundError::UnknownCustomField { .. })) => {
            tracing::error!(error = %e, "Keap's data is not reaching the users table");
            None
        }
        Err(InboundError::Db(e)) => {
            tracing::warn!(error = %e, detail = %e.server_message(), "could not write Keap's data into the inbound columns; trying again at the next sweep");
            None
        }
        Err(e) => {
            tracing::warn!(error = %e, "could not write Keap's data into the inbound columns; trying again at the next sweep");
            None
        }
    }
}
