//! Parked changes: what Keap rejected (or what could not be mapped), shown and replayed by
//! `keap-sync failures list` and `keap-sync failures retry`.
//!
//! A parked change stays in the outbox with its reason, Keap's answer and the payload that was
//! sent; nothing is dropped. The user's next change un-parks it by itself (the trigger clears
//! `parked_at`); `failures retry` does the same on demand, for example after fixing a custom
//! field in Keap. A change parked because its contact is linked to another user is also
//! un-parked by itself when no user holds that contact any more (`sql/0013_parks_that_clear.sql`).

use serde::Serialize;
use tokio_postgres::Client;

use crate::db::DbError;

/// One parked change.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct Parked {
    pub user_key: String,
    pub attempts: i32,
    pub reason: Option<String>,
    pub keap_status: Option<i32>,
    pub keap_body: Option<String>,
    pub payload: Option<serde_json::Value>,
    pub first_failed_at: Option<String>,
    pub last_failed_at: Option<String>,
    pub parked_at: String,
}

const ISO: &str = "'YYYY-MM-DD\"T\"HH24:MI:SS\"Z\"'";

/// Every parked change, oldest first.
pub(crate) async fn list(client: &Client) -> Result<Vec<Parked>, DbError> {
    let rows = client
        .query(
            &format!(
                "select user_key, attempts, last_error, last_status, last_body, payload,
                        to_char(first_failed_at at time zone 'UTC', {ISO}),
                        to_char(last_failed_at at time zone 'UTC', {ISO}),
                        to_char(parked_at at time zone 'UTC', {ISO})
                   from keap_sync.outbox
                  where parked_at is not null
                  order by parked_at, user_key"
            ),
            &[],
        )
        .await?;
    Ok(rows
        .iter()
        .map(|r| Parked {
            user_key: r.get(0),
            attempts: r.get(1),
            reason: r.get(2),
            keap_status: r.get(3),
            keap_body: r.get(4),
            payload: r.get(5),
            first_failed_at: r.get(6),
            last_failed_at: r.get(7),
            parked_at: r.get(8),
        })
        .collect())
}

/// Which parked changes to replay.
#[derive(Debug, Clone)]
pub(crate) enum Which {
    User(String),
    All,
}

/// Un-parks changes so the daemon tries them again now; returns how many.
pub(crate) async fn retry(client: &Client, which: &Which) -> Result<u64, DbError> {
    let sql = "update keap_sync.outbox
                  set parked_at = null, next_attempt_at = now(), attempts = 0
                where parked_at is not null and ($1::text is null or user_key = $1)";
    let key = match which {
        Which::User(k) => Some(k.as_str()),
        Which::All => None,
    };
    let n = client.execute(sql, &[&key]).await?;
    if n > 0 {
        crate::db::wake_daemons(client).await?;
    }
    Ok(n)
}
