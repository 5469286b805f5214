//! Recording successes: the contact map updated and the outbox row deleted or released, one
//! statement for every success that arrives together.

use serde_json::Value;

use super::Claim;
use crate::db::{Db, DbError};

/// How a claimed change ended well.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Done {
    /// Keap holds our owned values (`sent`) on this contact.
    Synced { contact_id: i64, fingerprint: String, sent: Value },
    /// The user row is gone and its contact was deleted in Keap: the mapping is forgotten.
    Forgotten,
    /// Nothing to do (payload unchanged, or a deleted user that was never synced).
    Nothing,
}

/// One success for [`complete`]: the claim (its key, version and attempts are read) and how it
/// ended.
#[derive(Debug)]
pub(crate) struct Completion {
    pub(crate) claim: Claim,
    pub(crate) done: Done,
}

/// [`complete`]'s statement (a macro: [`COMPLETE`] and [`COMPLETE_BATCH`] differ in how they
/// take their rows), one array element per success: `$4` (the contact id) set for a
/// [`Done::Synced`], `$7` true for a [`Done::Forgotten`], neither for [`Done::Nothing`].
///
/// `gone` must be evaluated before `kept` decides; the reference to it guarantees that, and
/// the two never touch the same row (one deletes it, the other runs only if it was not
/// deleted). `ours` holds a user only if this claim still owned its outbox row (same instance
/// and the same attempt count: a re-claim bumps it), so a holder whose lease expired changes
/// nothing, not even the contact map. `forgotten` and the insert touch different users.
macro_rules! complete_sql {
    ($($wait:tt)*) => {
        concat!("with done as (
         select d.* from unnest($1::text[], $2::int8[], $3::int4[], $4::int8[], $5::text[], $6::jsonb[], $7::bool[])
             as d (user_key, version, attempts, contact_id, fingerprint, sent, forget) ", $($wait)*, "
     ), gone as (
         delete from keap_sync.outbox o
          using done d
          where o.user_key = d.user_key and o.version = d.version and o.leased_by = $8
            and o.attempts = d.attempts
         returning o.user_key, o.key_gone
     ), kept as (
         update keap_sync.outbox o
            set lease_until = null, leased_by = null, attempts = 0, next_attempt_at = now(),
                first_changed_at = now(), last_error = null, last_status = null, last_body = null,
                payload = null, first_failed_at = null, last_failed_at = null,
                create_sent = case when d.contact_id is not null then null else o.create_sent end
           from done d
          where o.user_key = d.user_key and o.leased_by = $8 and o.attempts = d.attempts
            and not exists (select from gone g where g.user_key = d.user_key)
         returning o.user_key, o.key_gone
     ), ours as (
         select user_key, key_gone from gone union all select user_key, key_gone from kept
     ), forgotten as (
         delete from keap_sync.contact_map m
          using done d join ours using (user_key)
          where d.forget and m.user_key = d.user_key
     )
     insert into keap_sync.contact_map (user_key, contact_id, fingerprint, sent, synced_at)
     select d.user_key, d.contact_id, d.fingerprint, d.sent, now()
       from done d join ours using (user_key)
      where d.contact_id is not null and not ours.key_gone
        and not exists (select from keap_sync.contact_map m
                         where m.contact_id = d.contact_id and m.user_key <> d.user_key)
     on conflict (user_key) do update
        set contact_id = excluded.contact_id, fingerprint = excluded.fingerprint,
            sent = excluded.sent, synced_at = now()")
    };
}

/// One step alone: it may wait for its row (`lock_timeout`), holding no other.
const COMPLETE: &str = complete_sql!("");

/// [`COMPLETE`] for several steps ([`batch_wait`]).
const COMPLETE_BATCH: &str = complete_sql!(batch_wait!());

/// Records successes, each as if alone: the contact map is updated, and the outbox row is
/// deleted if no newer change arrived meanwhile, else released for the next delivery. One
/// statement for all of `done`; it fails as a whole (a lock timeout on one row, two users
/// mapped to one contact), and then nothing is recorded and the caller records each alone.
///
/// No mapping is written for a key that is gone (ARCHITECTURE.md, invariant 13): if the newest
/// change of the row is the key's disappearance (a delete, or a key change to another key),
/// `key_gone` says so. The capture trigger enqueues the old key before it moves a mapping, so a
/// key change that races this statement waits for it and then carries the mapping along.
pub(crate) async fn complete(client: &Db, instance: &str, done: &[Completion]) -> Result<(), DbError> {
    let n = done.len();
    let (mut keys, mut versions, mut attempts) =
        (Vec::with_capacity(n), Vec::with_capacity(n), Vec::with_capacity(n));
    let (mut contacts, mut fingerprints, mut sents, mut forget) =
        (Vec::with_capacity(n), Vec::with_capacity(n), Vec::with_capacity(n), Vec::with_capacity(n));
    // In key order, the order every other writer of several outbox rows takes them in.
    let mut sorted: Vec<&Completion> = done.iter().collect();
    sorted.sort_by(|a, b| a.claim.user_key.cmp(&b.claim.user_key));
    for Completion { claim, done } in sorted {
        keys.push(claim.user_key.as_str());
        versions.push(claim.version);
        attempts.push(claim.attempts);
        let synced = match done {
            Done::Synced { contact_id, fingerprint, sent } => Some((*contact_id, fingerprint.as_str(), sent)),
            Done::Forgotten | Done::Nothing => None,
        };
        contacts.push(synced.map(|s| s.0));
        fingerprints.push(synced.map(|s| s.1));
        sents.push(synced.map(|s| s.2));
        forget.push(matches!(done, Done::Forgotten));
    }
    let sql = if done.len() > 1 { COMPLETE_BATCH } else { COMPLETE };
    client
        .cached_execute(
            sql,
            &[&keys, &versions, &attempts, &contacts, &fingerprints, &sents, &forget, &instance],
        )
        .await?;
    Ok(())
}
