//! `keap_sync.hook_queue`: the contact ids Keap's hooks named, one row per contact.

use tokio_postgres::Client;

use crate::db::DbError;

/// Queues `ids` (a contact named again is coalesced into its row, moved to now), in one
/// statement. `ids` must hold no id twice (one statement may not update a row twice).
pub(super) async fn push(db: &Client, ids: &[i64]) -> Result<u64, DbError> {
    let n = db
        .execute(
            "insert into keap_sync.hook_queue (contact_id) select unnest($1::bigint[])
             on conflict (contact_id) do update
                set queued_at = clock_timestamp(), deliveries = hook_queue.deliveries + 1",
            &[&ids],
        )
        .await?;
    Ok(n)
}

/// The oldest queued ids, at most `$1`, each with its `queued_at` as text (what the reader
/// hands back to remove exactly the row it read, not one queued again meanwhile).
pub(crate) const QUEUED: &str =
    "select contact_id, queued_at::text from keap_sync.hook_queue order by queued_at, contact_id limit $1";
