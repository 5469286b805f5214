//! Linking a user to its contact before anything is written to it (one contact, one user), and
//! the mapping read back for a claim that has not changed.

use serde_json::Value;
use tokio_postgres::error::SqlState;
use tokio_postgres::Client;

use super::Claim;
use crate::db::{Db, DbError};

/// What [`link`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Linked {
    /// The user is mapped to the contact now.
    Yes,
    /// Another user key already maps to that contact (one contact, one user).
    TakenBy(String),
    /// The key is gone (deleted, or changed to another key) since the claim: map nothing.
    KeyGone,
    /// The claim is no longer ours (lease expired and re-claimed).
    Lost,
}

/// Maps the claimed user to `contact_id` before anything is written to that contact, so two
/// users can never share one (the unique index on `contact_map.contact_id` decides a race) and
/// a gone key is never mapped. `sent` is what Keap holds of our properties on that contact.
///
/// The outbox row is locked (`for update`) for the statement: a key change enqueues its old key
/// first, so it waits for this mapping and then moves it to the new key (invariant 13).
pub(crate) async fn link(
    client: &Db,
    claim: &Claim,
    instance: &str,
    contact_id: i64,
    sent: &Value,
) -> Result<Linked, DbError> {
    let result = client
        .cached_query_one(
            "with ours as (
                 select key_gone from keap_sync.outbox
                  where user_key = $1 and leased_by = $2 and attempts = $3
                  for update
             ), linked as (
                 insert into keap_sync.contact_map (user_key, contact_id, fingerprint, sent, synced_at)
                 select $1, $4, '', $5, now() from ours
                  where not ours.key_gone
                    and not exists (select from keap_sync.contact_map where contact_id = $4 and user_key <> $1)
                 on conflict (user_key) do update
                    set contact_id = excluded.contact_id, fingerprint = '', sent = excluded.sent, synced_at = now()
                 returning 1
             )
             select exists (select from ours), coalesce((select key_gone from ours), false),
                    exists (select from linked),
                    (select user_key from keap_sync.contact_map where contact_id = $4 and user_key <> $1)",
            &[&claim.user_key, &instance, &claim.attempts, &contact_id, sent],
        )
        .await;
    let row = match result {
        Ok(row) => row,
        // Another delivery mapped the same contact at the same moment and committed first.
        Err(e) if e.code() == Some(&SqlState::UNIQUE_VIOLATION) => {
            return Ok(Linked::TakenBy(owner_of(client, contact_id).await?.unwrap_or_default()))
        }
        Err(e) => return Err(e.into()),
    };
    Ok(linked_of(&row))
}

/// A row of [`link`] or [`link_many`]: whether the claim was ours, the key gone, the user
/// linked, and who holds the contact otherwise.
fn linked_of(row: &tokio_postgres::Row) -> Linked {
    let (ours, key_gone, linked, taken_by): (bool, bool, bool, Option<String>) =
        (row.get(0), row.get(1), row.get(2), row.get(3));
    match (ours, key_gone, linked, taken_by) {
        (false, ..) => Linked::Lost,
        (true, true, ..) => Linked::KeyGone,
        (true, false, true, _) => Linked::Yes,
        (true, false, false, other) => Linked::TakenBy(other.unwrap_or_default()),
    }
}

/// [`link_many`]'s statement; `$wait` says how long it waits for a row (see [`batch_wait`]).
macro_rules! link_sql {
    ($($wait:tt)*) => {
        concat!("with input as (
                         select i.* from unnest($1::text[], $2::int4[], $3::int8[], $4::jsonb[]) with ordinality
                             as i (user_key, attempts, contact_id, sent, n) ", $($wait)*, "
                     ), ours as (
                         select o.user_key, o.key_gone
                           from keap_sync.outbox o join input i on i.user_key = o.user_key
                          where o.leased_by = $5 and o.attempts = i.attempts
                          order by o.user_key for update of o
                     ), linked as (
                         insert into keap_sync.contact_map (user_key, contact_id, fingerprint, sent, synced_at)
                         select i.user_key, i.contact_id, '', i.sent, now() from input i join ours using (user_key)
                          where not ours.key_gone
                            and not exists (select from keap_sync.contact_map m
                                             where m.contact_id = i.contact_id and m.user_key <> i.user_key)
                         on conflict (user_key) do update
                            set contact_id = excluded.contact_id, fingerprint = '', sent = excluded.sent, synced_at = now()
                         returning user_key
                     )
                     select ours.user_key is not null, coalesce(ours.key_gone, false),
                            exists (select from linked l where l.user_key = i.user_key),
                            (select m.user_key from keap_sync.contact_map m
                              where m.contact_id = i.contact_id and m.user_key <> i.user_key)
                       from input i left join ours using (user_key)
                      order by i.n")
    };
}

/// [`link_many`] for one step: it may wait for its row, holding no other.
const LINK: &str = link_sql!("");

/// [`link_many`] for several steps ([`batch_wait`]).
const LINK_BATCH: &str = link_sql!(batch_wait!());

/// [`link`] for many claims in one statement, one answer per element in order. Fails as a
/// whole where [`link`] would answer [`Linked::TakenBy`] from a unique violation (two of them
/// linking one contact, or another delivery linking it meanwhile): the caller links each alone.
pub(crate) async fn link_many(client: &Db, instance: &str, links: &[LinkTo]) -> Result<Vec<Linked>, DbError> {
    let keys: Vec<&str> = links.iter().map(|l| l.claim.user_key.as_str()).collect();
    let attempts: Vec<i32> = links.iter().map(|l| l.claim.attempts).collect();
    let contacts: Vec<i64> = links.iter().map(|l| l.contact_id).collect();
    let sents: Vec<&Value> = links.iter().map(|l| &l.sent).collect();
    let sql = if links.len() > 1 { LINK_BATCH } else { LINK };
    let rows = client.cached_query(sql, &[&keys, &attempts, &contacts, &sents, &instance]).await?;
    Ok(rows.iter().map(linked_of).collect())
}

/// One [`link`] for [`link_many`].
#[derive(Debug)]
pub(crate) struct LinkTo {
    pub(crate) claim: Claim,
    pub(crate) contact_id: i64,
    pub(crate) sent: Value,
}

/// The user the contact is linked to, if any: who won a race to link it.
async fn owner_of(client: &Client, contact_id: i64) -> Result<Option<String>, DbError> {
    let row = client
        .query_opt("select user_key from keap_sync.contact_map where contact_id = $1", &[&contact_id])
        .await?;
    Ok(row.map(|r| r.get(0)))
}

/// The user's mapping as it is now, provided nothing changed since the claim: `Ok(None)` when
/// a newer change arrived (the caller releases the claim for it), `Ok(Some(None))` when the
/// user has no contact. A deleted user's contact is looked up here, not taken from the claim,
/// because a key change moves the mapping to the new key (invariant 13).
pub(crate) async fn mapping_if_unchanged(
    client: &Db,
    claim: &Claim,
    instance: &str,
) -> Result<Option<Option<i64>>, DbError> {
    let row = client
        .cached_query_opt(
            "select m.contact_id from keap_sync.outbox o
               left join keap_sync.contact_map m on m.user_key = o.user_key
              where o.user_key = $1 and o.version = $2 and o.leased_by = $3 and o.attempts = $4",
            &[&claim.user_key, &claim.version, &instance, &claim.attempts],
        )
        .await?;
    Ok(row.map(|r| r.get(0)))
}

/// Records that Keap answered 404 for `contact_id`, the contact `user_key` was linked to
/// (`keap_sync.contact_gone`), and drops it from the mirror: deleted or merged away in Keap.
/// The user is linked again by email by the delivery that found it.
pub(crate) async fn record_gone(client: &Client, contact_id: i64, user_key: &str) -> Result<(), DbError> {
    let sql = format!("with {} select 1", gone_ctes("true"));
    client.execute(&sql, &[&contact_id, &user_key]).await?;
    Ok(())
}

/// What [`record_gone`] does, as the CTEs `recorded` and `forgotten` of a larger statement
/// (`$1` the contact, `$2` the user key), done only `when` that SQL condition holds: the
/// mirror's unlink of a contact Keap confirmed gone records it the same way, in the statement
/// that unlinks it.
pub(crate) fn gone_ctes(when: &str) -> String {
    format!(
        "recorded as (
             insert into keap_sync.contact_gone (contact_id, user_key) select $1, $2 where {when}
             on conflict (contact_id, user_key) do update set found_at = now()
             returning 1
         ), forgotten as (
             delete from keap_sync.mirror where contact_id = $1 and {when}
             returning 1
         )"
    )
}
