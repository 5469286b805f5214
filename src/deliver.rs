//! Delivering one claimed change: read state → decide → the fewest Keap calls → record.
//!
//! The decision table (ARCHITECTURE.md, invariants 4–6 and 12–14):
//!
//! | user row | mapping | owned values | action |
//! | --- | --- | --- | --- |
//! | gone | – | – | `on_delete`: keep the contact, `DELETE` it, or tag it (and opt its email out); always on the contact mapped *now* (not at claim time), then forget the mapping |
//! | breaks a rule | any | – | park, naming the user, the column and the rule: only a new change can fix it |
//! | present | mapped | unchanged, same tags | nothing: Keap already holds them |
//! | present | mapped | changed | `PATCH` only the changed properties (an array property: read the contact first and send its other slots back); then at most one tag apply and one tag remove; a 404 links again |
//! | present | none | – | look up by email (an in-doubt create's email first) → link a contact whose EMAIL1 is the address and `PATCH` what differs, or record the create, then `PUT /v1/contacts`; then one apply of the rule and `on_create` tags. A contact holding the address only in EMAIL2/EMAIL3 is never taken: the user is parked naming it (`not_adopted`) |
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
use crate::config::{DeliveryConfig, OnDelete, TagRef};
use crate::db::DbError;
use crate::keap::model::{ByEmail, Contact};
use crate::keap::{Auth, ErrorKind, KeapClient, KeapError};
use crate::mapping::{Changes, ContactPayload, CustomModel, Held, Mapper, RuleTags};
use crate::metrics::{DeliveryOutcome, Metrics};
use crate::outbox::recorder::Recorder;
use crate::outbox::{self, Claim, CreateSlot, Done, FailureRecord, Linked, ReadUser};
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
        let mut end = match claim.contact_id {
            Some(id) => self.update_mapped(claim, &payload, id, &want, deadline).await?,
            None => End::Unlinked,
        };
        if matches!(end, End::Unlinked) {
            if let Some(id) = claim.contact_id {
                tracing::info!(user = %claim.user_key, contact = id, "contact gone in Keap; linking again by email");
            }
            end = self.link_or_create(claim, &payload, &want, deadline).await?;
        }
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

    /// Records how a delivery of a present user ended.
    async fn record(&self, claim: &Claim, payload: &ContactPayload, end: End) -> Result<Outcome, DbError> {
        match end {
            End::Synced { contact_id, called, tags } => {
                // Keap holds the payload now; an unchanged payload whose `sent` is known needs
                // no write at all.
                let done = if !called && claim.sent.is_some() && claim.contact_id == Some(contact_id) {
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
            End::Release | End::Unlinked => {
                outbox::with_retries("release", &claim.user_key, || {
                    outbox::release(&self.db, claim, &self.instance)
                })
                .await?;
                Ok(Outcome::Handled)
            }
        }
    }

    async fn park(&self, claim: &Claim, message: String) -> Result<Outcome, DbError> {
        let record = FailureRecord { message, ..FailureRecord::default() };
        outbox::with_retries("park", &claim.user_key, || {
            outbox::park(&self.db, claim, &self.instance, &record)
        })
        .await?;
        self.metrics.delivery(DeliveryOutcome::Parked);
        Ok(Outcome::Handled)
    }

    /// A mapped user: send the owned properties that changed, nothing else (invariant 12),
    /// then move the rule tags. Returns [`End::Unlinked`] when the contact is gone in Keap.
    async fn update_mapped(
        &self,
        claim: &Claim,
        payload: &ContactPayload,
        id: i64,
        want: &BTreeSet<i64>,
        deadline: Instant,
    ) -> Result<End, DbError> {
        let held = Held::of_mapping(claim.sent.as_ref(), claim.fingerprint.as_deref(), payload);
        // Tags our rules applied before; unknown (a mapping from an older release) counts as
        // none, so every wanted tag is applied (applying one twice is harmless).
        let had = held.tags().cloned().unwrap_or_default();
        // Wanted tags someone else applied first stay theirs: not applied again, never removed.
        let wanted = RuleTags::split(want, held.theirs(), &BTreeSet::new());
        let on_create = if held.is_fresh() {
            match self.tag_ids(claim, &self.mapper.on_create().iter().cloned().collect(), deadline).await? {
                Ok(ids) => ids,
                Err(end) => return Ok(end),
            }
        } else {
            BTreeSet::new()
        };
        let mut changes = payload.changes(&held);
        if !changes.any() && had == wanted.ours && on_create.is_empty() {
            return Ok(End::Synced { contact_id: id, called: false, tags: wanted });
        }
        let mut current = None;
        if changes.touch_arrays() {
            // An array property is replaced whole: read the slots we do not own, to send them back.
            let optional = self.mapper.optional_properties();
            let optional = &optional;
            match self
                .with_auth(
                    claim,
                    |auth| async move { self.keap.get_contact(&auth, id, optional, deadline).await },
                )
                .await?
            {
                Ok(contact) => {
                    changes = payload.changes(&Held::from_contact(&contact.json, payload));
                    current = Some(contact.json);
                }
                Err(Failure::Keap(e)) if e.kind == ErrorKind::NotFound => return Ok(End::Unlinked),
                Err(failure) => return Ok(End::failed(failure, None)),
            }
        }
        if changes.any() {
            if let Some(end) = self.patch(claim, payload, id, &changes, current.as_ref(), deadline).await? {
                return Ok(end);
            }
        }
        let apply: BTreeSet<i64> = wanted.ours.difference(&had).chain(&on_create).copied().collect();
        let remove: Vec<i64> = had.difference(want).copied().collect();
        let already = match self.move_tags(claim, id, &apply, &remove, deadline).await? {
            Ok(already) => already,
            Err(end) => return Ok(end),
        };
        Ok(End::Synced {
            contact_id: id,
            called: true,
            tags: RuleTags::split(want, &wanted.theirs, &already),
        })
    }

    /// `PATCH` of the changed properties (`current`: the contact as Keap holds it, when an
    /// array property is among them); `Some(end)` unless Keap took it ([`End::Unlinked`] on a 404).
    async fn patch(
        &self,
        claim: &Claim,
        payload: &ContactPayload,
        id: i64,
        changes: &Changes,
        current: Option<&serde_json::Value>,
        deadline: Instant,
    ) -> Result<Option<End>, DbError> {
        let (body, mask) = payload.patch(changes, current);
        let (body, mask) = (&body, &mask);
        let result = self
            .with_auth(claim, |auth| async move {
                self.keap.update_contact(&auth, id, body, mask, deadline).await
            })
            .await?;
        Ok(match result {
            Ok(_) => None,
            Err(Failure::Keap(e)) if e.kind == ErrorKind::NotFound => Some(End::Unlinked),
            Err(failure) => Some(End::failed(failure, serde_json::to_value(body).ok())),
        })
    }

    /// At most one apply call and one remove call. `Ok(already)`: the applied tags Keap says
    /// were on the contact before; `Err(end)` if either call failed.
    async fn move_tags(
        &self,
        claim: &Claim,
        contact: i64,
        apply: &BTreeSet<i64>,
        remove: &[i64],
        deadline: Instant,
    ) -> Result<Result<BTreeSet<i64>, End>, DbError> {
        let mut already = BTreeSet::new();
        if !apply.is_empty() {
            let ids: Vec<i64> = apply.iter().copied().collect();
            let ids = &ids;
            let result =
                self.with_auth(claim, |auth| async move {
                    self.keap.apply_tags(&auth, contact, ids, deadline).await
                })
                .await?;
            match result {
                Ok(answer) if answer.contact_gone() => return Ok(Err(End::Unlinked)),
                Ok(answer) if answer.refused.is_empty() => already.extend(answer.already),
                Ok(answer) => {
                    let list: Vec<String> =
                        answer.refused.iter().map(|(id, why)| format!("{id} ({why})")).collect();
                    return Ok(Err(End::Park(format!(
                        "Keap did not apply tag(s) {} to contact {contact}; check the tag ids in the \
                         configuration, then `keap-sync failures retry`",
                        list.join(", ")
                    ))));
                }
                Err(Failure::Keap(e)) if e.kind == ErrorKind::NotFound => return Ok(Err(End::Unlinked)),
                Err(failure) => return Ok(Err(End::failed(failure, None))),
            }
        }
        if !remove.is_empty() {
            let result = self
                .with_auth(claim, |auth| async move {
                    self.keap.remove_tags(&auth, contact, remove, deadline).await
                })
                .await?;
            if let Err(failure) = result {
                return Ok(Err(End::failed(failure, None)));
            }
        }
        Ok(Ok(already))
    }

    /// A user with no contact (or whose contact is gone): find it by email — first by the
    /// email of an earlier create whose answer never came (invariant 14), then by the current
    /// one — and link it, or create it. A read before any write, so an existing contact is
    /// updated property by property and its other slots survive (invariant 12).
    ///
    /// The lookup of an in-doubt create's email settles the doubt for good: a contact whose
    /// EMAIL1 it is, and that no other user holds, is that create's (or the one its upsert
    /// merged into) and is linked; anything else means the create left nothing of this user's,
    /// and the record is cleared at once (`outbox::settle_create`). Kept, it would be looked
    /// up on every later attempt, after a park and a `failures retry` too, and could then
    /// find another user's contact (a park on every change) or a stranger's (adopted).
    async fn link_or_create(
        &self,
        claim: &Claim,
        payload: &ContactPayload,
        want: &BTreeSet<i64>,
        deadline: Instant,
    ) -> Result<End, DbError> {
        let on_create =
            match self.tag_ids(claim, &self.mapper.on_create().iter().cloned().collect(), deadline).await? {
                Ok(ids) => ids,
                Err(end) => return Ok(end),
            };
        let mut current = None;
        if let Some(in_doubt) = claim.create_sent.as_ref().and_then(email_of_create) {
            let found = match self.find_by_email(claim, &in_doubt, deadline).await? {
                Ok(found) => found,
                Err(failure) => return Ok(End::failed(failure, None)),
            };
            if let Some(contact) = &found.email1 {
                match self.adopt(claim, payload, contact.clone(), want, &on_create, deadline).await? {
                    // Another user's contact: this user's create made none of its own.
                    End::Taken { .. } => {}
                    end => return Ok(end),
                }
            }
            let settled = outbox::with_retries("settle_create", &claim.user_key, || {
                outbox::settle_create(&self.db, claim, &self.instance)
            })
            .await?;
            if !settled {
                return Ok(End::Release);
            }
            tracing::info!(user = %claim.user_key, "an earlier create whose answer was lost made no contact of this user's; settled");
            if in_doubt.eq_ignore_ascii_case(&payload.email) {
                current = Some(found);
            }
        }
        let found = match current {
            Some(found) => found,
            None => match self.find_by_email(claim, &payload.email, deadline).await? {
                Ok(found) => found,
                Err(failure) => return Ok(End::failed(failure, None)),
            },
        };
        if let Some(contact) = found.email1 {
            return self.adopt(claim, payload, contact, want, &on_create, deadline).await;
        }
        if !found.elsewhere.is_empty() {
            return Ok(End::Park(not_adopted(&claim.user_key, &found.elsewhere)));
        }
        self.create(claim, payload, want, &on_create, deadline).await
    }

    /// `GET /v1/contacts?email=…`, sorted by slot (`keap::model::ByEmail`).
    async fn find_by_email(
        &self,
        claim: &Claim,
        email: &str,
        deadline: Instant,
    ) -> Result<Result<ByEmail, Failure>, DbError> {
        let optional = self.mapper.optional_properties();
        let optional = &optional;
        self.with_auth(claim, |auth| async move {
            self.keap.find_by_email(&auth, email, optional, deadline).await
        })
        .await
    }

    /// Links an existing contact to the user, then sends what differs and applies the tags.
    async fn adopt(
        &self,
        claim: &Claim,
        payload: &ContactPayload,
        contact: Contact,
        want: &BTreeSet<i64>,
        on_create: &BTreeSet<i64>,
        deadline: Instant,
    ) -> Result<End, DbError> {
        let held = Held::from_contact(&contact.json, payload);
        if let Some(end) = self.link(claim, contact.id, held.link_sent()).await? {
            return Ok(end);
        }
        let changes = payload.changes(&held);
        if changes.any() {
            match self.patch(claim, payload, contact.id, &changes, Some(&contact.json), deadline).await? {
                None => {}
                // Deleted in Keap between the read and the write: look again later.
                Some(End::Unlinked) => {
                    return Ok(End::RetryLater(format!(
                        "Keap contact {} vanished while being linked",
                        contact.id
                    )))
                }
                Some(end) => return Ok(end),
            }
        }
        self.tag_new(claim, contact.id, want, on_create, deadline).await
    }

    /// The one apply call of a newly linked contact: the rule tags and `on_create`.
    async fn tag_new(
        &self,
        claim: &Claim,
        contact_id: i64,
        want: &BTreeSet<i64>,
        on_create: &BTreeSet<i64>,
        deadline: Instant,
    ) -> Result<End, DbError> {
        let apply: BTreeSet<i64> = want.union(on_create).copied().collect();
        match self.move_tags(claim, contact_id, &apply, &[], deadline).await? {
            // Deleted in Keap just after it was linked: look again later.
            Err(End::Unlinked) => {
                Ok(End::RetryLater(format!("Keap contact {contact_id} vanished while being linked")))
            }
            Err(end) => Ok(end),
            // A wanted tag already there (an adopted contact a person tagged) stays theirs.
            Ok(already) => Ok(End::Synced {
                contact_id,
                called: true,
                tags: RuleTags::split(want, &BTreeSet::new(), &already),
            }),
        }
    }

    /// Maps the user to `contact_id`; `Some(end)` when that must not (or cannot) happen.
    async fn link(
        &self,
        claim: &Claim,
        contact_id: i64,
        sent: serde_json::Value,
    ) -> Result<Option<End>, DbError> {
        Ok(match self.recorder.link(claim, contact_id, sent).await? {
            Linked::Yes => None,
            Linked::TakenBy(other) => Some(End::Taken {
                message: format!(
                    "user {user}: Keap contact {contact_id}, the one with this user's email address, is already \
                     linked to user {other}; one contact belongs to one user. The change is tried again by \
                     itself as soon as no user holds contact {contact_id} (user {other} deleted, or linked \
                     to another contact); to sync this user sooner, give it another email address, or run \
                     `keap-sync failures retry {user}` once user {other} no longer holds it",
                    user = claim.user_key
                ),
                contact_id,
            }),
            // Gone since the claim (its newer change is queued), or no longer our claim.
            Linked::KeyGone | Linked::Lost => Some(End::Release),
        })
    }

    /// Creates the contact, having recorded what is sent first (invariant 14).
    async fn create(
        &self,
        claim: &Claim,
        payload: &ContactPayload,
        want: &BTreeSet<i64>,
        on_create: &BTreeSet<i64>,
        deadline: Instant,
    ) -> Result<End, DbError> {
        let body = payload.create_body();
        let sent = serde_json::to_value(&body).unwrap_or_default();
        match self.recorder.begin_create(claim, &sent).await? {
            CreateSlot::Reserved => {}
            CreateSlot::EmailBusy => {
                return Ok(End::RetryLater(format!(
                    "another user's contact for {} is being created; this one waits for it",
                    payload.email
                )))
            }
            CreateSlot::Lost => return Ok(End::Release),
        }
        let body = &body;
        let result = self
            .with_auth(claim, |auth| async move { self.keap.upsert_contact(&auth, body, deadline).await })
            .await?;
        match result {
            Ok(contact) => {
                let linked = payload.as_held().link_sent();
                if let Some(end) = self.link(claim, contact.id, linked).await? {
                    return Ok(end);
                }
                self.tag_new(claim, contact.id, want, on_create, deadline).await
            }
            Err(failure) => {
                // A 4xx is a definite answer: nothing was created.
                let settles_create = matches!(&failure, Failure::Keap(e) if e.kind == ErrorKind::Rejected);
                Ok(End::Failed { failure, sent: Some(sent), settles_create })
            }
        }
    }

    /// A deleted user: `[delivery] on_delete` on the contact mapped now, then the mapping is
    /// forgotten (a user restored later is linked again by email).
    async fn deleted(&self, claim: &Claim, deadline: Instant) -> Result<Outcome, DbError> {
        // The mapping as it is now, not as claimed: a key change moves it to the new key, and
        // a renamed user must keep its contact (invariant 13).
        let id = match outbox::with_retries("mapping_if_unchanged", &claim.user_key, || {
            outbox::mapping_if_unchanged(&self.db, claim, &self.instance)
        })
        .await?
        {
            None => {
                // A newer change arrived (a key change, a re-insert): deliver that instead.
                outbox::with_retries("release", &claim.user_key, || {
                    outbox::release(&self.db, claim, &self.instance)
                })
                .await?;
                return Ok(Outcome::Handled);
            }
            Some(None) => return self.forget(claim, Done::Nothing).await.map(|()| Outcome::Handled),
            Some(Some(id)) => id,
        };
        let result = match &self.delivery.on_delete {
            OnDelete::Keep => {
                tracing::info!(user = %claim.user_key, contact = id, "user deleted; kept the Keap contact");
                return self.forget(claim, Done::Forgotten).await.map(|()| Outcome::Handled);
            }
            OnDelete::DeleteContact => {
                let r =
                    self.with_auth(claim, |auth| async move {
                        self.keap.delete_contact(&auth, id, deadline).await
                    })
                    .await?;
                if r.is_ok() {
                    tracing::info!(user = %claim.user_key, contact = id, "user deleted; deleted the Keap contact");
                }
                r
            }
            OnDelete::Tag { tag, opt_out } => {
                match self.tag_deleted(claim, id, tag, opt_out.as_deref(), deadline).await? {
                    Ok(Some(end)) => return self.record_delete_end(claim, end).await,
                    Ok(None) => Ok(()),
                    Err(failure) => Err(failure),
                }
            }
        };
        match result {
            Ok(()) => self.forget(claim, Done::Forgotten).await.map(|()| Outcome::Accepted),
            Err(failure) => self.failed(claim, failure, None, false).await,
        }
    }

    /// `on_delete = "tag"`: apply the tag, then opt EMAIL1 out if configured. A contact
    /// already gone in Keap counts as done. `Ok(Some(end))` when the tag cannot be had.
    async fn tag_deleted(
        &self,
        claim: &Claim,
        id: i64,
        tag: &TagRef,
        opt_out: Option<&str>,
        deadline: Instant,
    ) -> Result<Result<Option<End>, Failure>, DbError> {
        let ids = match self.tag_ids(claim, &BTreeSet::from([tag.clone()]), deadline).await? {
            Ok(ids) => ids,
            Err(end) => return Ok(Ok(Some(end))),
        };
        match self.move_tags(claim, id, &ids, &[], deadline).await? {
            Ok(_) => {}
            Err(End::Unlinked) => return Ok(Ok(None)),
            Err(end) => return Ok(Ok(Some(end))),
        }
        let Some(reason) = opt_out else {
            tracing::info!(user = %claim.user_key, contact = id, "user deleted; tagged the Keap contact");
            return Ok(Ok(None));
        };
        let contact = match self
            .with_auth(claim, |auth| async move { self.keap.get_contact(&auth, id, &[], deadline).await })
            .await?
        {
            Ok(c) => c,
            Err(Failure::Keap(e)) if e.kind == ErrorKind::NotFound => return Ok(Ok(None)),
            Err(failure) => return Ok(Err(failure)),
        };
        let Some(email) = contact.email1().map(str::to_owned) else { return Ok(Ok(None)) };
        let email = &email;
        let result = self
            .with_auth(claim, |auth| async move { self.keap.opt_out(&auth, email, reason, deadline).await })
            .await?;
        Ok(match result {
            Ok(()) => {
                tracing::info!(user = %claim.user_key, contact = id, "user deleted; tagged the Keap contact and opted its email out");
                Ok(None)
            }
            Err(Failure::Keap(e)) if e.kind == ErrorKind::NotFound => Ok(None),
            Err(failure) => Err(failure),
        })
    }

    async fn record_delete_end(&self, claim: &Claim, end: End) -> Result<Outcome, DbError> {
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
    async fn forget(&self, claim: &Claim, done: Done) -> Result<(), DbError> {
        self.recorder.complete(claim, done).await?;
        self.metrics.delivery(DeliveryOutcome::Deleted);
        Ok(())
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

enum Failure {
    Token(TokenError),
    Keap(KeapError),
}

/// How the delivery of a present user ended, before it is recorded.
enum End {
    /// Keap holds the payload and the rule tags `tags` on this contact; `called` is false
    /// when no call was needed.
    Synced { contact_id: i64, called: bool, tags: RuleTags },
    /// The mapped contact is gone in Keap: look it up by email, or create it.
    Unlinked,
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
    fn failed(failure: Failure, sent: Option<serde_json::Value>) -> End {
        End::Failed { failure, sent, settles_create: false }
    }
}

/// Why a user whose address Keap holds only in another contact's EMAIL2 or EMAIL3 is parked.
///
/// Such a contact may be another person's (a spouse, an assistant, a shared inbox): adopting
/// it would overwrite that person's names and EMAIL1 (invariant 12), and `on_delete =
/// "delete_contact"` would later delete a contact keap-sync never created (invariant 13).
/// Creating a contact instead is no safer: `PUT /v1/contacts` with `duplicate_option=Email`
/// may match the same slot and update that contact anyway (which slots Keap's duplicate check
/// reads is undocumented), and `POST` would make a second contact for an address Keap already
/// has (invariant 4). Only a person can tell, so the user is parked with the contact ids, the
/// slots and both ways out; nothing is written to Keap. The message names no address.
fn not_adopted(user_key: &str, elsewhere: &[(i64, String)]) -> String {
    let held: Vec<String> = elsewhere.iter().map(|(id, slot)| format!("contact {id} ({slot})")).collect();
    let first = elsewhere.first().map_or(0, |(id, _)| *id);
    format!(
        "user {user_key}: Keap holds this user's email address only as another address of {}, not as a \
         contact's main address (EMAIL1); keap-sync does not take over a contact that may be someone else's, \
         nor create a second one for an address Keap already has. If contact {first} is this user, make the \
         address its EMAIL1 in Keap; if not, remove the address from it (or give the user another email); \
         then run `keap-sync failures retry {user_key}` (the user's next change also tries again)",
        held.join(", ")
    )
}

/// The EMAIL1 of a create body kept in `outbox.create_sent`.
fn email_of_create(body: &serde_json::Value) -> Option<String> {
    let items = body.get("email_addresses")?.as_array()?;
    let email1 = items.iter().find(|e| e.get("field").and_then(|f| f.as_str()) == Some("EMAIL1"))?;
    email1.get("email")?.as_str().map(str::to_owned)
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
