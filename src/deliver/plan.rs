//! The planner: from what is known about one user, the steps that bring its Keap contact in
//! step, and nothing more. Pure: no I/O, no clock, no randomness.
//!
//! Three callers share it, so the calls keap-sync makes, the calls `preview` shows and (next)
//! what `reconcile` repairs are one decision, never copies that could drift apart:
//!
//! - **delivery** ([`super::Deliverer`]) runs the steps. A plan starts with the reads its writes
//!   depend on ([`Step::Lookup`], [`Step::Read`]) and with [`Step::Settle`]; delivery performs
//!   that first step, adds the answer to the facts and plans again, until the plan starts
//!   with a write. The writes then run in order. What follows a read in a plan is what the
//!   read is expected to find (no contact for an address; the mapped contact as last sent).
//! - **preview** prints the first plan, made with nothing read from Keap.
//!
//! A lookup may be answered by keap-sync's mirror of Keap instead of a call
//! ([`Seen::Mirrored`]): the plan then trusts it only where it cannot do what Keap's answer
//! would not (`link_or_create`).
//!
//! Why the real calls are never more than the first plan (checked by the property test
//! below): a read only ever replaces itself with what it found — a lookup that finds a contact
//! turns `Create` into `Link` and at most one `Patch`; a contact read turns the `Patch` of
//! what keap-sync last sent into the `Patch` of what differs, or none; the mirror answering a
//! lookup makes no call, and a read of the contact it named stands in for the lookup. The
//! exception is a contact deleted (or readdressed) in Keap behind keap-sync's back, mapped or
//! held by the mirror: that costs the lookup and create of a new link on top (no plan made
//! from keap-sync's records can know it).
//!
//! Invariants (ARCHITECTURE.md): a user is linked before anything is written to a contact
//! found by email (4, 13); only owned properties that differ are sent, arrays with the slots
//! we do not own as Keap holds them (12); an in-doubt create is looked up before anything
//! else (14).

use std::collections::BTreeSet;
use std::fmt;

use serde_json::{Map, Value};

use crate::config::OnDelete;
use crate::keap::model::{ByEmail, Contact};
use crate::mapping::{Changes, ContactPayload, Held, RuleTags, Settled};

/// The contact a step acts on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Target {
    /// An existing contact.
    Id(i64),
    /// The contact the plan's [`Step::Create`] makes.
    Created,
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Target::Id(id) => write!(f, "{id}"),
            Target::Created => f.write_str("{new}"),
        }
    }
}

/// What a [`Step::Link`] does when another user already holds the contact.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum IfTaken {
    /// Park this user until the contact is free (one contact belongs to one user).
    Park,
    /// The contact came from looking up an in-doubt create's address: that create made no
    /// contact of this user's. Settle it and plan again.
    Settle,
    /// The contact came from the mirror, which may be stale: look the address up in Keap
    /// and plan again with Keap's answer.
    AskKeap,
}

/// One step of a plan. Every step but [`Step::Settle`], [`Step::Link`] and [`Step::Park`] is
/// one Keap call.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Step {
    /// `GET /v1/contacts?email=…`: which contact holds this address.
    Lookup { email: String },
    /// `GET /v1/contacts/{id}`: the contact as Keap holds it.
    Read { id: i64 },
    /// Record that an in-doubt create made no contact of this user's (`outbox::settle_create`).
    Settle,
    /// Map the user to this existing contact (`outbox::link`), before anything is written to it;
    /// `sent` is what Keap holds of the owned values, for `contact_map.sent`.
    Link { id: i64, sent: Value, if_taken: IfTaken },
    /// `PUT /v1/contacts`: create the contact (the body recorded first, invariant 14), then link it.
    Create { body: Map<String, Value> },
    /// `PATCH /v1/contacts/{id}` of the owned properties in `mask`.
    Patch { id: i64, body: Map<String, Value>, mask: Vec<&'static str> },
    /// `POST /v1/contacts/{id}/tags`.
    ApplyTags { id: Target, ids: BTreeSet<i64> },
    /// `DELETE /v1/contacts/{id}/tags`.
    RemoveTags { id: i64, ids: BTreeSet<i64> },
    /// `DELETE /v1/contacts/{id}`.
    Delete { id: i64 },
    /// `PUT /v1/emailAddresses/{email}`: opt the contact's EMAIL1 out (`None`: known once read).
    OptOut { email: Option<String>, reason: String },
    /// Nothing can be sent as things stand: park with this reason.
    Park(String),
}

impl Step {
    /// Whether the step is a call to Keap.
    pub(crate) fn is_call(&self) -> bool {
        !matches!(self, Step::Settle | Step::Link { .. } | Step::Park(_))
    }

    /// Whether the step only reads, so that the plan is made again with its answer.
    #[cfg(test)]
    pub(crate) fn is_read(&self) -> bool {
        matches!(self, Step::Lookup { .. } | Step::Read { .. } | Step::Settle)
    }
}

/// What to do for one user.
#[derive(Debug, Clone, Default, PartialEq)]
pub(crate) struct Plan {
    /// In order; empty when Keap holds everything already.
    pub(crate) steps: Vec<Step>,
    /// Wanted rule tags someone else applied first: never applied again, never removed.
    pub(crate) theirs: BTreeSet<i64>,
    /// The owned paths that differ from what Keap holds, as far as known (for logs and preview).
    pub(crate) changed: Vec<String>,
    /// Consent the row gives that is not sent because Keap holds this opt-out status for the
    /// address (invariant 17; `over_opt_out` lifts it).
    pub(crate) withheld: Option<String>,
    /// Shared properties Keap changed: its values to write into their columns, and the
    /// conflicts `prefer` settled (`mapping::shared`; known once the contact is read).
    pub(crate) settled: Settled,
}

impl Plan {
    /// A plan of just these steps, with no tags of others and no changes named.
    fn of(steps: Vec<Step>) -> Plan {
        Plan { steps, ..Plan::default() }
    }

    /// The rule tags of a delivery that ended well, once `already` (tags Keap said were on the
    /// contact when applied) are set apart as someone else's.
    pub(crate) fn tags(&self, want: &BTreeSet<i64>, already: &BTreeSet<i64>) -> RuleTags {
        RuleTags::split(want, &self.theirs, already)
    }
}

/// A mapped user's contact and what keap-sync last sent it.
#[derive(Debug, Clone)]
pub(crate) struct Mapped {
    pub(crate) id: i64,
    /// From `contact_map` (`Held::of_mapping`).
    pub(crate) held: Held,
}

/// What has been read from Keap for this user so far.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Seen<'a> {
    /// Nothing: plan from keap-sync's own records.
    Nothing,
    /// A contact, as `GET /v1/contacts/{id}` returned it.
    Contact(&'a Contact),
    /// What looking up `email` found.
    Found { email: &'a str, found: &'a ByEmail },
    /// What the mirror holds for `email` (`crate::mirror::Lookups`): Keap's contacts as of
    /// moments ago, except that a contact deleted since may still be there.
    Mirrored { email: &'a str, found: &'a ByEmail },
}

/// Everything the planner knows about a user whose row is present.
#[derive(Debug, Clone, Copy)]
pub(crate) struct User<'a> {
    pub(crate) key: &'a str,
    /// The owned values and the rule tags of the row now.
    pub(crate) payload: &'a ContactPayload,
    pub(crate) mapped: Option<&'a Mapped>,
    /// EMAIL1 of an earlier create whose answer never came (invariant 14).
    pub(crate) in_doubt: Option<&'a str>,
    /// Tag ids the rules want.
    pub(crate) want: &'a BTreeSet<i64>,
    /// `on_create` tag ids; only read when [`needs_on_create`] says so.
    pub(crate) on_create: &'a BTreeSet<i64>,
    pub(crate) seen: Seen<'a>,
    /// The mirror shows a shared property changed in Keap since the base
    /// (`ContactPayload::keap_moved`): the contact is read even with nothing to send.
    pub(crate) keap_moved: bool,
}

/// Whether a plan for this user may apply the `on_create` tags, so their ids must be known:
/// a user with no contact yet, or one linked by a delivery that ended before applying them.
pub(crate) fn needs_on_create(mapped: Option<&Mapped>) -> bool {
    mapped.is_none_or(|m| m.held.is_fresh())
}

/// The plan for a present user.
pub(crate) fn present(user: &User<'_>) -> Plan {
    match user.mapped {
        Some(mapped) => update(user, mapped),
        None => match user.in_doubt {
            Some(doubt) => in_doubt(user, doubt),
            None => link_or_create(user),
        },
    }
}

/// A mapped user: `PATCH` the owned properties that changed, then move the rule tags (at most
/// one apply and one remove). An array property is sent whole, so the contact is read first.
fn update(user: &User<'_>, mapped: &Mapped) -> Plan {
    let (payload, id) = (user.payload, mapped.id);
    // Tags our rules applied before; unknown (a mapping from an older release) counts as none.
    let had = mapped.held.tags().cloned().unwrap_or_default();
    let wanted = RuleTags::split(user.want, mapped.held.theirs(), &BTreeSet::new());
    let on_create = if mapped.held.is_fresh() { user.on_create.clone() } else { BTreeSet::new() };
    let mut changes = payload.changes(&mapped.held);
    let mut plan = Plan { theirs: wanted.theirs.clone(), ..Plan::default() };
    if !changes.any() && had == wanted.ours && on_create.is_empty() && !user.keap_moved {
        return plan;
    }
    let mut current = None;
    // An array is sent whole, consent only where Keap holds no opt-out, and a shared property
    // only once Keap's side is known: all need the contact as Keap holds it now.
    let shared = payload.shared_changed(&changes) || user.keap_moved;
    if changes.touch_arrays() || payload.consent_needs_status(&changes) || shared {
        match user.seen {
            Seen::Contact(contact) if contact.id == id => {
                let held = Held::from_contact(&contact.json, payload).with_consent_of(&mapped.held);
                changes = payload.changes(&held);
                plan.withheld = payload.withhold_consent(&mut changes, &contact.json);
                plan.settled = payload.settle_shared(&mapped.held, &contact.json, &mut changes);
                current = Some(&contact.json);
            }
            _ => plan.steps.push(Step::Read { id }),
        }
    }
    plan.changed = changes.paths();
    plan.steps.extend(patch(payload, id, &changes, current));
    let apply: BTreeSet<i64> = wanted.ours.difference(&had).chain(&on_create).copied().collect();
    let remove: BTreeSet<i64> = had.difference(user.want).copied().collect();
    if !apply.is_empty() {
        plan.steps.push(Step::ApplyTags { id: Target::Id(id), ids: apply });
    }
    if !remove.is_empty() {
        plan.steps.push(Step::RemoveTags { id, ids: remove });
    }
    plan
}

/// The `PATCH` of `changes`, if any.
fn patch(payload: &ContactPayload, id: i64, changes: &Changes, current: Option<&Value>) -> Option<Step> {
    changes.any().then(|| {
        let (body, mask) = payload.patch(changes, current);
        Step::Patch { id, body, mask }
    })
}

/// An unmapped user with an in-doubt create: look up that create's address first. A contact
/// whose EMAIL1 it is, and that no other user holds, is that create's and is linked; anything
/// else means the create left nothing of this user's, which is settled for good before the
/// user's own address is looked up (the same answer, when the address is the same).
fn in_doubt(user: &User<'_>, doubt: &str) -> Plan {
    let settled = |seen| {
        let mut plan = link_or_create(&User { in_doubt: None, seen, ..*user });
        plan.steps.insert(0, Step::Settle);
        plan
    };
    match user.seen {
        Seen::Found { email, found } if same_address(email, doubt) => match &found.email1 {
            Some(contact) => adopt(user, contact, IfTaken::Settle),
            None => settled(user.seen),
        },
        _ => {
            // Planned as if the lookup finds nothing.
            let nothing = ByEmail::default();
            let mut plan = settled(Seen::Found { email: doubt, found: &nothing });
            plan.steps.insert(0, Step::Lookup { email: doubt.to_owned() });
            plan
        }
    }
}

/// An unmapped user: look its address up; link a contact whose EMAIL1 it is, park one that
/// holds it only in another slot (`not_adopted`), else create one.
///
/// The mirror's answer is used where it cannot do what Keap's answer would not: no contact
/// with the address, a create; a contact whose EMAIL1 it is, linked with a call to it that
/// confirms it exists. An address held only in another slot would park the user: that is
/// asked of Keap.
fn link_or_create(user: &User<'_>) -> Plan {
    let payload = user.payload;
    let mut steps = Vec::new();
    match user.seen {
        Seen::Found { email, found } if same_address(email, &payload.email) => {
            if let Some(contact) = &found.email1 {
                return adopt(user, contact, IfTaken::Park);
            }
            if !found.elsewhere.is_empty() {
                return Plan::of(vec![Step::Park(not_adopted(user.key, &found.elsewhere))]);
            }
        }
        Seen::Mirrored { email, found } if same_address(email, &payload.email) => {
            if let Some(contact) = &found.email1 {
                return adopt_mirrored(user, contact);
            }
            if !found.elsewhere.is_empty() {
                steps.push(Step::Lookup { email: payload.email.clone() });
            }
        }
        // Planned as if the lookup finds nothing.
        _ => steps.push(Step::Lookup { email: payload.email.clone() }),
    }
    create(user, steps)
}

/// `steps`, then the create of the user's contact and one apply of its rule and `on_create` tags.
fn create(user: &User<'_>, mut steps: Vec<Step>) -> Plan {
    let payload = user.payload;
    let new_tags: BTreeSet<i64> = user.want.union(user.on_create).copied().collect();
    steps.push(Step::Create { body: payload.create_body() });
    if !new_tags.is_empty() {
        steps.push(Step::ApplyTags { id: Target::Created, ids: new_tags });
    }
    Plan::of(steps)
}

/// Links a contact the mirror holds the address for: as [`adopt`], but only with a call to
/// the contact after the link (its answer confirms Keap still has it; a 404 unlinks it), or
/// else a read of it first; and another user's contact is asked of Keap, not parked for.
fn adopt_mirrored(user: &User<'_>, contact: &Contact) -> Plan {
    let mut plan = adopt(user, contact, IfTaken::AskKeap);
    if !plan.steps.iter().any(Step::is_call) {
        plan.steps.insert(0, Step::Read { id: contact.id });
    }
    plan
}

/// Links an existing contact, then sends what differs and applies the rule and `on_create` tags.
fn adopt(user: &User<'_>, contact: &Contact, if_taken: IfTaken) -> Plan {
    let held = Held::from_contact(&contact.json, user.payload);
    let mut changes = user.payload.changes(&held);
    let withheld = user.payload.withhold_consent(&mut changes, &contact.json);
    let mut steps = vec![Step::Link { id: contact.id, sent: held.link_sent(), if_taken }];
    steps.extend(patch(user.payload, contact.id, &changes, Some(&contact.json)));
    let new_tags: BTreeSet<i64> = user.want.union(user.on_create).copied().collect();
    if !new_tags.is_empty() {
        steps.push(Step::ApplyTags { id: Target::Id(contact.id), ids: new_tags });
    }
    Plan { steps, changed: changes.paths(), withheld, ..Plan::default() }
}

/// The plan for a deleted user whose contact is `id` now: `[delivery] on_delete`. `tag`: the
/// id of the `on_delete` tag, when that is the policy; `seen`: the contact, once read (its
/// EMAIL1 is opted out). The mapping is forgotten once the steps are done.
pub(crate) fn deleted(id: i64, on_delete: &OnDelete, tag: Option<i64>, seen: Option<&Contact>) -> Plan {
    match on_delete {
        OnDelete::Keep => Plan::default(),
        OnDelete::DeleteContact => Plan::of(vec![Step::Delete { id }]),
        OnDelete::Tag { opt_out, .. } => {
            let mut steps = Vec::new();
            if opt_out.is_some() && seen.is_none() {
                steps.push(Step::Read { id });
            }
            steps.extend(tag.map(|t| Step::ApplyTags { id: Target::Id(id), ids: BTreeSet::from([t]) }));
            if let Some(reason) = opt_out {
                let email = seen.and_then(Contact::email1).map(str::to_owned);
                if seen.is_none() || email.is_some() {
                    steps.push(Step::OptOut { email, reason: reason.clone() });
                }
            }
            Plan::of(steps)
        }
    }
}

/// Keap matches addresses without case (ASCII).
fn same_address(a: &str, b: &str) -> bool {
    a.eq_ignore_ascii_case(b)
}

/// The EMAIL1 of a create body kept in `outbox.create_sent`.
pub(crate) fn email_of_create(body: &Value) -> Option<String> {
    let items = body.get("email_addresses")?.as_array()?;
    let email1 = items.iter().find(|e| e.get("field").and_then(|f| f.as_str()) == Some("EMAIL1"))?;
    email1.get("email")?.as_str().map(str::to_owned)
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

#[cfg(test)]
mod tests;
