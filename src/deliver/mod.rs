//! Delivering one claimed change: read state → plan → run the plan's steps → record.
//!
//! - [`plan`] decides, with no I/O: the steps (Keap calls, links, parks) for what is known.
//!   `preview` prints the same plans.
//! - `run` performs the steps, each read answered by planning again with what it found.
//! - `record` writes how the delivery ended to the outbox.
//!
//! The decision table ([`plan`]; ARCHITECTURE.md, invariants 4–6 and 12–14):
//!
//! | user row | mapping | owned values | action |
//! | --- | --- | --- | --- |
//! | gone | – | – | `on_delete`: keep the contact, `DELETE` it, or tag it (and opt its email out); always on the contact mapped *now* (not at claim time), then forget the mapping |
//! | breaks a rule | any | – | park, naming the user, the column and the rule: only a new change can fix it |
//! | present | mapped | unchanged, same tags | nothing: Keap already holds them |
//! | present | mapped | changed | `PATCH` only the changed properties (an array property: read the contact first and send its other slots back); then at most one tag apply and one tag remove; a 404 links again |
//! | present | none | – | look up by email (an in-doubt create's email first) → link a contact whose EMAIL1 is the address and `PATCH` what differs, or record the create, then `PUT /v1/contacts`; then one apply of the rule and `on_create` tags. A contact holding the address only in EMAIL2/EMAIL3 is never taken: the user is parked naming it (`not_adopted`). With `[mirror] lookups`, the mirror answers the lookup of the user's own address (`crate::mirror::Lookups`): a contact it names is linked only with a call to it (a `PATCH`, else a read first), and an answer that would park the user is asked of Keap |
//!
//! A contact is linked (mapped) before anything is written to it, so two users never share one
//! and a key that is gone is never mapped (`outbox::link`). Results: success completes the
//! claim; a transient failure schedules a retry with exponential backoff and jitter; a rejection
//! parks the change with Keap's message; a 401 refreshes the token and retries once. A 403, or a
//! 401 again with the fresh token, is the credential's fault, not the change's: the change is
//! requeued and the daemon pauses deliveries and probes (`Outcome::Refused`). Nothing is ever
//! dropped: every call here is safe to repeat, so a delivery that fails half-way (the PATCH
//! done, the tag apply refused) is simply delivered again.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use rand::Rng;
use tokio::time::Instant;

use crate::catalog::{Catalog, Tags};
use crate::config::{DeliveryConfig, TagRef};
use crate::db::DbError;
use crate::keap::{Auth, ErrorKind, KeapClient, KeapError};
use crate::mapping::{CustomModel, Mapper, RuleTags, Settled};
use crate::metrics::Metrics;
use crate::outbox::recorder::Recorder;
use crate::outbox::{Claim, ReadUser};
use crate::token::{TokenError, TokenSource};

pub(crate) mod plan;
mod record;
mod run;
mod take;

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
    pub db: Arc<crate::db::Db>,
    pub keap: KeapClient,
    pub tokens: Arc<TokenSource>,
    pub delivery: DeliveryConfig,
    pub instance: String,
    /// Records successes, creates about to be sent and links, in batches, on `db`.
    pub recorder: Recorder,
    pub metrics: Arc<Metrics>,
    /// The configured mapping from a row to a contact and its tags.
    pub mapper: Arc<Mapper>,
    /// Keap's custom fields and tag ids, looked up once (it outlives reconnects).
    pub catalog: Arc<Catalog>,
    /// New users' lookups answered from the mirror (`[mirror] lookups`), or `None`: by Keap.
    pub lookups: Option<crate::mirror::Lookups>,
    /// The users table, into whose columns Keap's values of shared properties are written.
    pub table: Arc<crate::schema::UserTable>,
    /// Every write Keap accepts is recorded in the mirror with Keap's stamp of it (`[hooks]`
    /// configured: the hooks Keap fires for the write then cost no call, `mirror::remember`).
    pub remember_writes: bool,
}

impl Deliverer {
    /// Delivers one claimed change. `row` is the user's current row, `None` if deleted, or why
    /// it cannot be read (then the change is parked with that reason).
    ///
    /// `deadline` is when the claim's lease ends (less a margin); no call starts that could
    /// end after it.
    pub(crate) async fn deliver(&self, claim: Claim, row: Option<ReadUser>, deadline: Instant) -> Outcome {
        match self.attempt(&claim, row, deadline).await {
            Ok(outcome) => outcome,
            Err(e) if e.is_connection_lost() => {
                tracing::warn!(user = %claim.user_key, error = %e, "could not record a delivery result");
                Outcome::DbLost(e)
            }
            Err(e) => {
                // `outbox::with_retries` gave up on a statement while the connection is fine:
                // this delivery alone is affected. Its claim stays until the lease ends, then
                // the change is delivered again (every call is safe to repeat).
                tracing::error!(user = %claim.user_key, error = %e, detail = %e.server_message(), "could not record a delivery result after retrying; the change will be delivered again when its lease ends");
                Outcome::Handled
            }
        }
    }

    /// What becomes of one claimed change: parked when the row cannot be read or mapped, handled as a
    /// deletion when the row is gone, else sent to Keap and recorded.
    async fn attempt(
        &self,
        claim: &Claim,
        row: Option<ReadUser>,
        deadline: Instant,
    ) -> Result<Outcome, DbError> {
        let row = match row {
            None => return self.deleted(claim, deadline).await,
            Some(Ok(row)) => row,
            Some(Err(unreadable)) => {
                tracing::warn!(user = %claim.user_key, reason = %unreadable.0, "parked a user whose row cannot be read");
                return self.park(claim, unreadable.0).await;
            }
        };
        let model = match self.model(claim, deadline).await? {
            Ok(model) => model,
            Err(failure) => return self.failed(claim, failure, None, false).await,
        };
        let payload = match self.mapper.payload(&claim.user_key, &row, model) {
            Ok(p) => p,
            Err(e) => {
                tracing::warn!(user = %claim.user_key, reason = %e, "parked a change that cannot be mapped");
                return self.park(claim, e.to_string()).await;
            }
        };
        let want = match self.tag_ids(claim, &payload.tags, deadline).await? {
            Ok(ids) => ids,
            Err(end) => return self.record(claim, &payload, end).await,
        };
        let end = self.present(claim, &payload, &want, deadline).await?;
        self.record(claim, &payload, end).await
    }

    /// Keap's contact model, when custom fields are mapped (read once, then cached).
    async fn model(
        &self,
        claim: &Claim,
        deadline: Instant,
    ) -> Result<Result<Option<&CustomModel>, Failure>, DbError> {
        if !self.mapper.needs_model() {
            return Ok(Ok(None));
        }
        let catalog = &self.catalog;
        let found =
            self.with_auth(claim, |auth| async move {
                catalog.model(&self.keap, &auth, deadline).await.map(|_| ())
            })
            .await?;
        Ok(found.map(|()| self.catalog.model_if_known()))
    }

    /// The ids of tags named by the rules or `on_create`; a tag that does not exist (and may
    /// not be created) parks the change, naming it.
    async fn tag_ids(
        &self,
        claim: &Claim,
        refs: &BTreeSet<TagRef>,
        deadline: Instant,
    ) -> Result<Result<BTreeSet<i64>, End>, DbError> {
        if refs.is_empty() {
            return Ok(Ok(BTreeSet::new()));
        }
        let create = self.mapper.create_missing_tags();
        let catalog = &self.catalog;
        let found = self
            .with_auth(claim, |auth| async move {
                catalog.tag_ids(&self.keap, &auth, refs, create, deadline).await
            })
            .await?;
        Ok(match found {
            Ok(Tags::Ids(ids)) => Ok(ids.into_values().collect()),
            Ok(Tags::Missing(names)) => Err(End::Park(format!(
                "user {}: Keap has no tag named {}; create it in Keap, or set `[tags] create_missing = true` \
                 (the change syncs again on `keap-sync failures retry {}`)",
                claim.user_key,
                names.join(", "),
                claim.user_key
            ))),
            Err(failure) => Err(End::failed(failure, None)),
        })
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
}

enum Failure {
    Token(TokenError),
    Keap(KeapError),
}

/// How the delivery of a present user ended, before it is recorded.
enum End {
    /// Keap holds the payload and the rule tags `tags` on this contact; `called` is false
    /// when no call was needed.
    Synced { contact_id: i64, called: bool, tags: RuleTags, settled: Settled },
    /// A call or the credential failed; `sent` is the body of the failed write.
    Failed { failure: Failure, sent: Option<serde_json::Value>, settles_create: bool },
    /// Cannot succeed as things stand: park with this reason.
    Park(String),
    /// The contact this user's email leads to is linked to another user: park with this
    /// reason until no user holds `contact_id` any more (then it is un-parked by itself).
    Taken { message: String, contact_id: i64 },
    /// Not now (another user's create of the same email is in flight): retry with backoff.
    RetryLater(String),
    /// Someone else's work now (the key is gone, or the claim was lost): give the claim back.
    Release,
}

impl End {
    /// A failure that leaves a create in doubt unsettled: only a create's own 4xx says none was made.
    fn failed(failure: Failure, sent: Option<serde_json::Value>) -> End {
        End::Failed { failure, sent, settles_create: false }
    }
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
    use crate::config::OnDelete;

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
            capture_check: Duration::from_secs(30),
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
