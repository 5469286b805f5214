//! The long-running daemon (`keap-sync run`): wake up, claim, deliver, repeat.
//!
//! ```text
//!   NOTIFY keap_sync ─┐
//!   poll interval ────┼─▶ claim ≤ free slots (lease, committed) ─▶ read users ─▶ spawn deliveries
//!   next due time ────┤                                                          │ (≤ concurrency)
//!   a delivery ends ──┘◀──────────────────────────────────────────────────────────┘
//! ```
//!
//! [`Daemon::build`] checks everything that can be checked before running (configuration,
//! database, schema, trigger, the metrics address) so a misconfigured service fails loudly at
//! start; [`Daemon::run`] then never fails on its own: it waits and retries until stopped.
//!
//! # Where concurrency lives
//!
//! Here, and in the token source's refresh task (`token`, "Where concurrency lives"). Every task
//! the daemon starts is owned: the stop watcher, the metrics
//! listener and the backfill run in one [`TaskTracker`] that `run` waits for before it returns,
//! and all of them end when one [`CancellationToken`] (the stop) is cancelled — by the shutdown
//! future, or by a finished backfill under `exit_when_backfilled`. A token rather than a channel
//! because it is cheap to clone into every task, can be awaited by any number of them, and stays
//! cancelled (a late subscriber cannot miss it). The reserver of the day's Keap calls
//! (`ratelimit::reserve_until_stopped`) runs in the tracker too, on a token of its own that is
//! cancelled once the deliveries have ended, so none of them waits for a reservation in vain.
//!
//! Deliveries run in a [`JoinSet`] owned by the session, at most `delivery.concurrency` at a
//! time; one dispatcher loop owns the claiming, so no lock guards the claim path. Never two calls
//! for one user: a user has one outbox row, and a claimed row is invisible to other claims until
//! its lease ends (the lease outlives the longest possible call, which the config enforces).
//! Database connection driver tasks (`db::connect`) end with their `Client`, which the session
//! owns.
//!
//! NOTIFY is only a wake-up (ARCHITECTURE.md, invariant 1): every session starts by draining,
//! and the loop also wakes on the poll interval and at the next scheduled retry, so a lost
//! notification costs latency, never data. A lost database connection ends the session; the
//! daemon reconnects with backoff and drains again.
//!
//! Stopping (mini-redis style): the caller passes a shutdown future; when it completes the loop
//! stops claiming, gives deliveries in flight `shutdown_grace` to finish and record their
//! results, aborts the rest and releases their claims so the next run retries them at once.

use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Notify;
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_postgres::{Client, Config as PgConfig};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

mod orphans;

use crate::backfill::{self, BackfillMode, BackfillState};
use crate::catalog::Catalog;
use crate::config::{Config, ConfigError, Credential};
use crate::db::{self, DbError};
use crate::deliver::{Deliverer, Outcome};
use crate::keap::KeapClient;
use crate::mapping::Mapper;
use crate::metrics::Metrics;
use crate::outbox::recorder::Recorder;
use crate::outbox::{self, ClaimTiming};
use crate::ratelimit::{self, Limiter};
use crate::schema::{self, SchemaError, UserTable};
use crate::status::InstanceRole;
use crate::systemd::Notifier;
use crate::token::{TokenError, TokenPolicy, TokenSource};

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

/// How often an instance records itself in `keap_sync.instances`.
const HEARTBEAT: Duration = Duration::from_secs(5);

/// How often a standby instance tries to take over deliveries.
const STANDBY_RECHECK: Duration = Duration::from_secs(2);

/// How soon the loop claims again when a due change was skipped because an open transaction
/// holds its row. Usually the holder is an application transaction that changed the user, and
/// its commit sends a NOTIFY that wakes the loop at once; this only bounds the wait for other
/// holders (a `select … for update` in psql, say) at one claim a second, instead of a re-claim
/// every few milliseconds for as long as the transaction stays open.
const LOCKED_RECHECK: Duration = Duration::from_secs(1);

/// How often a running backfill's progress is read (and, every 10 s, logged).
const BACKFILL_WATCH: Duration = Duration::from_millis(500);

/// How often the change log is folded without a notification. Every capturing commit notifies
/// and a new session folds first, so this only bounds how long a change can wait if a
/// notification was somehow not heard; it stays off the hot path.
const FOLD_SWEEP: Duration = Duration::from_secs(30);

/// Session-level advisory lock held by the delivering instance (defined in `db`).
const DELIVERY_LOCK: i64 = db::DELIVERY_LOCK;

/// Why the daemon could not start. Once running it does not fail: it waits and retries.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// The configuration is incomplete or invalid.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// Schema `keap_sync` is missing, outdated, or the users table does not match the config.
    #[error(transparent)]
    Schema(#[from] SchemaError),
    /// The database could not be reached or answered with an error.
    #[error(transparent)]
    Db(#[from] DbError),
    /// Anything else found at start-up (the capture trigger, the metrics address, TLS setup).
    #[error("{0}")]
    Setup(String),
}

/// Extras for one run of the daemon.
#[derive(Debug, Clone, Default)]
pub struct RunOptions {
    /// Enqueue every existing user (`run --backfill`, `backfill`).
    pub backfill: Option<BackfillMode>,
    /// Stop once the backfill is delivered (`keap-sync backfill`).
    pub exit_when_backfilled: bool,
}

/// A daemon that passed its start-up checks, ready to [`run`](Daemon::run).
pub struct Daemon {
    context: Context,
    options: RunOptions,
    /// The connection the start-up checks used; the first session reuses it.
    first: Client,
    /// Bound at build time, so a taken port fails the start, not some later moment.
    metrics_listener: Option<tokio::net::TcpListener>,
}

impl Daemon {
    /// Checks the configuration, connects, checks that `migrate` has run and the capture
    /// trigger matches the configuration, and binds the metrics listener if one is configured.
    pub async fn build(config: Config, options: RunOptions) -> Result<Daemon, RunError> {
        let pg = db::parse(config.database()?)?;
        let credential = config.credential()?.clone();
        let first = db::connect(&pg).await?;
        schema::ensure_current(&first).await?;
        let table = UserTable::resolve(&first, &config.users).await?;
        if !schema::trigger_installed(&first, &table).await? {
            return Err(RunError::Setup(format!(
                "the capture triggers on {} are not installed, not enabled always, or capture other columns than the config names: run `keap-sync migrate`",
                table.qualified
            )));
        }
        let metrics_listener = match config.metrics_listen {
            Some(addr) => Some(tokio::net::TcpListener::bind(addr).await.map_err(|e| {
                RunError::Setup(format!("cannot listen on {addr} for metrics (metrics.listen): {e}"))
            })?),
            None => None,
        };
        let KeapAccess { keap, tokens, limiter, metrics } = keap_access(&config, &pg)?;
        let mapper = Arc::new(Mapper::new(&config.users));
        let catalog = Arc::new(Catalog::default());
        if mapper.needs_model() {
            let _reserving = ratelimit::Reserving::start(&limiter, &pg);
            check_custom_fields(&first, &keap, &tokens, &catalog, &mapper, config.keap.request_timeout)
                .await?;
        }
        let host = hostname();
        let context = Context {
            instance: instance_id(&host),
            host,
            pg,
            table,
            keap,
            limiter,
            metrics,
            tokens: Arc::new(tokens),
            mapper,
            catalog,
            credential_kind: match credential {
                Credential::ApiKey(_) => "api key",
                Credential::OAuth { .. } => "oauth",
            },
            config,
            notifier: Notifier::from_env(),
            ready: AtomicBool::new(false),
        };
        Ok(Daemon { context, options, first, metrics_listener })
    }

    /// Runs until `shutdown` completes (or, with `exit_when_backfilled`, until the backfill is
    /// delivered). Returns once every task it started has ended.
    pub async fn run(self, shutdown: impl Future<Output = ()> + Send + 'static) -> Result<(), RunError> {
        let Daemon { context, options, first, metrics_listener } = self;
        let context = Arc::new(context);
        tracing::info!(
            table = %context.table.qualified,
            credential = context.credential_kind,
            concurrency = context.config.delivery.concurrency,
            instance = %context.instance,
            "keap-sync started"
        );
        let stop = CancellationToken::new();
        let tasks = TaskTracker::new();
        tasks.spawn(cancel_on(shutdown, stop.clone()));
        if let Some(listener) = metrics_listener {
            tasks.spawn(serve_metrics(listener, Arc::clone(&context.metrics), stop.clone()));
        }
        if let Some(mode) = options.backfill {
            tasks.spawn(backfill_until_done(
                Arc::clone(&context),
                mode,
                options.exit_when_backfilled,
                stop.clone(),
            ));
        }
        // The day's call reservations (ARCHITECTURE.md, invariant 15) are topped up until every
        // delivery has ended, so none waits for a reservation that would never come.
        let deliveries_ended = CancellationToken::new();
        tasks.spawn(ratelimit::reserve_until_stopped(
            Arc::clone(&context.limiter),
            context.pg.clone(),
            deliveries_ended.clone(),
        ));
        context.deliver_until_stopped(first, &stop).await;
        deliveries_ended.cancel();
        stop.cancel();
        tasks.close();
        tasks.wait().await;
        // Deliveries are over, but a token refresh one of them started may still be on the wire:
        // it commits the new pair before we return (ARCHITECTURE.md, invariant 16), or Keap may
        // have spent the old refresh token for a pair nobody stored.
        let limit = context.config.keap.request_timeout + context.config.keap.connect_timeout;
        if !context.tokens.settle(limit).await {
            tracing::warn!(
                "a token refresh was still unfinished {} s after the stop; if Keap answered it, \
                 the grant may need `keap-sync auth login`",
                limit.as_secs()
            );
        }
        tracing::info!("keap-sync stopped");
        Ok(())
    }
}

/// Cancels `stop` when `shutdown` completes; ends early if something else stopped the daemon.
async fn cancel_on(shutdown: impl Future<Output = ()>, stop: CancellationToken) {
    tokio::select! {
        _ = shutdown => stop.cancel(),
        _ = stop.cancelled() => {}
    }
}

/// Serves `/metrics` and `/healthz` until the daemon stops.
async fn serve_metrics(listener: tokio::net::TcpListener, metrics: Arc<Metrics>, stop: CancellationToken) {
    if let Ok(addr) = listener.local_addr() {
        tracing::info!(%addr, "serving /metrics and /healthz");
    }
    tokio::select! {
        served = crate::metrics::serve(listener, metrics) => {
            if let Err(e) = served {
                tracing::error!(error = %e, "the metrics listener stopped");
            }
        }
        _ = stop.cancelled() => {}
    }
}

/// The Keap client and credential of a configuration, with their shared limiter and metrics.
pub(crate) struct KeapAccess {
    pub(crate) keap: KeapClient,
    pub(crate) tokens: TokenSource,
    pub(crate) limiter: Arc<Limiter>,
    pub(crate) metrics: Arc<Metrics>,
}

/// Builds [`KeapAccess`] (no call is made yet): the daemon's, and `preview`'s for names.
pub(crate) fn keap_access(config: &Config, pg: &PgConfig) -> Result<KeapAccess, RunError> {
    let credential = config.credential()?.clone();
    let limiter = Arc::new(Limiter::new(&config.limits, &credential));
    let metrics = Arc::new(Metrics::new());
    let keap = KeapClient::new(
        &config.keap.api_url,
        config.keap.request_timeout,
        config.keap.connect_timeout,
        Arc::clone(&limiter),
        Arc::clone(&metrics),
    )
    .map_err(RunError::Setup)?;
    let tokens = TokenSource::new(
        &credential,
        &config.keap.token_url,
        pg.clone(),
        TokenPolicy::from_config(&config.keap),
        config.keap.request_timeout,
        config.keap.connect_timeout,
        Arc::clone(&metrics),
    )
    .map_err(RunError::Setup)?;
    Ok(KeapAccess { keap, tokens, limiter, metrics })
}

/// Start-up check of the mapped custom fields against Keap's contact model: a field Keap does
/// not have is a configuration error, reported before anything runs. When Keap cannot be asked
/// now (unreachable, no credential yet), the check happens on the first delivery instead, and
/// a missing field then parks the changes that need it, naming it. Called only when custom
/// fields are mapped, with the day's call reservations running (`ratelimit::Reserving`).
async fn check_custom_fields(
    db: &Client,
    keap: &KeapClient,
    tokens: &TokenSource,
    catalog: &Catalog,
    mapper: &Mapper,
    timeout: Duration,
) -> Result<(), RunError> {
    let deadline = tokio::time::Instant::now() + timeout * 2;
    let auth = match tokens.auth(db).await {
        Ok(auth) => auth,
        Err(TokenError::Db(e)) => return Err(e.into()),
        Err(e) => {
            tracing::warn!(error = %e, "cannot check the mapped custom fields against Keap's model now; checking on the first delivery");
            return Ok(());
        }
    };
    match catalog.model(keap, &auth, deadline).await {
        Ok(model) => mapper.check_model(model).map_err(|e| RunError::Config(ConfigError::Invalid(e))),
        Err(e) => {
            tracing::warn!(error = %e, "cannot read Keap's contact model now; checking the mapped custom fields on the first delivery");
            Ok(())
        }
    }
}

/// Everything a session needs that outlives it: built once by [`Daemon::build`], shared
/// read-only (`Arc<Context>`) with the backfill task.
struct Context {
    pg: PgConfig,
    table: UserTable,
    keap: KeapClient,
    /// Shared with the Keap client: the loop reads its pause to avoid claiming while every
    /// sender is paused.
    limiter: Arc<Limiter>,
    /// Shared with the client, the token source and the metrics listener; atomics inside.
    metrics: Arc<Metrics>,
    /// Shared with every delivery task: one refresh at a time per process is its own business.
    tokens: Arc<TokenSource>,
    /// The contact mapping of the configuration.
    mapper: Arc<Mapper>,
    /// Keap's custom fields and tag ids once looked up; outlives database sessions.
    catalog: Arc<Catalog>,
    config: Config,
    /// Names this process's claims: host, pid and a random part.
    instance: String,
    /// For the instances table; `instance` also names them, for uniqueness.
    host: String,
    credential_kind: &'static str,
    /// systemd: READY once after the first drain, watchdog pings from the loop, STATUS lines.
    notifier: Notifier,
    /// Whether READY was sent. An atomic so both the session loop and the standby wait can
    /// send it, exactly once, through `&self`.
    ready: AtomicBool,
}

impl Context {
    /// Sessions, one after another, until `stop`: a lost connection ends a session and the
    /// next starts after a backoff.
    async fn deliver_until_stopped(&self, first: Client, stop: &CancellationToken) {
        let mut client = Some(first);
        let mut failures = 0u32;
        loop {
            let started = Instant::now();
            let result = self.session(client.take(), stop).await;
            if stop.is_cancelled() {
                return;
            }
            self.notifier.watchdog();
            self.notifier.status("database connection lost; reconnecting");
            let Err(e) = result else { continue };
            // A session that ran a while before failing starts the backoff afresh.
            failures = if started.elapsed() > Duration::from_secs(60) { 1 } else { failures + 1 };
            let delay = db::reconnect_delay(failures);
            if e.is_connection_lost() {
                tracing::warn!(error = %e, retry_in_ms = delay.as_millis() as u64, "database connection lost; reconnecting");
            } else {
                tracing::error!(error = %e, retry_in_ms = delay.as_millis() as u64, "database query failed; retrying");
            }
            tokio::select! {
                _ = tokio::time::sleep(delay) => {}
                _ = stop.cancelled() => return,
            }
        }
    }

    /// One connected stretch: LISTEN, drain, deliver until the connection drops or a stop is
    /// requested. Returns `Ok` only on a stop.
    async fn session(&self, client: Option<Client>, stop: &CancellationToken) -> Result<(), DbError> {
        let wake = Arc::new(Notify::new());
        let listener = db::connect_listener(&self.pg, db::NOTIFY_CHANNEL, Arc::clone(&wake)).await?;
        let client = match client {
            Some(c) => c,
            None => db::connect(&self.pg).await?,
        };
        let db = Arc::new(db::Db::new(client));
        // Claims this process held in an earlier session have no task any more.
        outbox::release_all(&db, &self.instance, self.in_flight_grace()).await?;
        if !self.wait_for_delivery_lock(&listener, &db, stop).await? {
            self.leave(&db).await;
            return Ok(());
        }
        let deliverer = Arc::new(Deliverer {
            recorder: Recorder::start(Arc::clone(&db), self.instance.clone()),
            db: Arc::clone(&db),
            keap: self.keap.clone(),
            tokens: Arc::clone(&self.tokens),
            delivery: self.config.delivery.clone(),
            instance: self.instance.clone(),
            metrics: Arc::clone(&self.metrics),
            mapper: Arc::clone(&self.mapper),
            catalog: Arc::clone(&self.catalog),
        });
        self.metrics.set_db_connected(true);
        tracing::info!("listening for changes; draining the outbox");
        let mut session = Session {
            ctx: self,
            db,
            listener,
            wake,
            deliverer,
            tasks: JoinSet::new(),
            paused: None,
            refusal: None,
            lost: None,
            token_checked: None,
            beat: None,
            capture: None,
            capture_checked: None,
            fold_due: true,
            next_fold: Instant::now(),
        };
        let result = session.deliver(stop).await;
        self.metrics.set_db_connected(false);
        self.finish(&session.db, &session.deliverer.recorder, &mut session.tasks, result.is_ok()).await;
        if result.is_ok() {
            // Stopping, and no delivery is left: today's unused call reservations go back.
            self.limiter.give_back(&session.db).await;
            self.leave(&session.db).await;
        }
        result
    }

    /// Only one instance delivers at a time, so the rate limit holds for the whole deployment:
    /// the holder of a session-level advisory lock on the LISTEN connection. The others stand
    /// by and take over within [`STANDBY_RECHECK`] of the holder's connection closing (a crashed
    /// holder's lock goes with its connection). Returns false if a stop came while waiting.
    async fn wait_for_delivery_lock(
        &self,
        listener: &db::Listener,
        db: &Client,
        stop: &CancellationToken,
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
            self.heartbeat(db, InstanceRole::Standby, None).await?;
            self.notifier.watchdog();
            self.mark_ready();
            tokio::select! {
                _ = tokio::time::sleep(STANDBY_RECHECK) => {}
                _ = stop.cancelled() => return Ok(false),
            }
        }
    }

    /// Records this instance as alive, for `keap-sync status`, and refreshes the queue gauges
    /// and the systemd STATUS line.
    async fn heartbeat(&self, db: &Client, role: InstanceRole, paused: Option<&str>) -> Result<(), DbError> {
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
                    (instance, host, pid, role, paused_reason, quota_minute_available, quota_day_available, throttled,
                     backend_pid, backend_start)
             select $1, $2, $3, $4, $5, $6, $7, $8, pid, backend_start
               from pg_catalog.pg_stat_activity where pid = pg_catalog.pg_backend_pid()
             on conflict (instance) do update
                set last_seen = now(), role = excluded.role, paused_reason = excluded.paused_reason,
                    backend_pid = excluded.backend_pid, backend_start = excluded.backend_start,
                    quota_minute_available = excluded.quota_minute_available,
                    quota_day_available = excluded.quota_day_available, throttled = excluded.throttled",
            &[
                &self.instance,
                &self.host,
                &pid,
                &role.as_str(),
                &paused,
                &report.minute_available,
                &report.day_available,
                &i64::from(self.limiter.throttled_total()),
            ],
        )
        .await?;
        db.execute("delete from keap_sync.instances where last_seen < now() - interval '1 day'", &[]).await?;
        if role == InstanceRole::Active {
            crate::status::compact_counts(db).await?;
        }
        let depth = crate::status::depth(db).await?;
        self.notifier.status(&match (role, paused) {
            (InstanceRole::Standby, _) => "standing by: another instance is delivering".to_owned(),
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

    fn claim_timing(&self) -> ClaimTiming {
        let d = &self.config.delivery;
        ClaimTiming { lease: d.lease, settle: d.settle, max_settle: d.settle * 10 }
    }

    fn mark_ready(&self) {
        if !self.ready.swap(true, Ordering::Relaxed) {
            self.notifier.ready();
        }
    }

    /// Forgets this instance on a clean stop.
    async fn leave(&self, db: &Client) {
        let _ = db.execute("delete from keap_sync.instances where instance = $1", &[&self.instance]).await;
    }

    /// Lets deliveries in flight finish. On a stop they get `shutdown_grace`; after a lost
    /// connection their results cannot be recorded anyway, so they are aborted at once. What
    /// is unfinished is released (or, without a connection, left to its lease).
    async fn finish(&self, db: &Client, recorder: &Recorder, tasks: &mut JoinSet<Outcome>, stopping: bool) {
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
        // An aborted delivery may have handed its result over: recorded before the release,
        // it is not delivered again. (Bounded: a result stuck behind a locked row is left to
        // the release, and delivered again.)
        let _ = tokio::time::timeout(self.config.delivery.shutdown_grace, recorder.flush()).await;
        match outbox::release_all(db, &self.instance, grace).await {
            Ok(0) => {}
            Ok(n) => tracing::info!(released = n, "released unfinished claims"),
            Err(e) => {
                tracing::debug!(error = %e, "could not release claims; their leases will expire")
            }
        }
    }
}

/// Deliveries paused because Keap refuses a credential that should work (a 403, or a 401 even
/// with a freshly refreshed token): a loop of calls (and refreshes) would only burn the day's
/// quota, and parking would blame every change for the credential's fault. One probe delivery
/// at a time tries again after [`REFUSED_FIRST_PROBE`], doubling to [`REFUSED_MAX_PROBE`];
/// the pause ends when Keap accepts a probe's call.
struct Refusal {
    /// Keap's answer and what a person can do about it.
    reason: String,
    /// The wait before the next probe.
    delay: Duration,
    next_probe: Instant,
    /// The probe delivery in flight, if any: only its outcome ends or extends the pause.
    probe: Option<tokio::task::Id>,
}

/// The state of one connected, delivering stretch. Owned by the session's loop alone, so none
/// of it needs a lock.
struct Session<'a> {
    ctx: &'a Context,
    /// Shared with every delivery; prepares the statements of the delivery path once.
    db: Arc<db::Db>,
    /// The LISTEN connection; also holds the delivery lock (a session-level advisory lock).
    listener: db::Listener,
    /// Woken by every notification (a stored permit covers one that arrives between waits).
    wake: Arc<Notify>,
    deliverer: Arc<Deliverer>,
    /// Deliveries (and the idle token check) in flight; at most `delivery.concurrency`.
    tasks: JoinSet<Outcome>,
    /// Why deliveries are paused (authorisation needed, or Keap refusing the credential), if
    /// they are: what the heartbeat reports to `status` and `/healthz`.
    paused: Option<String>,
    /// While Keap refuses the credential: the probe schedule (`paused` says why).
    refusal: Option<Refusal>,
    /// Set by a task that found the connection gone; ends the session at the next turn.
    lost: Option<DbError>,
    /// When the idle token check last ran. `None`: not yet in this session, so it runs at once.
    /// (Not `now() - interval`: the monotonic clock starts at boot, and a service can start
    /// within a minute of it.)
    token_checked: Option<Instant>,
    /// When the heartbeat last ran; `None` as above.
    beat: Option<Instant>,
    /// What is wrong with capture (trigger, key, synced columns), as the last check found it.
    capture: Option<schema::CaptureProblem>,
    /// When capture was last checked; `None` as above.
    capture_checked: Option<Instant>,
    /// Whether the change log may hold changes to fold into the outbox: set by a notification
    /// (every capturing commit sends one), by a fold that filled its batch, and at the start
    /// of a session (a new LISTEN connection: notifications sent before it were not heard).
    fold_due: bool,
    /// When to fold without a notification: [`FOLD_SWEEP`] after the last fold, or a poll
    /// interval after one that had to leave changes in the log.
    next_fold: Instant,
}

impl Session<'_> {
    /// Turns the loop until a stop (`Ok`) or a lost connection (`Err`).
    async fn deliver(&mut self, stop: &CancellationToken) -> Result<(), DbError> {
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
    async fn release_orphaned_claims(&self) -> Result<(), DbError> {
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
    async fn turn(&mut self) -> Result<Duration, DbError> {
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
            self.claim_when_free(wait).await?
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
    async fn check_capture_when_due(&mut self) -> Result<(), DbError> {
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
    async fn fold_when_due(&mut self) -> Result<(), DbError> {
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
    async fn check_pause(&mut self) -> Result<Duration, DbError> {
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
    fn check_token_when_due(&mut self) {
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

    /// Claims as many changes as there are free delivery slots (unless every sender is paused
    /// by Keap's quota or a 429) and returns how long to wait: until the next change is due, at
    /// most `wait`.
    async fn claim_when_free(&mut self, mut wait: Duration) -> Result<Duration, DbError> {
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
    async fn claim_and_spawn(&mut self, free: usize) -> Result<Vec<tokio::task::Id>, DbError> {
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
    async fn probe_when_due(&mut self, wait: Duration) -> Result<Duration, DbError> {
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
    fn refused(&mut self, reason: String, was_probe: bool) {
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
    fn resume_after_refusal(&mut self) {
        if self.refusal.take().is_some() {
            tracing::info!("Keap accepted the probe delivery; resuming deliveries");
            self.paused = None;
            self.beat = None;
        }
    }

    /// Waits for a notification, a finished task, `wait`, a lost LISTEN connection or a stop.
    async fn wait(&mut self, wait: Duration, stop: &CancellationToken) {
        tokio::select! {
            _ = self.wake.notified() => self.fold_due = true,
            Some(joined) = self.tasks.join_next_with_id(), if !self.tasks.is_empty() => self.handle(joined),
            _ = tokio::time::sleep(wait) => {}
            reason = self.listener.lost.recv() => {
                self.lost = Some(DbError::Connect {
                    target: db::describe(&self.ctx.pg),
                    message: reason.unwrap_or_else(|| "listener ended".into()),
                });
            }
            _ = stop.cancelled() => {}
        }
    }

    fn handle(&mut self, joined: Result<(tokio::task::Id, Outcome), tokio::task::JoinError>) {
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

/// Enqueues the backfill and watches it until delivered, resuming from its cursor after a
/// database error (with the reconnect backoff) until it is done or the daemon stops. With
/// `exit_when_done`, a finished backfill stops the daemon.
async fn backfill_until_done(
    ctx: Arc<Context>,
    mode: BackfillMode,
    exit_when_done: bool,
    stop: CancellationToken,
) {
    let mut failures = 0;
    loop {
        match tokio::select! {
            result = run_backfill(&ctx, mode) => result,
            _ = stop.cancelled() => return,
        } {
            Ok(()) => break,
            Err(e) => {
                failures += 1;
                let delay = db::reconnect_delay(failures);
                tracing::warn!(error = %e, retry_in_ms = delay.as_millis() as u64, "backfill interrupted; resuming");
                tokio::select! {
                    _ = tokio::time::sleep(delay) => {}
                    _ = stop.cancelled() => return,
                }
            }
        }
    }
    if exit_when_done {
        stop.cancel();
    }
}

/// Enqueues the backfill, then watches it until every backfill change is delivered, logging
/// progress every 10 s.
async fn run_backfill(ctx: &Context, mode: BackfillMode) -> Result<(), DbError> {
    let client = db::connect(&ctx.pg).await?;
    if !backfill::begin(&client, &ctx.table, mode).await? {
        tracing::info!(
            "the backfill already finished; nothing to enqueue (use --backfill=restart to run it again)"
        );
        return Ok(());
    }
    let started = Instant::now();
    let mut logged = Instant::now();
    backfill::enqueue_all(&client, &ctx.table, |enqueued| {
        if logged.elapsed() >= Duration::from_secs(10) {
            logged = Instant::now();
            tracing::info!(enqueued, "backfill: enqueuing");
        }
    })
    .await?;
    tracing::info!(secs = started.elapsed().as_secs_f64(), "backfill: every user is enqueued");
    let mut logged: Option<Instant> = None;
    loop {
        let Some(p) = backfill::finish_if_delivered(&client).await? else { return Ok(()) };
        if p.state == BackfillState::Done {
            tracing::info!(users = p.total, parked = p.parked, "backfill done");
            return Ok(());
        }
        if logged.is_none_or(|t| t.elapsed() >= Duration::from_secs(10)) {
            logged = Some(Instant::now());
            tracing::info!(
                delivered = p.delivered(),
                total = p.total,
                parked = p.parked,
                "backfill progress"
            );
        }
        tokio::time::sleep(BACKFILL_WATCH).await;
    }
}

/// Enqueues every user of the configured table as a backfill, without delivering: the first
/// half of `keap-sync backfill`, for embedding and for the backfill benchmark. `on_batch` sees
/// the running count after each batch (one statement, one transaction). Returns false, having
/// done nothing, when a finished backfill exists and `mode` is [`BackfillMode::Resume`].
pub async fn enqueue_backfill(
    config: &Config,
    mode: BackfillMode,
    on_batch: impl FnMut(i64),
) -> Result<bool, RunError> {
    let client = db::connect(&db::parse(config.database()?)?).await?;
    schema::ensure_current(&client).await?;
    let table = UserTable::resolve(&client, &config.users).await?;
    if !backfill::begin(&client, &table, mode).await? {
        return Ok(false);
    }
    backfill::enqueue_all(&client, &table, on_batch).await?;
    Ok(true)
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
