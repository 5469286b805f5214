//! Backfill: sync the users that existed before the trigger was installed.
//!
//! Users are enqueued in key order, one batch per statement (so no long transaction and no lock
//! on the users table beyond a plain read), at the lowest priority (2), so live changes and
//! retries always go first. The last key enqueued is stored in `keap_sync.backfill` together
//! with the batch, atomically, under that row's lock: a stopped backfill continues where it
//! was, never from scratch and never skipping, and two processes cannot interleave batches.
//! Enqueuing never downgrades a pending live change (`on conflict do nothing`), and a user whose
//! payload Keap already has costs no call at delivery (the fingerprint check).
//!
//! Memory stays bounded whatever the table size: rows never leave the database; each batch
//! moves keys from `users` to `keap_sync.outbox` server-side.

use tokio_postgres::Client;

use crate::db::{self, DbError};
use crate::schema::UserTable;

/// Keys enqueued per statement.
pub(crate) const BATCH: i64 = 5_000;

/// What to do about an earlier backfill.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BackfillMode {
    /// Continue an unfinished backfill; do nothing if one has finished.
    Resume,
    /// Start over even if one has finished.
    Restart,
}

/// The life of a backfill, as `keap_sync.backfill.state` records it (the column keeps the text).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub(crate) enum BackfillState {
    /// Users are being enqueued, a batch at a time.
    Running,
    /// Every user is enqueued; deliveries are under way.
    Enqueued,
    /// Every backfill change is delivered (or parked).
    Done,
}

impl BackfillState {
    /// The state as `keap_sync.backfill.state` spells it.
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            BackfillState::Running => "running",
            BackfillState::Enqueued => "enqueued",
            BackfillState::Done => "done",
        }
    }

    /// The state `keap_sync.backfill.state` holds; any other text is an error naming the column.
    fn from_db(text: &str) -> Result<Self, DbError> {
        match text {
            "running" => Ok(BackfillState::Running),
            "enqueued" => Ok(BackfillState::Enqueued),
            "done" => Ok(BackfillState::Done),
            other => Err(DbError::unknown_value("keap_sync.backfill.state", other)),
        }
    }
}

/// Where a backfill stands.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub(crate) struct Progress {
    pub(crate) state: BackfillState,
    /// Users enqueued so far.
    pub(crate) enqueued: i64,
    /// Users in the table when the backfill started.
    pub(crate) total: i64,
    /// Backfill changes still waiting for delivery (not counting parked ones).
    pub(crate) pending: i64,
    /// Backfill changes parked (see `keap-sync failures list`).
    pub(crate) parked: i64,
}

impl Progress {
    /// Users whose backfill change is delivered (or was overtaken by a live change).
    pub(crate) fn delivered(&self) -> i64 {
        (self.enqueued - self.pending - self.parked).max(0)
    }
}

/// Reads the backfill row, if a backfill was ever started. The counts come from the outbox's
/// count table (`status::depth` says how it is kept), not from counting the outbox: this runs
/// every 500 ms while a backfill is delivered.
pub(crate) async fn progress(client: &Client) -> Result<Option<Progress>, DbError> {
    let row = client
        .query_opt(
            "select b.state, b.enqueued, b.total,
                    (select coalesce(sum(n), 0)::int8 from keap_sync.outbox_count where priority = 2 and not parked),
                    (select coalesce(sum(n), 0)::int8 from keap_sync.outbox_count where priority = 2 and parked)
               from keap_sync.backfill b where id = 1",
            &[],
        )
        .await?;
    row.map(|r| {
        Ok(Progress {
            state: BackfillState::from_db(r.get(0))?,
            enqueued: r.get(1),
            total: r.get(2),
            pending: r.get(3),
            parked: r.get(4),
        })
    })
    .transpose()
}

/// Starts (or resumes) a backfill. Returns false when a finished backfill exists and `mode`
/// is [`BackfillMode::Resume`]: there is nothing to do.
pub(crate) async fn begin(client: &Client, table: &UserTable, mode: BackfillMode) -> Result<bool, DbError> {
    let existing = progress(client).await?;
    match (existing, mode) {
        (Some(p), BackfillMode::Resume) if p.state == BackfillState::Done => return Ok(false),
        (Some(_), BackfillMode::Resume) => return Ok(true),
        _ => {}
    }
    client
        .execute(
            &format!(
                "insert into keap_sync.backfill as b (id, state, cursor, enqueued, total)
                 values (1, 'running', null, 0, (select count(*) from {}))
                 on conflict (id) do update
                    set state = 'running', cursor = null, enqueued = 0, total = excluded.total,
                        started_at = now(), enqueued_at = null, finished_at = null",
                table.qualified
            ),
            &[],
        )
        .await?;
    Ok(true)
}

/// Enqueues every remaining user, a batch at a time; `on_batch` sees the progress after each.
/// Returns when everything is enqueued (state `enqueued`).
pub(crate) async fn enqueue_all(
    client: &Client,
    table: &UserTable,
    mut on_batch: impl FnMut(i64),
) -> Result<(), DbError> {
    // One statement per batch: lock the backfill row, read the next keys after the cursor,
    // enqueue them, move the cursor. The cursor is the key's own text form, cast back to the
    // key type for the comparison, so the index on the key is used. The key is read as
    // `key::text` (the same text the trigger writes for integer, bigint, uuid and text keys),
    // never through `to_jsonb(row)`, so only the key column needs `SELECT`.
    let sql = format!(
        "with cur as (
             select cursor from keap_sync.backfill where id = 1 and state = 'running' for update
         ), batch as (
             select t.{key}::text as user_key, t.{key} as raw
               from {table} t, cur
              where cur.cursor is null or t.{key} > cur.cursor::{key_type}
              order by t.{key}
              limit $1
         ), queued as (
             insert into keap_sync.outbox (user_key, priority)
             select user_key, 2 from batch where user_key is not null
             on conflict (user_key) do nothing
             returning 1
         ), moved as (
             update keap_sync.backfill
                set cursor = coalesce((select raw::text from batch order by raw desc limit 1), cursor),
                    enqueued = enqueued + (select count(*) from batch),
                    state = case when (select count(*) from batch) < $1 then 'enqueued' else state end,
                    enqueued_at = case when (select count(*) from batch) < $1 then now() else enqueued_at end
              where id = 1 and exists (select from cur)
             returning enqueued, state
         )
         select (select count(*) from queued), enqueued, state from moved",
        key = table.key,
        table = table.qualified,
        key_type = table.key_type,
    );
    loop {
        let row = client.query_opt(&sql, &[&BATCH]).await?;
        let Some(row) = row else {
            // Not running (finished by another process, or never begun).
            return Ok(());
        };
        let queued: i64 = row.get(0);
        let enqueued: i64 = row.get(1);
        let state = BackfillState::from_db(row.get(2))?;
        if queued > 0 {
            db::wake_daemons(client).await?;
        }
        on_batch(enqueued);
        if state != BackfillState::Running {
            return Ok(());
        }
    }
}

/// Marks an enqueued backfill done once none of its changes waits for delivery. Returns the
/// progress after the check.
pub(crate) async fn finish_if_delivered(client: &Client) -> Result<Option<Progress>, DbError> {
    client
        .execute(
            "update keap_sync.backfill set state = 'done', finished_at = now()
              where id = 1 and state = 'enqueued'
                and not exists (select from keap_sync.outbox where priority = 2 and parked_at is null)",
            &[],
        )
        .await?;
    progress(client).await
}
