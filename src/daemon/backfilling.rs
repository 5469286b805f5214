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
use crate::mirror::{self, MirrorError};
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

/// With `[mirror] lookups`, a backfill starts with a full listing of Keap's contacts when the
/// mirror has none: one call per 1,000 contacts, so that each user's delivery finds its
/// contact (or that it has none) in the mirror instead of a lookup per user. A listing that
/// fails is logged, and the users are looked up in Keap one by one instead.
async fn list_first(ctx: &Context, client: &tokio_postgres::Client) -> Result<(), DbError> {
    if !ctx.config.mirror.lookups || mirror::listed(client).await? {
        return Ok(());
    }
    tracing::info!("backfill: listing Keap's contacts into the mirror first");
    let keap = mirror::Keap {
        client: &ctx.keap,
        tokens: &ctx.tokens,
        timeout: ctx.config.keap.request_timeout,
        retries: mirror::RETRIES,
    };
    match mirror::list_all(client, &keap, &ctx.mapper).await {
        Ok(listed) => tracing::info!(
            contacts = listed.contacts,
            calls = listed.pages,
            "backfill: Keap's contacts listed"
        ),
        Err(MirrorError::Db(e)) => return Err(e),
        Err(e) => {
            tracing::warn!(error = %e, "backfill: could not list Keap's contacts; each user is looked up in Keap instead")
        }
    }
    Ok(())
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
    list_first(ctx, &client).await?;
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
