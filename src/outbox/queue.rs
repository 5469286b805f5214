//! Read-only views of the queue for `preview` and `run --dry-run`: the changes waiting and the
//! mappings of their users.

use std::collections::HashMap;

use serde_json::Value;
use tokio_postgres::Client;

use crate::db::DbError;

/// A user's link to its contact, as `preview` reads it.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Mapping {
    pub(crate) contact_id: i64,
    pub(crate) fingerprint: Option<String>,
    pub(crate) sent: Option<Value>,
}

/// The mappings of `keys` (read only).
pub(crate) async fn mappings(client: &Client, keys: &[String]) -> Result<HashMap<String, Mapping>, DbError> {
    let rows = client
        .query(
            "select user_key, contact_id, nullif(fingerprint, ''), sent
               from keap_sync.contact_map where user_key = any($1)",
            &[&keys],
        )
        .await?;
    Ok(rows
        .iter()
        .map(|r| (r.get(0), Mapping { contact_id: r.get(1), fingerprint: r.get(2), sent: r.get(3) }))
        .collect())
}

/// Keys of the changes waiting for delivery, with a version that grows with every new change,
/// in the order the daemon claims them (read only, for `preview` and `run --dry-run`). Changes
/// still in the change log count: they are folded, not read here, only by the daemon.
pub(crate) async fn pending(client: &Client, limit: i64) -> Result<Vec<(String, i64)>, DbError> {
    let rows = client
        .query(
            "with logged as (
                 select user_key, count(*) as n, min(at) as at from keap_sync.change group by user_key
             ), queued as (
                 select user_key, version, priority, next_attempt_at from keap_sync.outbox where parked_at is null
             )
             select user_key, coalesce(q.version, 0) + coalesce(l.n, 0)
               from queued q full join logged l using (user_key)
              order by coalesce(q.priority, 0), coalesce(q.next_attempt_at, l.at)
              limit $1",
            &[&limit],
        )
        .await?;
    Ok(rows.iter().map(|r| (r.get(0), r.get(1))).collect())
}
