//! Recording failures: a retry scheduled, a change parked with its reason, or a refused claim
//! given back behind the others.

use std::time::Duration;

use super::Claim;
use crate::db::{Db, DbError};

/// What is recorded about a failed delivery, for the retry schedule and `failures list`.
#[derive(Debug, Clone, Default, PartialEq)]
pub(crate) struct FailureRecord {
    /// One line: what failed and why.
    pub message: String,
    /// Keap's HTTP status, if it answered.
    pub status: Option<i32>,
    /// Keap's answer body, if any.
    pub body: Option<String>,
    /// The payload that was sent.
    pub payload: Option<serde_json::Value>,
    /// The failed call was a create that Keap answered for certain (a 4xx): no contact was
    /// made, so an earlier in-doubt create record is cleared.
    pub settles_create: bool,
    /// Parked because another user holds this contact: the row is un-parked by itself when no
    /// user holds it any more (`sql/0013_parks_that_clear.sql`). If that already happened when
    /// the failure is recorded, the row is retried at once instead of parked.
    pub waits_for_contact: Option<i64>,
}

/// Puts a transiently failed change back with a retry time, as a retry (priority 1, so live
/// changes go first). The schedule lives in the row, so it survives restarts.
pub(crate) async fn retry_later(
    client: &Db,
    claim: &Claim,
    instance: &str,
    delay: Duration,
    failure: &FailureRecord,
) -> Result<(), DbError> {
    record_failure(client, claim, instance, failure, Some(delay)).await
}

/// Parks a change that cannot succeed as it is (Keap's 400, a row we cannot map). It stays
/// visible with its reason and is tried again on the user's next change or on
/// `keap-sync failures retry`. If a newer change already arrived, the row is released for it
/// instead of parked.
pub(crate) async fn park(
    client: &Db,
    claim: &Claim,
    instance: &str,
    failure: &FailureRecord,
) -> Result<(), DbError> {
    record_failure(client, claim, instance, failure, None).await
}

/// `retry_in`: `Some(delay)` schedules a retry, `None` parks.
async fn record_failure(
    client: &Db,
    claim: &Claim,
    instance: &str,
    failure: &FailureRecord,
    retry_in: Option<Duration>,
) -> Result<(), DbError> {
    let delay = retry_in.map(|d| d.as_secs_f64());
    client
        .cached_execute(
            "update keap_sync.outbox
                set lease_until = null, leased_by = null,
                    parked_at = case when $3::float8 is null and version = $2
                                          and ($11::int8 is null or exists (select from keap_sync.contact_map m
                                                                             where m.contact_id = $11))
                                     then now() end,
                    waits_for_contact = $11,
                    next_attempt_at = now() + make_interval(secs => coalesce($3, 0)),
                    priority = case when $3 is null then priority else greatest(priority, 1) end,
                    last_error = $5, last_status = $6, last_body = $7, payload = $8,
                    first_failed_at = coalesce(first_failed_at, now()), last_failed_at = now(),
                    create_sent = case when $10 then null else create_sent end
              where user_key = $1 and leased_by = $4 and attempts = $9",
            &[
                &claim.user_key,
                &claim.version,
                &delay,
                &instance,
                &failure.message,
                &failure.status,
                &failure.body,
                &failure.payload,
                &claim.attempts,
                &failure.settles_create,
                &failure.waits_for_contact,
            ],
        )
        .await?;
    Ok(())
}

/// Gives back a claim Keap refused for a reason that is not the change's own (a 403, or a 401
/// with a fresh token: the credential lacks the right). Not counted as an attempt and never
/// parked; it goes behind the other due changes of its priority, so the daemon's next probe
/// tries another user (a refusal that is really about this one user cannot hold up the rest),
/// and Keap's answer is kept in the row. The payload is not stored: nothing was applied.
pub(crate) async fn requeue_refused(
    client: &Db,
    claim: &Claim,
    instance: &str,
    failure: &FailureRecord,
) -> Result<(), DbError> {
    client
        .cached_execute(
            "update keap_sync.outbox
                set lease_until = null, leased_by = null, attempts = greatest(attempts - 1, 0),
                    next_attempt_at = greatest(next_attempt_at, now()),
                    last_error = $4, last_status = $5, last_body = $6, last_failed_at = now()
              where user_key = $1 and leased_by = $2 and attempts = $3",
            &[&claim.user_key, &instance, &claim.attempts, &failure.message, &failure.status, &failure.body],
        )
        .await?;
    Ok(())
}
