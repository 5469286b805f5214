//! The long-running daemon (`keap-sync run`): wake up, claim, deliver, repeat.
//!
//! ```text
//!   NOTIFY keap_sync ─┐                   (a wake-up only: the change log may hold changes)
//!   poll interval ────┼─▶ fold the change log into the outbox ─▶ claim ≤ free slots (lease,
//!   next due time ────┤   committed) ─▶ read users ─▶ spawn deliveries (≤ concurrency)
//!   a delivery ends ──┘◀──────────────────────────────────────────────┘
//! ```
//!
//! - this file: [`Daemon::build`] and [`Daemon::run`], the tasks `run` owns;
//! - `instance`: one process's sessions, the delivery lock that makes the other instances
//!   standbys, the heartbeat; `orphans`: claims of instances that are gone;
//! - `session`: the loop of one connected stretch, and the pause while Keap refuses the
//!   credential; `backfilling`: `--backfill`; `report`: the drift report on a schedule.
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
//! Deliveries run in a [`JoinSet`](tokio::task::JoinSet) owned by the session, at most `delivery.concurrency` at a
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
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Notify;
use tokio_postgres::Client;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

mod backfilling;
mod instance;
mod orphans;
mod report;
mod session;
mod watch;

use backfilling::backfill_until_done;
pub use backfilling::enqueue_backfill;
use instance::{hostname, instance_id};

use crate::access::{AccessError, KeapAccess};
use crate::backfill::BackfillMode;
use crate::catalog::Catalog;
use crate::config::{Config, ConfigError, Credential};
use crate::db::{self, DbError};
use crate::hooks::Receiver;
use crate::keap::KeapClient;
use crate::mapping::Mapper;
use crate::metrics::Metrics;
use crate::ratelimit::{self, Limiter};
use crate::schema::{self, SchemaError, UserTable};
use crate::systemd::Notifier;
use crate::token::{TokenError, TokenSource};

/// How often an instance records itself in `keap_sync.instances`.
const HEARTBEAT: Duration = Duration::from_secs(5);

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

impl From<AccessError> for RunError {
    fn from(e: AccessError) -> Self {
        match e {
            AccessError::Config(e) => RunError::Config(e),
            AccessError::Setup(message) => RunError::Setup(message),
        }
    }
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
    /// The hook receiver's listener (`[hooks] listen`), bound at build time too.
    hooks_listener: Option<tokio::net::TcpListener>,
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
        let hooks_listener = match &config.hooks {
            Some(hooks) => Some(tokio::net::TcpListener::bind(hooks.listen).await.map_err(|e| {
                RunError::Setup(format!(
                    "cannot listen on {} for Keap's hooks (hooks.listen): {e}",
                    hooks.listen
                ))
            })?),
            None => None,
        };
        let KeapAccess { keap, tokens, limiter, metrics } = KeapAccess::build(&config, &pg)?;
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
            tag_book: Arc::default(),
            credential_kind: match credential {
                Credential::ApiKey(_) => "api key",
                Credential::OAuth { .. } => "oauth",
            },
            config,
            notifier: Notifier::from_env(),
            ready: AtomicBool::new(false),
            hooked: Arc::new(Notify::new()),
        };
        Ok(Daemon { context, options, first, metrics_listener, hooks_listener })
    }

    /// Runs until `shutdown` completes (or, with `exit_when_backfilled`, until the backfill is
    /// delivered). Returns once every task it started has ended.
    pub async fn run(self, shutdown: impl Future<Output = ()> + Send + 'static) -> Result<(), RunError> {
        let Daemon { context, options, first, metrics_listener, hooks_listener } = self;
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
        if let (Some(listener), Some(hooks)) = (hooks_listener, &context.config.hooks) {
            let receiver = Receiver::new(hooks.path.clone(), context.pg.clone(), Arc::clone(&context.hooked));
            tasks.spawn(serve_hooks(listener, Arc::new(receiver), stop.clone()));
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

/// Serves Keap's hooks until the daemon stops.
async fn serve_hooks(listener: tokio::net::TcpListener, receiver: Arc<Receiver>, stop: CancellationToken) {
    if let Ok(addr) = listener.local_addr() {
        tracing::info!(%addr, "receiving Keap's hooks");
    }
    tokio::select! {
        served = crate::hooks::serve(listener, receiver) => {
            if let Err(e) = served {
                tracing::error!(error = %e, "the hook receiver stopped");
            }
        }
        _ = stop.cancelled() => {}
    }
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
    pg: db::Target,
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
    /// Keap's tag list by id, for `[inbound] tags`; outlives database sessions.
    tag_book: Arc<crate::mirror::TagBook>,
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
    /// Notified by the hook receiver after it queued a delivery's ids: the session reads them
    /// at its next idle turn (it also looks at the queue every `session::HOOK_CHECK`, for ids
    /// another instance's receiver queued).
    hooked: Arc<Notify>,
}
