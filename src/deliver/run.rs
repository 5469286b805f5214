//! Running a plan: each step is one Keap call or one outbox statement. A read adds what it
//! found to the facts and the user is planned again ([`super::plan`]); the writes then run in
//! order. How each answer ends the delivery (synced, retried, parked, linked again) is decided
//! here; what to send never is.

use std::collections::BTreeSet;

use tokio::time::Instant;

use super::plan::{self, IfTaken, Mapped, Plan, Seen, Step, Target, User};
use super::{Deliverer, End, Failure, Outcome};
use crate::config::{OnDelete, TagRef};
use crate::db::DbError;
use crate::keap::model::{ByEmail, Contact};
use crate::keap::{ErrorKind, TagsApplied};
use crate::mapping::{ContactPayload, Held};
use crate::mirror;
use crate::outbox::{self, Claim, CreateSlot, Done, Linked};

/// Plans per delivery at most: every read or settle answers one question for good, so a plan
/// is made at most once per read kind and once more after a contact vanished; far fewer in practice.
const MAX_PLANS: usize = 12;

/// What one Keap call answered.
enum Answer {
    /// What a lookup found, and for which address.
    Found(String, ByEmail),
    Contact(Contact),
    Tagged(TagsApplied),
    /// A `PATCH` Keap accepted, with its stamp of the write (`last_updated`), if it gave one.
    Patched(Option<i64>),
    Done,
}

/// What the run of one plan came to.
enum Flow {
    /// A read answered: plan again with what it found.
    Replan,
    /// The delivery ended.
    End(End),
}

/// What one delivery has learnt so far, from the claim and from Keap.
struct Facts {
    mapped: Option<Mapped>,
    in_doubt: Option<String>,
    /// The contact as read (`Step::Read`).
    contact: Option<Contact>,
    /// What a lookup found, and for which address.
    found: Option<(String, ByEmail)>,
    /// `found` is the mirror's answer, not yet Keap's.
    mirrored: bool,
    /// The mirror was asked already (it answers once per delivery; then Keap does).
    asked_mirror: bool,
    /// `on_create` tag ids, once resolved.
    on_create: Option<BTreeSet<i64>>,
    /// The contact this delivery linked (by lookup or create): a 404 on it is a vanished
    /// contact, not a mapping to make again.
    linked: Option<i64>,
    /// `linked` came from the mirror: a 404 on it says the mirror was stale.
    linked_from_mirror: bool,
    /// Keap calls made.
    calls: u32,
}

impl Facts {
    /// What the claim tells before any call: the contact mapped and what it holds, and the email of a
    /// create in doubt.
    fn of(claim: &Claim, payload: &ContactPayload) -> Facts {
        Facts {
            mapped: claim.contact_id.map(|id| Mapped {
                id,
                held: Held::of_mapping(claim.sent.as_ref(), claim.fingerprint.as_deref(), payload),
            }),
            in_doubt: claim.create_sent.as_ref().and_then(plan::email_of_create),
            contact: None,
            found: None,
            mirrored: false,
            asked_mirror: false,
            on_create: None,
            linked: None,
            linked_from_mirror: false,
            calls: 0,
        }
    }

    /// What has been read from Keap to plan from: the contact read, else a lookup's answer, else nothing.
    fn seen(&self) -> Seen<'_> {
        match (&self.contact, &self.found) {
            (Some(contact), _) => Seen::Contact(contact),
            (None, Some((email, found))) if self.mirrored => Seen::Mirrored { email, found },
            (None, Some((email, found))) => Seen::Found { email, found },
            (None, None) => Seen::Nothing,
        }
    }

    /// The contact the user is linked to now.
    fn contact_id(&self) -> Option<i64> {
        self.linked.or(self.mapped.as_ref().map(|m| m.id))
    }

    /// The contact the mirror named and no call has confirmed yet: the one it found for the
    /// address, or the one linked from its answer.
    fn unconfirmed(&self) -> Option<i64> {
        match (&self.found, self.linked) {
            (_, Some(id)) if self.linked_from_mirror => Some(id),
            (Some((_, found)), None) if self.mirrored => found.email1.as_ref().map(|c| c.id),
            _ => None,
        }
    }

    /// Forgets the mirror's answer: the next lookup asks Keap.
    fn ask_keap(&mut self) {
        self.found = None;
        self.mirrored = false;
        self.linked = None;
        self.linked_from_mirror = false;
    }
}

impl Deliverer {
    /// Delivers a present user: plan, run, plan again after each read.
    pub(super) async fn present(
        &self,
        claim: &Claim,
        payload: &ContactPayload,
        want: &BTreeSet<i64>,
        deadline: Instant,
    ) -> Result<End, DbError> {
        let mut facts = Facts::of(claim, payload);
        let keap_moved = self.keap_moved(payload, facts.mapped.as_ref()).await?;
        let none = BTreeSet::new();
        for _ in 0..MAX_PLANS {
            if facts.on_create.is_none() && plan::needs_on_create(facts.mapped.as_ref()) {
                let refs: BTreeSet<TagRef> = self.mapper.on_create().iter().cloned().collect();
                match self.tag_ids(claim, &refs, deadline).await? {
                    Ok(ids) => facts.on_create = Some(ids),
                    Err(end) => return Ok(end),
                }
            }
            let user = User {
                key: &claim.user_key,
                payload,
                mapped: facts.mapped.as_ref(),
                in_doubt: facts.in_doubt.as_deref(),
                want,
                on_create: facts.on_create.as_ref().unwrap_or(&none),
                seen: facts.seen(),
                keap_moved,
            };
            let plan = plan::present(&user);
            if let Some(status) = &plan.withheld {
                tracing::info!(user = %claim.user_key, %status, "consent not sent: Keap holds an opt-out for the address (contact.opt_in_reason's over_opt_out = true would lift it)");
            }
            match self.run(claim, payload, want, &plan, &mut facts, deadline).await? {
                Flow::Replan => continue,
                Flow::End(end) => return Ok(end),
            }
        }
        tracing::error!(user = %claim.user_key, "the delivery plan did not settle; trying again later");
        Ok(End::RetryLater("the delivery plan did not settle (a keap-sync defect; please report it)".into()))
    }

    /// Runs `plan`'s steps in order, until a read answers or the delivery ends.
    async fn run(
        &self,
        claim: &Claim,
        payload: &ContactPayload,
        want: &BTreeSet<i64>,
        plan: &Plan,
        facts: &mut Facts,
        deadline: Instant,
    ) -> Result<Flow, DbError> {
        let mut already = BTreeSet::new();
        for step in &plan.steps {
            if let Step::Lookup { email } = step {
                if let Some(found) = self.ask_mirror(claim, facts, email).await? {
                    (facts.found, facts.mirrored) = (Some((email.clone(), found)), true);
                    return Ok(Flow::Replan);
                }
            }
            match step {
                Step::Settle => return self.settle(claim, payload, facts).await,
                Step::Link { id, sent, if_taken } => {
                    if let Some(flow) = self.link_step(claim, payload, facts, (*id, sent), *if_taken).await? {
                        return Ok(flow);
                    }
                }
                Step::Create { body } => {
                    if let Some(end) = self.create(claim, payload, body, facts, deadline).await? {
                        return Ok(Flow::End(end));
                    }
                }
                Step::Park(reason) => return Ok(Flow::End(End::Park(reason.clone()))),
                step => {
                    facts.calls += 1;
                    let answer = match self.call(claim, step, facts.contact_id(), deadline).await? {
                        Ok(answer) => answer,
                        Err(Failure::Keap(e)) if e.kind == ErrorKind::NotFound => {
                            return self.gone(claim, facts).await
                        }
                        Err(failure) => return Ok(Flow::End(End::failed(failure, patch_body(step)))),
                    };
                    self.answered(step, &answer, facts).await?;
                    match answer {
                        Answer::Found(email, found) => {
                            (facts.found, facts.mirrored) = (Some((email, found)), false);
                            return Ok(Flow::Replan);
                        }
                        Answer::Contact(contact)
                            if facts.unconfirmed() == Some(contact.id) && facts.linked.is_none() =>
                        {
                            confirmed(facts, contact);
                            return Ok(Flow::Replan);
                        }
                        Answer::Contact(contact) => {
                            facts.contact = Some(contact);
                            return Ok(Flow::Replan);
                        }
                        Answer::Tagged(answer) if answer.contact_gone() => {
                            return self.gone(claim, facts).await
                        }
                        Answer::Tagged(answer) if answer.refused.is_empty() => already.extend(answer.already),
                        Answer::Tagged(answer) => {
                            return Ok(Flow::End(End::Park(not_applied(
                                &answer,
                                facts.contact_id().unwrap_or_default(),
                            ))))
                        }
                        Answer::Patched(_) | Answer::Done => {}
                    }
                }
            }
        }
        let Some(contact_id) = facts.contact_id() else {
            return Ok(Flow::End(End::Park(format!("user {}: the plan linked no contact", claim.user_key))));
        };
        Ok(Flow::End(End::Synced {
            contact_id,
            called: facts.calls > 0,
            tags: plan.tags(want, &already),
            settled: plan.settled.clone(),
        }))
    }

    /// A plan's [`Step::Link`]; `None` when the plan goes on.
    async fn link_step(
        &self,
        claim: &Claim,
        payload: &ContactPayload,
        facts: &mut Facts,
        (id, sent): (i64, &serde_json::Value),
        if_taken: IfTaken,
    ) -> Result<Option<Flow>, DbError> {
        Ok(match self.link(claim, id, sent.clone()).await? {
            None => {
                (facts.linked, facts.linked_from_mirror) = (Some(id), if_taken == IfTaken::AskKeap);
                None
            }
            Some(End::Taken { .. }) if if_taken == IfTaken::Settle => {
                // Another user's contact: this user's create made none of its own.
                Some(self.settle(claim, payload, facts).await?)
            }
            Some(End::Taken { .. }) if if_taken == IfTaken::AskKeap => {
                // Another user's, says the mirror: Keap's lookup decides.
                facts.ask_keap();
                Some(Flow::Replan)
            }
            Some(end) => Some(Flow::End(end)),
        })
    }

    /// The contact a step was sent to is gone in Keap: the mapped one is linked again by
    /// email (planned again, knowing no contact); one this delivery linked vanished under it.
    /// One the mirror named was stale there: it leaves the mirror, and Keap is asked.
    async fn gone(&self, claim: &Claim, facts: &mut Facts) -> Result<Flow, DbError> {
        if let Some(id) = facts.unconfirmed() {
            tracing::info!(user = %claim.user_key, contact = id, "a contact the mirror held is gone in Keap; looking the address up in Keap");
            mirror::forget(&self.db, id).await?;
            facts.ask_keap();
            return Ok(Flow::Replan);
        }
        if let Some(id) = facts.linked {
            return Ok(Flow::End(End::RetryLater(format!("Keap contact {id} vanished while being linked"))));
        }
        if let Some(mapped) = facts.mapped.take() {
            tracing::info!(user = %claim.user_key, contact = mapped.id, "contact gone in Keap; linking again by email");
            outbox::with_retries("record_gone", &claim.user_key, || {
                outbox::record_gone(&self.db, mapped.id, &claim.user_key)
            })
            .await?;
        }
        facts.contact = None;
        facts.found = None;
        Ok(Flow::Replan)
    }

    /// The mirror's answer for `email`, when it may give one: for a user's own address (never
    /// an in-doubt create's, invariant 14), once per delivery, when `[mirror] lookups` is on
    /// and the mirror holds a full listing.
    async fn ask_mirror(
        &self,
        claim: &Claim,
        facts: &mut Facts,
        email: &str,
    ) -> Result<Option<ByEmail>, DbError> {
        let Some(lookups) = &self.lookups else { return Ok(None) };
        // Any create in doubt at the claim (settled since or not) is Keap's to answer.
        if facts.asked_mirror || claim.create_sent.is_some() {
            return Ok(None);
        }
        facts.asked_mirror = true;
        lookups.find(&self.db, (&self.keap, &self.tokens), &self.mapper, email).await
    }

    /// After a call Keap accepted: a contact linked from the mirror is confirmed (every step
    /// after a link is a call to that contact), and after a `PATCH` the mirror learns what
    /// was sent ([`Deliverer::remembers`]).
    async fn answered(&self, step: &Step, answer: &Answer, facts: &mut Facts) -> Result<(), DbError> {
        if facts.linked.is_some() {
            facts.linked_from_mirror = false;
        }
        if let (Step::Patch { id, body, .. }, Answer::Patched(written)) = (step, answer) {
            if self.remembers(body) {
                mirror::remember(&self.db, *id, body, *written).await?;
            }
        }
        Ok(())
    }

    /// Whether a write Keap accepted (`body`) is recorded in the mirror: every one with
    /// `[hooks]` (Keap's stamp of it then makes the hooks it fires cost no call), and those
    /// carrying addresses (a create, a readdress) with `[mirror] lookups` (a second user with
    /// the same address finds the contact before the next listing). Otherwise the mirror is
    /// not read between sweeps and a write costs no statement here.
    fn remembers(&self, body: &serde_json::Map<String, serde_json::Value>) -> bool {
        self.remember_writes || (self.lookups.is_some() && body.contains_key("email_addresses"))
    }

    /// An in-doubt create made no contact of this user's: clear its record for good, so that
    /// no later attempt looks its address up again (`outbox::settle_create`).
    async fn settle(
        &self,
        claim: &Claim,
        payload: &ContactPayload,
        facts: &mut Facts,
    ) -> Result<Flow, DbError> {
        let settled = outbox::with_retries("settle_create", &claim.user_key, || {
            outbox::settle_create(&self.db, claim, &self.instance)
        })
        .await?;
        if !settled {
            return Ok(Flow::End(End::Release));
        }
        tracing::info!(user = %claim.user_key, "an earlier create whose answer was lost made no contact of this user's; settled");
        facts.in_doubt = None;
        // The lookup's answer still holds if it was for the user's own address.
        if facts.found.as_ref().is_some_and(|(email, _)| !email.eq_ignore_ascii_case(&payload.email)) {
            facts.found = None;
        }
        Ok(Flow::Replan)
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

    /// Creates the contact, having recorded what is sent first (invariant 14), then links it.
    async fn create(
        &self,
        claim: &Claim,
        payload: &ContactPayload,
        body: &serde_json::Map<String, serde_json::Value>,
        facts: &mut Facts,
        deadline: Instant,
    ) -> Result<Option<End>, DbError> {
        let sent = serde_json::to_value(body).unwrap_or_default();
        match self.recorder.begin_create(claim, &sent).await? {
            CreateSlot::Reserved => {}
            CreateSlot::EmailBusy => {
                return Ok(Some(End::RetryLater(format!(
                    "another user's contact for {} is being created; this one waits for it",
                    payload.email
                ))))
            }
            CreateSlot::Lost => return Ok(Some(End::Release)),
        }
        facts.calls += 1;
        let result = self
            .with_auth(claim, |auth| async move { self.keap.upsert_contact(&auth, body, deadline).await })
            .await?;
        match result {
            Ok(contact) => {
                if self.remembers(body) {
                    mirror::remember(&self.db, contact.id, body, contact.last_updated()).await?;
                }
                let end = self.link(claim, contact.id, payload.as_held().link_sent()).await?;
                facts.linked = Some(contact.id);
                Ok(end)
            }
            Err(failure) => {
                // A 4xx is a definite answer: nothing was created.
                let settles_create = matches!(&failure, Failure::Keap(e) if e.kind == ErrorKind::Rejected);
                Ok(Some(End::Failed { failure, sent: Some(sent), settles_create }))
            }
        }
    }

    /// The Keap call of one step (`contact`: the contact a [`Target::Created`] step means).
    async fn call(
        &self,
        claim: &Claim,
        step: &Step,
        contact: Option<i64>,
        deadline: Instant,
    ) -> Result<Result<Answer, Failure>, DbError> {
        let keap = &self.keap;
        // Only reads ask for optional properties; computed for them alone (not for every PATCH).
        let optional = match step {
            Step::Lookup { .. } | Step::Read { .. } => self.mapper.optional_properties(),
            _ => Vec::new(),
        };
        let optional = &optional;
        let target = |t: &Target| match t {
            Target::Id(id) => *id,
            Target::Created => contact.unwrap_or_default(),
        };
        Ok(match step {
            Step::Lookup { email } => {
                self.with_auth(claim, |auth| async move {
                    keap.find_by_email(&auth, email, optional, deadline).await
                })
                .await?
                .map(|found| Answer::Found(email.clone(), found))
            }
            Step::Read { id } => self
                .with_auth(
                    claim,
                    |auth| async move { keap.get_contact(&auth, *id, optional, deadline).await },
                )
                .await?
                .map(Answer::Contact),
            Step::Patch { id, body, mask } => self
                .with_auth(claim, |auth| async move {
                    keap.update_contact(&auth, *id, body, mask, deadline).await
                })
                .await?
                .map(|contact| Answer::Patched(contact.last_updated())),
            Step::ApplyTags { id, ids } => {
                let (id, ids) = (target(id), &ids.iter().copied().collect::<Vec<i64>>());
                self.with_auth(claim, |auth| async move { keap.apply_tags(&auth, id, ids, deadline).await })
                    .await?
                    .map(Answer::Tagged)
            }
            Step::RemoveTags { id, ids } => {
                let ids = &ids.iter().copied().collect::<Vec<i64>>();
                self.with_auth(claim, |auth| async move { keap.remove_tags(&auth, *id, ids, deadline).await })
                    .await?
                    .map(|()| Answer::Done)
            }
            Step::Delete { id } => self
                .with_auth(claim, |auth| async move { keap.delete_contact(&auth, *id, deadline).await })
                .await?
                .map(|()| Answer::Done),
            Step::OptOut { email: Some(email), reason } => self
                .with_auth(claim, |auth| async move { keap.opt_out(&auth, email, reason, deadline).await })
                .await?
                .map(|()| Answer::Done),
            Step::OptOut { email: None, .. }
            | Step::Settle
            | Step::Link { .. }
            | Step::Create { .. }
            | Step::Park(_) => Ok(Answer::Done),
        })
    }

    /// A deleted user: `[delivery] on_delete` on the contact mapped now, then the mapping is
    /// forgotten (a user restored later is linked again by email).
    pub(super) async fn deleted(&self, claim: &Claim, deadline: Instant) -> Result<Outcome, DbError> {
        let Some(id) = self.mapped_now(claim).await? else { return Ok(Outcome::Handled) };
        let Some(id) = id else { return self.forget(claim, Done::Nothing).await.map(|()| Outcome::Handled) };
        let tag = match &self.delivery.on_delete {
            OnDelete::Tag { tag, .. } => {
                match self.tag_ids(claim, &BTreeSet::from([tag.clone()]), deadline).await? {
                    Ok(ids) => ids.first().copied(),
                    Err(end) => return self.record_delete_end(claim, end).await,
                }
            }
            _ => None,
        };
        let mut seen = None;
        let mut calls = 0;
        'plan: for _ in 0..MAX_PLANS {
            let plan = plan::deleted(id, &self.delivery.on_delete, tag, seen.as_ref());
            for step in &plan.steps {
                calls += u32::from(step.is_call());
                match self.call(claim, step, Some(id), deadline).await? {
                    Ok(Answer::Contact(contact)) => {
                        seen = Some(contact);
                        continue 'plan;
                    }
                    Ok(Answer::Tagged(answer)) if answer.contact_gone() => break,
                    Ok(Answer::Tagged(answer)) if !answer.refused.is_empty() => {
                        return self.record_delete_end(claim, End::Park(not_applied(&answer, id))).await;
                    }
                    Ok(_) => {}
                    // Already gone in Keap: nothing left to do to it.
                    Err(Failure::Keap(e)) if e.kind == ErrorKind::NotFound => break,
                    Err(failure) => return self.failed(claim, failure, None, false).await,
                }
            }
            break;
        }
        tracing::info!(user = %claim.user_key, contact = id, policy = ?self.delivery.on_delete, "user deleted; on_delete done");
        self.forget(claim, Done::Forgotten).await?;
        Ok(if calls > 0 { Outcome::Accepted } else { Outcome::Handled })
    }

    /// The contact mapped to a deleted user now, not at claim time: a key change moves it to
    /// the new key, and a renamed user must keep its contact (invariant 13). `None`: a newer
    /// change arrived (a key change, a re-insert) and the claim was given back for it.
    async fn mapped_now(&self, claim: &Claim) -> Result<Option<Option<i64>>, DbError> {
        let now = outbox::with_retries("mapping_if_unchanged", &claim.user_key, || {
            outbox::mapping_if_unchanged(&self.db, claim, &self.instance)
        })
        .await?;
        if now.is_none() {
            outbox::with_retries("release", &claim.user_key, || {
                outbox::release(&self.db, claim, &self.instance)
            })
            .await?;
        }
        Ok(now)
    }
}

/// The mirror's candidate for the user's address, as Keap holds it now: Keap's answer to the
/// lookup if its EMAIL1 is still the address; else Keap is asked.
fn confirmed(facts: &mut Facts, contact: Contact) {
    let email = facts.found.as_ref().map(|(email, _)| email.clone()).unwrap_or_default();
    facts.ask_keap();
    if contact.email1().is_some_and(|e| e.trim().eq_ignore_ascii_case(email.trim())) {
        facts.found = Some((email, ByEmail { email1: Some(contact), elsewhere: Vec::new() }));
    }
}

/// The body of a failed `PATCH`, kept with the failure.
fn patch_body(step: &Step) -> Option<serde_json::Value> {
    match step {
        Step::Patch { body, .. } => serde_json::to_value(body).ok(),
        _ => None,
    }
}

/// Why a tag apply that Keap refused for some tags parks the change.
fn not_applied(answer: &TagsApplied, contact: i64) -> String {
    let list: Vec<String> = answer.refused.iter().map(|(id, why)| format!("{id} ({why})")).collect();
    format!(
        "Keap did not apply tag(s) {} to contact {contact}; check the tag ids in the configuration, then \
         `keap-sync failures retry`",
        list.join(", ")
    )
}
