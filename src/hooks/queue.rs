//! `keap_sync.hook_queue`: the contact ids Keap's hooks named, one row per contact, with the
//! earliest and latest change time Keap's deliveries gave for it (`sql/0024_hook_changed_at.sql`).

use tokio_postgres::Client;

use crate::db::DbError;
use crate::keap::stamp;

/// A contact a delivery named, and the earliest and latest `timestamp` it gave for it
/// (microseconds since the epoch; both `None` when any of its object keys had none that reads).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Named {
    pub(super) id: i64,
    pub(super) first: Option<i64>,
    pub(super) last: Option<i64>,
}

impl Named {
    /// Another object key for the same contact: the earliest and latest change widen; a key
    /// without a stamp makes the contact's change time unknown.
    pub(super) fn add(&mut self, at: Option<i64>) {
        (self.first, self.last) = match (self.first, self.last, at) {
            (Some(first), Some(last), Some(at)) => (Some(first.min(at)), Some(last.max(at))),
            _ => (None, None),
        };
    }
}

/// Queues `named` (a contact named again is coalesced into its row, moved to now, its change
/// times widened, or made unknown by a delivery that has none), in one statement. `named`
/// must hold no id twice (one statement may not update a row twice).
pub(super) async fn push(db: &Client, named: &[Named]) -> Result<u64, DbError> {
    let ids: Vec<i64> = named.iter().map(|n| n.id).collect();
    let firsts: Vec<Option<i64>> = named.iter().map(|n| n.first).collect();
    let lasts: Vec<Option<i64>> = named.iter().map(|n| n.last).collect();
    let sql = format!(
        "insert into keap_sync.hook_queue as q (contact_id, first_changed_at, changed_at)
         select x.id, {}, {} from unnest($1::bigint[], $2::bigint[], $3::bigint[]) as x(id, first, last)
         on conflict (contact_id) do update
            set queued_at = clock_timestamp(), deliveries = q.deliveries + 1,
                first_changed_at = case when q.changed_at is null or excluded.changed_at is null then null
                                        else least(q.first_changed_at, excluded.first_changed_at) end,
                changed_at = case when q.changed_at is null or excluded.changed_at is null then null
                                  else greatest(q.changed_at, excluded.changed_at) end",
        stamp::sql("x.first"),
        stamp::sql("x.last")
    );
    let n = db.execute(&sql, &[&ids, &firsts, &lasts]).await?;
    Ok(n)
}

/// The oldest queued ids, at most `$1`, each with its `queued_at` as text (what the reader
/// hands back to remove exactly the row it read, not one queued again meanwhile).
pub(crate) const QUEUED: &str =
    "select contact_id, queued_at::text from keap_sync.hook_queue order by queued_at, contact_id limit $1";
