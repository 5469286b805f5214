//! How a delivery ended, recorded: one outbox statement per end (completed, retried later,
//! parked, given back), and the metric that goes with it.

use crate::db::DbError;
use crate::keap::ErrorKind;
use crate::mapping::ContactPayload;
use crate::metrics::DeliveryOutcome;
use crate::outbox::{self, Claim, Done, FailureRecord};
use crate::token::TokenError;

use super::{backoff, refusal, Deliverer, End, Failure, Outcome};

impl Deliverer {
    /// Records how a delivery of a present user ended.
    pub(super) async fn record(
        &self,
        claim: &Claim,
        payload: &ContactPayload,
        end: End,
    ) -> Result<Outcome, DbError> {
        match end {
            End::Synced { contact_id, called, tags, settled } => {
                // Keap's values of shared properties go into their columns first; then both
                // sides hold the payload with them taken in.
                let taken;
                let payload = if settled.any() {
                    self.take(claim, contact_id, &settled).await?;
                    taken = payload.with_taken(&settled);
                    &taken
                } else {
                    payload
                };
                // Keap holds the payload now; a payload its `sent` records already needs no
                // write at all (one it does not, with no call: a withdrawn consent).
                let recorded = claim.sent.as_ref().is_some_and(|sent| payload.recorded_in(sent));
                let done = if !called && recorded && claim.contact_id == Some(contact_id) {
                    Done::Nothing
                } else {
                    Done::Synced { contact_id, fingerprint: payload.fingerprint(), sent: payload.sent(&tags) }
                };
                self.recorder.complete(claim, done).await?;
                if called {
                    tracing::debug!(user = %claim.user_key, contact = contact_id, "delivered");
                    self.metrics.delivery(DeliveryOutcome::Synced);
                } else {
                    tracing::debug!(user = %claim.user_key, "payload unchanged; no write");
                    self.metrics.delivery(DeliveryOutcome::Unchanged);
                }
                Ok(if called { Outcome::Accepted } else { Outcome::Handled })
            }
            End::Failed { failure, sent, settles_create } => {
                self.failed(claim, failure, sent, settles_create).await
            }
            End::Park(message) => {
                tracing::warn!(user = %claim.user_key, reason = %message, "parked");
                self.park(claim, message).await
            }
            End::Taken { message, contact_id } => {
                tracing::warn!(user = %claim.user_key, reason = %message, "parked until the contact is free");
                let record = FailureRecord {
                    message,
                    waits_for_contact: Some(contact_id),
                    ..FailureRecord::default()
                };
                outbox::with_retries("park", &claim.user_key, || {
                    outbox::park(&self.db, claim, &self.instance, &record)
                })
                .await?;
                self.metrics.delivery(DeliveryOutcome::Parked);
                Ok(Outcome::Handled)
            }
            End::RetryLater(message) => {
                let delay = backoff(&self.delivery, claim.attempts);
                tracing::info!(user = %claim.user_key, retry_in_ms = delay.as_millis() as u64, reason = %message, "trying again later");
                let record = FailureRecord { message, ..FailureRecord::default() };
                outbox::with_retries("retry_later", &claim.user_key, || {
                    outbox::retry_later(&self.db, claim, &self.instance, delay, &record)
                })
                .await?;
                self.metrics.delivery(DeliveryOutcome::Retried);
                Ok(Outcome::Handled)
            }
            End::Release => {
                outbox::with_retries("release", &claim.user_key, || {
                    outbox::release(&self.db, claim, &self.instance)
                })
                .await?;
                Ok(Outcome::Handled)
            }
        }
    }

    /// Parks the change with `message`: only a new change or `failures retry` sends it again.
    pub(super) async fn park(&self, claim: &Claim, message: String) -> Result<Outcome, DbError> {
        let record = FailureRecord { message, ..FailureRecord::default() };
        outbox::with_retries("park", &claim.user_key, || {
            outbox::park(&self.db, claim, &self.instance, &record)
        })
        .await?;
        self.metrics.delivery(DeliveryOutcome::Parked);
        Ok(Outcome::Handled)
    }

    /// Records a deleted user's delivery that ended before its `on_delete` steps were done.
    pub(super) async fn record_delete_end(&self, claim: &Claim, end: End) -> Result<Outcome, DbError> {
        match end {
            End::Failed { failure, sent, settles_create } => {
                self.failed(claim, failure, sent, settles_create).await
            }
            End::Park(message) => {
                tracing::warn!(user = %claim.user_key, reason = %message, "parked a delete");
                self.park(claim, message).await
            }
            _ => {
                outbox::with_retries("release", &claim.user_key, || {
                    outbox::release(&self.db, claim, &self.instance)
                })
                .await?;
                Ok(Outcome::Handled)
            }
        }
    }

    /// Completes a delete: the mapping is forgotten (`Done::Forgotten`) or there was none.
    pub(super) async fn forget(&self, claim: &Claim, done: Done) -> Result<(), DbError> {
        self.recorder.complete(claim, done).await?;
        self.metrics.delivery(DeliveryOutcome::Deleted);
        Ok(())
    }

    /// Decides what a failed call or credential means for the change: wait for a person to
    /// authorise, pause for a refused credential, retry later, or park with Keap's answer.
    pub(super) async fn failed(
        &self,
        claim: &Claim,
        failure: Failure,
        payload: Option<serde_json::Value>,
        settles_create: bool,
    ) -> Result<Outcome, DbError> {
        let e = match failure {
            Failure::Token(TokenError::NeedsAuthorization(message)) => {
                outbox::with_retries("release", &claim.user_key, || {
                    outbox::release(&self.db, claim, &self.instance)
                })
                .await?;
                return Ok(Outcome::NeedsAuthorization(message));
            }
            Failure::Token(TokenError::Db(e)) => return Err(e),
            Failure::Token(TokenError::Transient(message) | TokenError::InvalidResponse(message)) => {
                let delay = backoff(&self.delivery, claim.attempts);
                tracing::warn!(user = %claim.user_key, retry_in_ms = delay.as_millis() as u64, error = %message, "token refresh failed; will retry");
                let record = FailureRecord { message, payload, ..FailureRecord::default() };
                outbox::with_retries("retry_later", &claim.user_key, || {
                    outbox::retry_later(&self.db, claim, &self.instance, delay, &record)
                })
                .await?;
                self.metrics.delivery(DeliveryOutcome::Retried);
                return Ok(Outcome::Handled);
            }
            Failure::Keap(e) => e,
        };
        let record = FailureRecord {
            message: e.to_string(),
            status: e.status.map(i32::from),
            body: e.body.clone(),
            payload,
            settles_create,
            waits_for_contact: None,
        };
        match e.kind {
            ErrorKind::Unauthorized | ErrorKind::Forbidden => {
                // A 403, or still 401 right after a refresh: retrying this change soon, or
                // parking it, would not help; the daemon pauses and probes instead.
                tracing::warn!(user = %claim.user_key, error = %e, "Keap refused the credential; the change stays queued");
                let record = FailureRecord { payload: None, ..record };
                outbox::with_retries("requeue_refused", &claim.user_key, || {
                    outbox::requeue_refused(&self.db, claim, &self.instance, &record)
                })
                .await?;
                Ok(Outcome::Refused(refusal(&e, self.tokens.is_oauth())))
            }
            kind if kind.is_retryable() => {
                // After a 429 the limiter has paused every sender; retry when it reopens.
                let delay = e.retry_after.unwrap_or_else(|| backoff(&self.delivery, claim.attempts));
                tracing::warn!(user = %claim.user_key, retry_in_ms = delay.as_millis() as u64, error = %e, "delivery failed; will retry");
                outbox::with_retries("retry_later", &claim.user_key, || {
                    outbox::retry_later(&self.db, claim, &self.instance, delay, &record)
                })
                .await?;
                self.metrics.delivery(DeliveryOutcome::Retried);
                Ok(Outcome::Handled)
            }
            _ => {
                tracing::warn!(user = %claim.user_key, error = %e, "Keap rejected the change; parked until the user changes again");
                outbox::with_retries("park", &claim.user_key, || {
                    outbox::park(&self.db, claim, &self.instance, &record)
                })
                .await?;
                self.metrics.delivery(DeliveryOutcome::Parked);
                Ok(Outcome::Handled)
            }
        }
    }
}
