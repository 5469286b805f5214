//! The long-running daemon (`keap-sync run`): wake up, claim, deliver, repeat.
//!
//! ```text
//!   NOTIFY keap_sync ─┐
//!   poll interval ────┼─▶ claim ≤ free slots (lease, committed) ─▶ read users ─▶ spawn deliveries
//!   next due time ────┤                                                          │ (≤ concurrency)
//!   a delivery ends ──┘◀──────────────────────────────────────────────────────────┘
//! ```
//!
//! Concurrency lives here and nowhere else. One dispatcher loop owns the claiming; deliveries run
//! as tasks in a `JoinSet`, at most `delivery.concurrency` at a time. Never two calls for one
//! user: a user has one outbox row, and a claimed row is invisible to other claims until its
//! lease ends (the lease outlives the longest possible call, which the config enforces).
//!
//! NOTIFY is only a wake-up (invariant 1): every session starts by draining, the loop also
//! wakes on the poll interval and at the next scheduled retry, so a lost notification costs
//! latency, never data. A lost database connection ends the session; the daemon reconnects
//! with backoff and drains again. It never exits on its own except for a stop request.
//!
//! Stopping (mini-redis style): the caller passes a shutdown future; when it completes the
//! loop stops claiming, gives deliveries in flight `shutdown_grace` to finish and record their
//! results, aborts the rest and releases their claims so the next run retries them at once.

use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{watch, Notify};
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_postgres::Config as PgConfig;

use crate::backfill;
use crate::config::{Config, ConfigError, Credential};
use crate::db::{self, DbError};
use crate::deliver::{Deliverer, Outcome};
use crate::keap::KeapClient;
use crate::metrics::Metrics;
use crate::outbox::{self, ClaimTiming};
use crate::ratelimit::Limiter;
use crate::schema::{self, SchemaError, UserTable};
use crate::token::{TokenError, TokenPolicy, TokenSource};

/// The NOTIFY channel the trigger signals.
pub const CHANNEL: &str = "keap_sync";

/// While paused for authorisation, how often the token store is checked (a NOTIFY from
/// `auth import` wakes the loop sooner).
const AUTH_RECHECK: Duration = Duration::from_secs(5);

/// How often an idle daemon checks whether its OAuth grant needs a refresh (near expiry, or
/// a refresh token old enough that it could lapse).
const TOKEN_CHECK: Duration = Duration::from_secs(60);

/// How often an instance records itself in `keap_sync.instances`.
const HEARTBEAT: Duration = Duration::from_secs(5);

/// How often a standby instance tries to take over deliveries.
const STANDBY_RECHECK: Duration = Duration::from_secs(2);

/// Session-level advisory lock held by the delivering instance ("keapdlvr").
const DELIVERY_LOCK: i64 = 0x6b65_6170_646c_7672;

/// Why the daemon could not start. Once running it does not fail: it waits and retries.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Schema(#[from] SchemaError),
    #[error(transparent)]
    Db(#[from] DbError),
    #[error("{0}")]
    Setup(String),
}

/// Extras for one run of the daemon.
#[derive(Debug, Clone, Default)]
pub struct RunOptions {
    /// Enqueue every existing user (`run --backfill`, `backfill`).
    pub backfill: Option<backfill::Mode>,
    /// Stop once the backfill is delivered (`keap-sync backfill`).
    pub exit_when_backfilled: bool,
    /// Draw backfill progress on the terminal instead of logging it.
    pub progress_bar: bool,
}

/// Runs until `shutdown` completes. Returns an error only for problems found at start-up
/// (bad config, unreachable database, schema not migrated), so a misconfigured service fails
/// loudly instead of idling.
pub async fn run(
    config: Config,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), RunError> {
    run_with(config, RunOptions::default(), shutdown).await
}

/// [`run`] with a backfill or other extras.
pub async fn run_with(
    config: Config,
    options: RunOptions,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), RunError> {
    let pg = db::parse(config.database()?)?;
    let credential = config.credential()?.clone();
    let first = db::connect(&pg).await?;
    schema::ensure_current(&first).await?;
    let table = UserTable::resolve(&first, &config.users).await?;
    if !schema::trigger_installed(&first, &table).await? {
        return Err(RunError::Setup(format!(
            "the capture trigger is not installed on {} (or its columns differ from the config): run `keap-sync migrate`",
            table.qualified
        )));
    }

    let limiter = Arc::new(Limiter::new(&config.limits));
    let metrics = Arc::new(Metrics::new());
    if let Some(addr) = config.metrics_listen {
        let listener = tokio::net::TcpListener::bind(addr).await.map_err(|e| {
            RunError::Setup(format!("cannot listen on {addr} for metrics (metrics.listen): {e}"))
        })?;
        let metrics = metrics.clone();
        tokio::spawn(async move {
            if let Err(e) = crate::metrics::serve(listener, metrics).await {
                tracing::error!(error = %e, "the metrics listener stopped");
            }
        });
        tracing::info!(%addr, "serving /metrics and /healthz");
    }
    let keap = KeapClient::new(
        &config.keap.api_url,
        config.keap.request_timeout,
        config.keap.connect_timeout,
        limiter.clone(),
        metrics.clone(),
    )
    .map_err(RunError::Setup)?;
    let tokens = Arc::new(
        TokenSource::new(
            &credential,
            &config.keap.token_url,
            pg.clone(),
            TokenPolicy::from_config(&config.keap),
            config.keap.request_timeout,
            config.keap.connect_timeout,
            metrics.clone(),
        )
        .map_err(RunError::Setup)?,
    );
    let host = hostname();
    let instance = instance_id(&host);
    tracing::info!(
        table = %table.qualified,
        credential = match credential { Credential::ApiKey(_) => "api key", Credential::OAuth { .. } => "oauth" },
        concurrency = config.delivery.concurrency,
        instance = %instance,
        "keap-sync started"
    );

    let (stop_tx, stop) = watch::channel(false);
    let stop_tx = Arc::new(stop_tx);
    let on_signal = stop_tx.clone();
    tokio::spawn(async move {
        shutdown.await;
        let _ = on_signal.send(true);
    });
    if let Some(mode) = options.backfill {
        let (pg, table) = (pg.clone(), table.clone());
        let stop_tx = stop_tx.clone();
        tokio::spawn(async move {
            // The backfill resumes from its cursor, so after a database error it simply starts
            // again (with the reconnect backoff) until it is done or the daemon stops.
            let mut failures = 0;
            let mut stopped = stop_tx.subscribe();
            while let Err(e) = run_backfill(&pg, &table, mode, &options, &stop_tx).await {
                failures += 1;
                let delay = db::reconnect_delay(failures);
                tracing::warn!(error = %e, retry_in_ms = delay.as_millis() as u64, "backfill interrupted; resuming");
                tokio::select! {
                    _ = tokio::time::sleep(delay) => {}
                    _ = stopped.wait_for(|s| *s) => return,
                }
            }
        });
    }

    let notifier = crate::systemd::Notifier::from_env();
    let ctx = Context {
        pg,
        table,
        keap,
        limiter,
        metrics,
        tokens,
        config,
        instance,
        host,
        notifier,
        ready: AtomicBool::new(false),
    };
    let mut client = Some(first);
    let mut failures = 0u32;
    loop {
        let started = Instant::now();
        let result = ctx.session(client.take(), stop.clone()).await;
        if *stop.borrow() {
            tracing::info!("keap-sync stopped");
            return Ok(());
        }
        ctx.notifier.watchdog();
        ctx.notifier.status("database connection lost; reconnecting");
        let Err(e) = result else { continue };
        // A session that ran a while before failing starts the backoff afresh.
        failures = if started.elapsed() > Duration::from_secs(60) { 1 } else { failures + 1 };
        let delay = db::reconnect_delay(failures);
        if e.is_connection_lost() {
            tracing::warn!(error = %e, retry_in_ms = delay.as_millis() as u64, "database connection lost; reconnecting");
        } else {
            tracing::error!(error = %e, retry_in_ms = delay.as_millis() as u64, "database query failed; retrying");
        }
        let mut stop_wait = stop.clone();
        tokio::select! {
            _ = tokio::time::sleep(delay) => {}
            _ = stop_wait.wait_for(|s| *s) => {}
        }
    }
}

struct Context {
    pg: PgConfig,
    table: UserTable,
    keap: KeapClient,
    limiter: Arc<Limiter>,
    metrics: Arc<Metrics>,
    tokens: Arc<TokenSource>,
    config: Config,
    instance: String,
    /// For the instances table; `instance` also names them, for uniqueness.
    host: String,
    /// systemd: READY once after the first drain, watchdog pings from the loop, STATUS lines.
    notifier: crate::systemd::Notifier,
    ready: AtomicBool,
}

impl Context {
    /// One connected stretch: LISTEN, drain, deliver until the connection drops or a stop is
    /// requested. Returns `Ok` only on a stop.
    async fn session(
        &self,
        client: Option<tokio_postgres::Client>,
        mut stop: watch::Receiver<bool>,
    ) -> Result<(), DbError> {
        let wake = Arc::new(Notify::new());
        let mut listener = db::connect_listener(&self.pg, CHANNEL, wake.clone()).await?;
        let client = match client {
            Some(c) => c,
            None => db::connect(&self.pg).await?,
        };
        let db = Arc::new(client);
        // Claims this process held in an earlier session have no task any more.
        outbox::release_all(&db, &self.instance, self.in_flight_grace()).await?;
        if !self.wait_for_delivery_lock(&listener, &db, &mut stop).await? {
            self.leave(&db).await;
            return Ok(());
        }
        let deliverer = Arc::new(Deliverer {
            db: db.clone(),
            keap: self.keap.clone(),
            tokens: self.tokens.clone(),
            delivery: self.config.delivery.clone(),
            instance: self.instance.clone(),
            metrics: self.metrics.clone(),
        });
        self.metrics.set_db_connected(true);
        let d = &self.config.delivery;
        let timing = ClaimTiming { lease: d.lease, settle: d.settle, max_settle: d.settle * 10 };
        tracing::info!("listening for changes; draining the outbox");

        let mut tasks: JoinSet<Outcome> = JoinSet::new();
        let mut paused: Option<String> = None;
        let mut lost: Option<DbError> = None;
        // `None`: not yet in this session, so both happen at once. (Not `now() - interval`: the
        // monotonic clock starts at boot, and a service can start within a minute of it.)
        let mut token_checked: Option<Instant> = None;
        let mut beat: Option<Instant> = None;
        let result = loop {
            if *stop.borrow() {
                break Ok(());
            }
            if let Some(e) = lost.take() {
                break Err(e);
            }
            // The loop turns at least every HEARTBEAT, whatever else waits (a quota pause
            // waits inside the deliveries), so the watchdog keeps being fed.
            self.notifier.watchdog();
            let mut wait = d.poll_interval.min(TOKEN_CHECK).min(HEARTBEAT);
            if beat.is_none_or(|t| t.elapsed() >= HEARTBEAT) {
                beat = Some(Instant::now());
                self.metrics.set_fatal(paused.clone());
                if let Err(e) = self.heartbeat(&db, "active", paused.as_deref()).await {
                    break Err(e);
                }
            }
            if paused.is_some() {
                match self.tokens.usable_again(&db).await {
                    Ok(true) => {
                        tracing::info!("Keap credential usable again; resuming deliveries");
                        paused = None;
                        continue;
                    }
                    Ok(false) => wait = AUTH_RECHECK,
                    Err(TokenError::Db(e)) => break Err(e),
                    Err(e) => {
                        tracing::warn!(error = %e, "cannot read the token store");
                        wait = AUTH_RECHECK;
                    }
                }
            } else {
                if self.tokens.is_oauth() && token_checked.is_none_or(|t| t.elapsed() >= TOKEN_CHECK) {
                    // In a task like a delivery: a refresh may wait on the token row lock and the
                    // token endpoint, and the loop must keep turning (and feeding the watchdog).
                    token_checked = Some(Instant::now());
                    let (tokens, db) = (self.tokens.clone(), db.clone());
                    tasks.spawn(async move {
                        match tokens.auth(&db).await {
                            Ok(_) => Outcome::Handled,
                            Err(TokenError::NeedsAuthorization(reason)) => {
                                Outcome::NeedsAuthorization(reason)
                            }
                            Err(TokenError::Db(e)) => Outcome::DbLost(e),
                            Err(e) => {
                                tracing::warn!(error = %e, "idle token check failed; will retry");
                                Outcome::Handled
                            }
                        }
                    });
                }
                let free = d.concurrency.saturating_sub(tasks.len());
                // While Keap's quota or a 429 pauses every sender, claiming would only start
                // leases ticking; wait for the pause to end instead.
                let limiter_pause = self.limiter.paused_until();
                if let Some(until) = limiter_pause {
                    wait = wait
                        .min(until.saturating_duration_since(Instant::now()).max(Duration::from_millis(5)));
                }
                if free > 0 && limiter_pause.is_none() {
                    let claimed = match self.claim_and_spawn(&db, &deliverer, &mut tasks, free, timing).await
                    {
                        Ok(n) => n,
                        Err(e) => break Err(e),
                    };
                    // The first drain has begun: migrations checked, LISTEN in place.
                    self.mark_ready();
                    if claimed < free {
                        match outbox::next_due_in(&db, timing).await {
                            Ok(Some(due)) => wait = wait.min(due.max(Duration::from_millis(5))),
                            Ok(None) => {}
                            Err(e) => break Err(e),
                        }
                    }
                }
            }

            tokio::select! {
                _ = wake.notified() => {}
                Some(joined) = tasks.join_next(), if !tasks.is_empty() => {
                    handle(joined, &mut paused, &mut lost);
                }
                _ = tokio::time::sleep(wait) => {}
                reason = listener.lost.recv() => {
                    lost = Some(DbError::Connect {
                        target: db::describe(&self.pg),
                        message: reason.unwrap_or_else(|| "listener ended".into()),
                    });
                }
                _ = stop.changed() => {}
            }
        };

        self.metrics.set_db_connected(false);
        self.finish(&db, &mut tasks, result.is_ok()).await;
        if result.is_ok() {
            self.leave(&db).await;
        }
        drop(listener.client);
        result
    }

    /// Only one instance delivers at a time, so the rate limit holds for the whole deployment:
    /// the holder of a session-level advisory lock on the LISTEN connection. The others stand
    /// by and take over within [`STANDBY_RECHECK`] of the holder's connection closing (a crashed
    /// holder's lock goes with its connection). Returns false if a stop came while waiting.
    async fn wait_for_delivery_lock(
        &self,
        listener: &db::Listener,
        db: &tokio_postgres::Client,
        stop: &mut watch::Receiver<bool>,
    ) -> Result<bool, DbError> {
        let mut announced = false;
        loop {
            let got: bool =
                listener.client.query_one("select pg_try_advisory_lock($1)", &[&DELIVERY_LOCK]).await?.get(0);
            if got {
                if announced {
                    tracing::info!("took over deliveries");
                }
                return Ok(true);
            }
            if !announced {
                tracing::info!("another instance is delivering; standing by to take over");
                announced = true;
            }
            self.heartbeat(db, "standby", None).await?;
            self.notifier.watchdog();
            self.notifier.status("standing by: another instance is delivering");
            self.mark_ready();
            tokio::select! {
                _ = tokio::time::sleep(STANDBY_RECHECK) => {}
                _ = stop.wait_for(|s| *s) => return Ok(false),
            }
        }
    }

    /// Records this instance as alive, for `keap-sync status`.
    async fn heartbeat(
        &self,
        db: &tokio_postgres::Client,
        role: &str,
        paused: Option<&str>,
    ) -> Result<(), DbError> {
        let report = self.limiter.report();
        // A spent daily quota pauses every sender inside the limiter; say so in status too.
        let quota_pause = match (report.day_available, self.limiter.paused_until()) {
            (Some(0), Some(until)) => Some(format!(
                "Keap's daily quota is used up; deliveries resume when it resets (in {} min)",
                until.saturating_duration_since(Instant::now()).as_secs().div_ceil(60)
            )),
            _ => None,
        };
        let paused = paused.or(quota_pause.as_deref());
        let pid = std::process::id() as i32;
        db.execute(
            "insert into keap_sync.instances
                    (instance, host, pid, role, paused_reason, quota_minute_available, quota_day_available, throttled)
             values ($1, $2, $3, $4, $5, $6, $7, $8)
             on conflict (instance) do update
                set last_seen = now(), role = excluded.role, paused_reason = excluded.paused_reason,
                    quota_minute_available = excluded.quota_minute_available,
                    quota_day_available = excluded.quota_day_available, throttled = excluded.throttled",
            &[
                &self.instance,
                &self.host,
                &pid,
                &role,
                &paused,
                &report.minute_available,
                &report.day_available,
                &i64::from(self.limiter.throttled_total()),
            ],
        )
        .await?;
        db.execute("delete from keap_sync.instances where last_seen < now() - interval '1 day'", &[]).await?;
        let depth = crate::status::depth(db).await?;
        self.notifier.status(&match (role, paused) {
            ("standby", _) => "standing by: another instance is delivering".to_owned(),
            (_, Some(reason)) => format!("PAUSED: {reason}"),
            _ => format!(
                "delivering; queued: {} live, {} retrying, {} backfill; {} parked",
                depth.live, depth.retry, depth.backfill, depth.parked
            ),
        });
        self.metrics.set_queue(
            depth.live,
            depth.retry,
            depth.backfill,
            depth.parked,
            depth.oldest_pending_age_secs.unwrap_or(0.0),
        );
        self.metrics.set_quota(report.minute_available, report.day_available);
        Ok(())
    }

    /// How long a call that was on the wire when its task ended may still be processed by Keap.
    fn in_flight_grace(&self) -> Duration {
        self.config.keap.request_timeout + self.config.keap.connect_timeout
    }

    fn mark_ready(&self) {
        if !self.ready.swap(true, Ordering::Relaxed) {
            self.notifier.ready();
        }
    }

    /// Forgets this instance on a clean stop.
    async fn leave(&self, db: &tokio_postgres::Client) {
        let _ = db.execute("delete from keap_sync.instances where instance = $1", &[&self.instance]).await;
    }

    /// Claims up to `free` changes and starts a delivery for each. Returns how many.
    async fn claim_and_spawn(
        &self,
        db: &tokio_postgres::Client,
        deliverer: &Arc<Deliverer>,
        tasks: &mut JoinSet<Outcome>,
        free: usize,
        timing: ClaimTiming,
    ) -> Result<usize, DbError> {
        let claimed_at = Instant::now();
        let claims = outbox::claim(db, &self.instance, free as i64, timing).await?;
        // Our clock's view of the lease end, with a margin for clock steps and the result write.
        let deadline = claimed_at + timing.lease.mul_f64(0.9);
        if claims.is_empty() {
            return Ok(0);
        }
        let keys: Vec<String> = claims.iter().map(|c| c.user_key.clone()).collect();
        let mut rows = outbox::read_users(db, &self.table, &keys).await?;
        let n = claims.len();
        for claim in claims {
            let row = rows.remove(&claim.user_key);
            let deliverer = deliverer.clone();
            tasks.spawn(async move { deliverer.deliver(claim, row, deadline).await });
        }
        Ok(n)
    }

    /// Lets deliveries in flight finish. On a stop they get `shutdown_grace`; after a lost
    /// connection their results cannot be recorded anyway, so they are aborted at once. What
    /// is unfinished is released (or, without a connection, left to its lease).
    async fn finish(&self, db: &tokio_postgres::Client, tasks: &mut JoinSet<Outcome>, stopping: bool) {
        if stopping {
            self.notifier.stopping();
        }
        if stopping && !tasks.is_empty() {
            tracing::info!(in_flight = tasks.len(), "stopping: waiting for deliveries in flight");
            let deadline = Instant::now() + self.config.delivery.shutdown_grace;
            while let Ok(Some(_)) = tokio::time::timeout_at(deadline, tasks.join_next()).await {}
        }
        // A delivery aborted here may have its call on the wire: its claim is released only
        // after that call could have finished, so no other instance sends the same user meanwhile.
        let grace = if tasks.is_empty() { Duration::ZERO } else { self.in_flight_grace() };
        tasks.abort_all();
        while tasks.join_next().await.is_some() {}
        match outbox::release_all(db, &self.instance, grace).await {
            Ok(0) => {}
            Ok(n) => tracing::info!(released = n, "released unfinished claims"),
            Err(e) => {
                tracing::debug!(error = %e, "could not release claims; their leases will expire")
            }
        }
    }
}

fn handle(
    joined: Result<Outcome, tokio::task::JoinError>,
    paused: &mut Option<String>,
    lost: &mut Option<DbError>,
) {
    match joined {
        Ok(Outcome::Handled) => {}
        Ok(Outcome::NeedsAuthorization(reason)) => {
            if paused.is_none() {
                tracing::error!(reason = %reason, "deliveries paused: Keap authorisation needed; every change stays queued");
            }
            *paused = Some(reason);
        }
        Ok(Outcome::DbLost(e)) => {
            lost.get_or_insert(e);
        }
        Err(e) if e.is_cancelled() => {}
        Err(e) => {
            tracing::error!(error = %e, "a delivery task failed; its change will be retried when the claim expires")
        }
    }
}

/// Enqueues the backfill, then watches it until every backfill change is delivered.
async fn run_backfill(
    pg: &PgConfig,
    table: &UserTable,
    mode: backfill::Mode,
    options: &RunOptions,
    stop: &watch::Sender<bool>,
) -> Result<(), DbError> {
    let client = db::connect(pg).await?;
    if !backfill::begin(&client, table, mode).await? {
        tracing::info!(
            "the backfill already finished; nothing to enqueue (use --backfill=restart to run it again)"
        );
        if options.exit_when_backfilled {
            let _ = stop.send(true);
        }
        return Ok(());
    }
    let bar = options.progress_bar;
    let started = Instant::now();
    let mut logged = Instant::now();
    backfill::enqueue_all(&client, table, |enqueued| {
        if bar {
            eprint!("\rbackfill: enqueued {enqueued} users…");
        } else if logged.elapsed() >= Duration::from_secs(10) {
            logged = Instant::now();
            tracing::info!(enqueued, "backfill: enqueuing");
        }
    })
    .await?;
    if !bar {
        tracing::info!(secs = started.elapsed().as_secs_f64(), "backfill: every user is enqueued");
    }

    let mut last: Option<(Instant, i64)> = None;
    let mut logged: Option<Instant> = None;
    let mut stopped = stop.subscribe();
    loop {
        let Some(p) = backfill::finish_if_delivered(&client).await? else { return Ok(()) };
        let now = Instant::now();
        let rate = match last {
            Some((t, done)) if now > t => (p.delivered() - done) as f64 / (now - t).as_secs_f64(),
            _ => 0.0,
        };
        if last.is_none_or(|(t, _)| now - t >= Duration::from_secs(5)) {
            last = Some((now, p.delivered()));
        }
        if p.state == "done" {
            if bar {
                eprintln!("\rbackfill: {}", backfill::describe(&p, rate));
            }
            tracing::info!(users = p.total, parked = p.parked, "backfill done");
            if options.exit_when_backfilled {
                let _ = stop.send(true);
            }
            return Ok(());
        }
        if bar {
            eprint!("\rbackfill: {}   ", backfill::describe(&p, rate));
        } else if logged.is_none_or(|t| t.elapsed() >= Duration::from_secs(10)) {
            logged = Some(Instant::now());
            tracing::info!(progress = %backfill::describe(&p, rate), "backfill");
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(500)) => {}
            _ = stopped.wait_for(|s| *s) => return Ok(()),
        }
    }
}

/// A name for this process's claims: host, pid and a random part (pids repeat across hosts
/// and restarts; the random part keeps a restarted daemon from mistaking old claims for its own).
fn instance_id(host: &str) -> String {
    format!("{host}:{}:{:08x}", std::process::id(), rand::random::<u32>())
}

fn hostname() -> String {
    // /proc/sys is hidden under the systemd unit's ProcSubset=pid; /etc/hostname is not.
    ["/proc/sys/kernel/hostname", "/etc/hostname"]
        .iter()
        .find_map(|p| std::fs::read_to_string(p).ok().map(|h| h.trim().to_owned()).filter(|h| !h.is_empty()))
        .unwrap_or_else(|| "host".into())
}
