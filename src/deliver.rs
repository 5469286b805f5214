//! Delivering one claimed change: read state → decide → at most one Keap write → record.
//!
//! The decision table (ARCHITECTURE.md, invariants 4–6):
//!
//! | user row | mapping | fingerprint | action |
//! | --- | --- | --- | --- |
//! | gone | any | – | `on_delete`: keep the contact, or `DELETE` it and forget the mapping |
//! | no email | any | – | park: only a new change can fix it |
//! | present | mapped | equal | nothing: Keap already has this payload |
//! | present | mapped | differs | `PATCH /v1/contacts/{id}`; a 404 re-links by upsert |
//! | present | none | – | `PUT /v1/contacts` (upsert by email): links an existing contact |
//!
//! Results: success completes the claim; a transient failure schedules a retry with
//! exponential backoff and jitter; a rejection parks the change with Keap's message; a 401
//! refreshes the token and retries once. A 403, or a 401 again with the fresh token, is the
//! credential's fault, not the change's: the change is requeued and the daemon pauses
//! deliveries and probes (`Outcome::Refused`). Nothing is ever dropped.

use std::sync::Arc;
use std::time::Duration;

use rand::Rng;
use tokio::time::Instant;
use tokio_postgres::Client;

use crate::config::{DeliveryConfig, OnDelete};
use crate::db::DbError;
use crate::keap::{Auth, ErrorKind, KeapClient, KeapError};
use crate::mapping::{ContactPayload, UPDATE_MASK};
use crate::metrics::{DeliveryOutcome, Metrics};
use crate::outbox::{self, Claim, Done, FailureRecord, UserRow};
use crate::token::{TokenError, TokenSource};

/// What the delivery loop needs to know about one finished delivery.
#[derive(Debug)]
pub(crate) enum Outcome {
    /// The claim was resolved (skipped, retried later, or parked) without Keap accepting a call.
    Handled,
    /// Keap accepted the call with our credential and the claim is resolved (synced, or the
    /// contact deleted): what ends a pause for a refused credential.
    Accepted,
    /// Keap refuses a credential that should work: a 403, or a 401 even with a freshly
    /// refreshed token. The change was requeued; deliveries pause and probe with backoff.
    /// Holds Keap's answer and what a person can do about it.
    Refused(String),
    /// No credential can be had until a person acts; the claim was released.
    NeedsAuthorization(String),
    /// The database connection failed while recording; the lease will expire and the change
    /// will be delivered again (the upsert and PATCH are safe to repeat).
    DbLost(DbError),
}

/// Everything a delivery task shares with the others.
pub(crate) struct Deliverer {
    pub db: Arc<Client>,
    pub keap: KeapClient,
    pub tokens: Arc<TokenSource>,
    pub delivery: DeliveryConfig,
    pub instance: String,
    pub metrics: Arc<Metrics>,
}

impl Deliverer {
    /// Delivers one claimed change. `row` is the user's current row, `None` if deleted.
    ///
    /// `deadline` is when the claim's lease ends (less a margin); no call starts that could
    /// end after it.
    pub(crate) async fn deliver(&self, claim: Claim, row: Option<UserRow>, deadline: Instant) -> Outcome {
        match self.attempt(&claim, row, deadline).await {
            Ok(outcome) => outcome,
            Err(e) => {
                tracing::warn!(user = %claim.user_key, error = %e, "could not record a delivery result");
                Outcome::DbLost(e)
            }
        }
    }

    async fn attempt(
        &self,
        claim: &Claim,
        row: Option<UserRow>,
        deadline: Instant,
    ) -> Result<Outcome, DbError> {
        let Some(row) = row else {
            return self.deleted(claim, deadline).await;
        };
        let payload = match ContactPayload::from_row(&row) {
            Ok(p) => p,
            Err(e) => {
                tracing::warn!(user = %claim.user_key, reason = %e, "parked a change that cannot be mapped");
                let record = FailureRecord { message: e.to_string(), ..FailureRecord::default() };
                outbox::park(&self.db, claim, &self.instance, &record).await?;
                self.metrics.delivery(DeliveryOutcome::Parked);
                return Ok(Outcome::Handled);
            }
        };
        let fingerprint = payload.fingerprint();
        if claim.contact_id.is_some() && claim.fingerprint.as_deref() == Some(fingerprint.as_str()) {
            tracing::debug!(user = %claim.user_key, "payload unchanged; no call");
            outbox::complete(&self.db, claim, &self.instance, &Done::Nothing).await?;
            self.metrics.delivery(DeliveryOutcome::Unchanged);
            return Ok(Outcome::Handled);
        }

        let result = self
            .with_auth(claim, |auth| {
                let payload = &payload;
                async move {
                    match claim.contact_id {
                        Some(id) => match self.keap.update_contact(&auth, id, &payload.patch_body(), &UPDATE_MASK, deadline).await {
                            Err(e) if e.kind == ErrorKind::NotFound => {
                                tracing::info!(user = %claim.user_key, contact = id, "contact gone in Keap; re-linking by email");
                                self.keap.upsert_contact(&auth, &payload.upsert_body(), deadline).await
                            }
                            other => other,
                        },
                        None => self.keap.upsert_contact(&auth, &payload.upsert_body(), deadline).await,
                    }
                }
            })
            .await?;
        match result {
            Ok(contact) => {
                tracing::debug!(user = %claim.user_key, contact = contact.id, "delivered");
                outbox::complete(
                    &self.db,
                    claim,
                    &self.instance,
                    &Done::Synced { contact_id: contact.id, fingerprint },
                )
                .await?;
                self.metrics.delivery(DeliveryOutcome::Synced);
                Ok(Outcome::Accepted)
            }
            Err(failure) => {
                let sent = match claim.contact_id {
                    Some(_) => payload.patch_body(),
                    None => payload.upsert_body(),
                };
                self.failed(claim, failure, serde_json::to_value(sent).ok()).await
            }
        }
    }

    async fn deleted(&self, claim: &Claim, deadline: Instant) -> Result<Outcome, DbError> {
        let (OnDelete::DeleteContact, Some(id)) = (self.delivery.on_delete, claim.contact_id) else {
            // Kept in Keap (or never synced): nothing to call. The mapping stays, so a user
            // restored under the same key updates the same contact.
            outbox::complete(&self.db, claim, &self.instance, &Done::Nothing).await?;
            self.metrics.delivery(DeliveryOutcome::Deleted);
            return Ok(Outcome::Handled);
        };
        let result = self
            .with_auth(claim, |auth| async move { self.keap.delete_contact(&auth, id, deadline).await })
            .await?;
        match result {
            Ok(()) => {
                tracing::info!(user = %claim.user_key, contact = id, "user deleted; deleted the Keap contact");
                outbox::complete(&self.db, claim, &self.instance, &Done::Forgotten).await?;
                self.metrics.delivery(DeliveryOutcome::Deleted);
                Ok(Outcome::Accepted)
            }
            Err(failure) => self.failed(claim, failure, None).await,
        }
    }

    /// Runs `call` with the current credential; on a 401, refreshes once and runs it again.
    async fn with_auth<T, F, Fut>(&self, claim: &Claim, call: F) -> Result<Result<T, Failure>, DbError>
    where
        F: Fn(Auth) -> Fut,
        Fut: std::future::Future<Output = Result<T, KeapError>>,
    {
        let auth = match self.tokens.auth(&self.db).await {
            Ok(a) => a,
            Err(e) => return Ok(Err(Failure::Token(e))),
        };
        match call(auth.clone()).await {
            Err(e) if e.kind == ErrorKind::Unauthorized => {
                tracing::info!(user = %claim.user_key, "Keap answered 401; refreshing the credential and retrying once");
                let fresh = match self.tokens.after_unauthorized(&auth).await {
                    Ok(a) => a,
                    Err(e) => return Ok(Err(Failure::Token(e))),
                };
                Ok(call(fresh).await.map_err(Failure::Keap))
            }
            other => Ok(other.map_err(Failure::Keap)),
        }
    }

    async fn failed(
        &self,
        claim: &Claim,
        failure: Failure,
        payload: Option<serde_json::Value>,
    ) -> Result<Outcome, DbError> {
        let e = match failure {
            Failure::Token(TokenError::NeedsAuthorization(message)) => {
                outbox::release(&self.db, claim, &self.instance).await?;
                return Ok(Outcome::NeedsAuthorization(message));
            }
            Failure::Token(TokenError::Db(e)) => return Err(e),
            Failure::Token(TokenError::Transient(message) | TokenError::InvalidResponse(message)) => {
                let delay = backoff(&self.delivery, claim.attempts);
                tracing::warn!(user = %claim.user_key, retry_in_ms = delay.as_millis() as u64, error = %message, "token refresh failed; will retry");
                let record = FailureRecord { message, payload, ..FailureRecord::default() };
                outbox::retry_later(&self.db, claim, &self.instance, delay, &record).await?;
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
        };
        match e.kind {
            ErrorKind::Unauthorized | ErrorKind::Forbidden => {
                // A 403, or still 401 right after a refresh: retrying this change soon, or
                // parking it, would not help; the daemon pauses and probes instead.
                tracing::warn!(user = %claim.user_key, error = %e, "Keap refused the credential; the change stays queued");
                let record = FailureRecord { payload: None, ..record };
                outbox::requeue_refused(&self.db, claim, &self.instance, &record).await?;
                Ok(Outcome::Refused(refusal(&e, self.tokens.is_oauth())))
            }
            kind if kind.is_retryable() => {
                // After a 429 the limiter has paused every sender; retry when it reopens.
                let delay = e.retry_after.unwrap_or_else(|| backoff(&self.delivery, claim.attempts));
                tracing::warn!(user = %claim.user_key, retry_in_ms = delay.as_millis() as u64, error = %e, "delivery failed; will retry");
                outbox::retry_later(&self.db, claim, &self.instance, delay, &record).await?;
                self.metrics.delivery(DeliveryOutcome::Retried);
                Ok(Outcome::Handled)
            }
            _ => {
                tracing::warn!(user = %claim.user_key, error = %e, "Keap rejected the change; parked until the user changes again");
                outbox::park(&self.db, claim, &self.instance, &record).await?;
                self.metrics.delivery(DeliveryOutcome::Parked);
                Ok(Outcome::Handled)
            }
        }
    }
}

enum Failure {
    Token(TokenError),
    Keap(KeapError),
}

/// Keap's refusal of a credential that should work, and what a person can do about it.
fn refusal(e: &KeapError, oauth: bool) -> String {
    let fix = match (e.kind, oauth) {
        (ErrorKind::Unauthorized, true) => {
            "the grant still refreshes but Keap refuses its fresh access token: check in Keap's \
             developer portal that the app is active, then re-authorise with `keap-sync auth login`"
        }
        (ErrorKind::Unauthorized, false) => {
            "Keap refuses the API key: check KEAP_API_KEY or the api key file (Settings > API in \
             Keap) and restart keap-sync"
        }
        (_, true) => {
            "the OAuth grant lacks the right to edit contacts: re-authorise with `keap-sync auth \
             login` as a Keap user who may edit contacts, and check the app's access in Keap's \
             developer portal"
        }
        (_, false) => {
            "the API key lacks the right to edit contacts: give it that right, or use a Personal \
             Access Token or Service Account Key that has it (Settings > API in Keap; a new key \
             needs a restart of keap-sync)"
        }
    };
    format!("{e} ({fix})")
}

/// Exponential backoff with jitter: base × 2^(attempt-1), capped, then a random point in its
/// upper half so that many changes failing together do not retry together.
pub(crate) fn backoff(d: &DeliveryConfig, attempt: i32) -> Duration {
    let exp = attempt.saturating_sub(1).clamp(0, 30) as u32;
    let full = d.retry_base.saturating_mul(1u32 << exp.min(20)).min(d.retry_max);
    let half = full / 2;
    half + full.mul_f64(rand::rng().random_range(0.0..0.5))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> DeliveryConfig {
        DeliveryConfig {
            concurrency: 1,
            poll_interval: Duration::from_secs(1),
            lease: Duration::from_secs(100),
            settle: Duration::ZERO,
            retry_base: Duration::from_secs(1),
            retry_max: Duration::from_secs(60),
            on_delete: OnDelete::Keep,
            shutdown_grace: Duration::from_secs(1),
        }
    }

    #[test]
    fn a_refusal_says_what_to_fix_for_each_credential() {
        let e = |status: u16| KeapError {
            kind: if status == 401 { ErrorKind::Unauthorized } else { ErrorKind::Forbidden },
            status: Some(status),
            request: "PUT /v1/contacts".into(),
            message: "Forbidden".into(),
            body: None,
            retry_after: None,
        };
        let oauth_401 = refusal(&e(401), true);
        assert!(oauth_401.starts_with("Keap answered 401 to PUT /v1/contacts"), "{oauth_401}");
        assert!(oauth_401.contains("keap-sync auth login"), "{oauth_401}");
        assert!(refusal(&e(403), true).contains("keap-sync auth login"));
        let key_403 = refusal(&e(403), false);
        assert!(key_403.contains("403") && key_403.contains("API key") && key_403.contains("Settings > API"));
        assert!(refusal(&e(401), false).contains("KEAP_API_KEY"));
    }

    #[test]
    fn backoff_grows_and_is_capped() {
        let d = cfg();
        for (attempt, full) in [(1, 1.0), (2, 2.0), (3, 4.0), (7, 60.0), (1000, 60.0)] {
            let b = backoff(&d, attempt).as_secs_f64();
            assert!(b >= full / 2.0 && b <= full, "attempt {attempt}: {b}");
        }
    }
}
