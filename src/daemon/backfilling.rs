//! `--backfill` inside the daemon: enqueue every existing user, then watch until they are
//! delivered; and [`enqueue_backfill`], the enqueueing alone, for embedding.

use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::{Context, RunError};
use crate::backfill::{self, BackfillMode, BackfillState};
use crate::config::Config;
use crate::db::{self, DbError};
use crate::schema::{self, UserTable};

/// How often a running backfill's progress is read (and, every 10 s, logged).
const BACKFILL_WATCH: Duration = Duration::from_millis(500);

/// Enqueues the backfill and watches it until delivered, resuming from its cursor after a
/// database error (with the reconnect backoff) until it is done or the daemon stops. With
/// `exit_when_done`, a finished backfill stops the daemon.
pub(super) async fn backfill_until_done(
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
pub(super) async fn run_backfill(ctx: &Context, mode: BackfillMode) -> Result<(), DbError> {
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
