//! In-doubt creates (invariant 14): a create's body recorded before it is sent, and settled when
//! a lookup showed it made no contact.

use serde_json::Value;
use tokio_postgres::error::SqlState;

use super::Claim;
use crate::db::{Db, DbError};

/// What [`begin_create`] decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum CreateSlot {
    /// Recorded: the create may be sent.
    Reserved,
    /// Another user's create for the same email is in flight or unsettled: try later.
    EmailBusy,
    /// The claim is no longer ours.
    Lost,
}

/// Records the body of a create about to be sent, before it is sent: if its answer is lost (or
/// the process dies), the next attempt looks for the contact by the email in it before it
/// could create another (ARCHITECTURE.md, invariant 14). The email is unique among creates in
/// flight, so two users with one email never create two contacts.
pub(crate) async fn begin_create(
    client: &Db,
    claim: &Claim,
    instance: &str,
    body: &Value,
) -> Result<CreateSlot, DbError> {
    let result = client
        .cached_execute(
            "update keap_sync.outbox set create_sent = $4
              where user_key = $1 and leased_by = $2 and attempts = $3",
            &[&claim.user_key, &instance, &claim.attempts, body],
        )
        .await;
    match result {
        Ok(0) => Ok(CreateSlot::Lost),
        Ok(_) => Ok(CreateSlot::Reserved),
        Err(e) if e.code() == Some(&SqlState::UNIQUE_VIOLATION) => Ok(CreateSlot::EmailBusy),
        Err(e) => Err(e.into()),
    }
}

/// [`begin_create_many`]'s statement; `$wait` says how long it waits for a row (see
/// [`batch_wait`]).
macro_rules! begin_create_sql {
    ($($wait:tt)*) => {
        concat!("with input as (
                         select i.* from unnest($1::text[], $2::int4[], $3::jsonb[]) with ordinality
                             as i (user_key, attempts, body, n) ", $($wait)*, "
                     ), reserved as (
                         update keap_sync.outbox o set create_sent = i.body
                           from input i
                          where o.user_key = i.user_key and o.leased_by = $4 and o.attempts = i.attempts
                         returning o.user_key
                     )
                     select exists (select from reserved r where r.user_key = i.user_key) from input i order by i.n")
    };
}

/// [`begin_create_many`] for one step: it may wait for its row, holding no other.
const BEGIN_CREATE: &str = begin_create_sql!("");

/// [`begin_create_many`] for several steps ([`batch_wait`]).
const BEGIN_CREATE_BATCH: &str = begin_create_sql!(batch_wait!());

/// [`begin_create`] for many claims in one statement, one answer per element in order
/// (`Reserved` or `Lost`). Fails as a whole where [`begin_create`] would answer
/// [`CreateSlot::EmailBusy`]: the caller records each alone.
pub(crate) async fn begin_create_many(
    client: &Db,
    instance: &str,
    creates: &[CreateStart],
) -> Result<Vec<CreateSlot>, DbError> {
    let keys: Vec<&str> = creates.iter().map(|c| c.claim.user_key.as_str()).collect();
    let attempts: Vec<i32> = creates.iter().map(|c| c.claim.attempts).collect();
    let bodies: Vec<&Value> = creates.iter().map(|c| &c.body).collect();
    let sql = if creates.len() > 1 { BEGIN_CREATE_BATCH } else { BEGIN_CREATE };
    let rows = client.cached_query(sql, &[&keys, &attempts, &bodies, &instance]).await?;
    Ok(rows.iter().map(|r| if r.get(0) { CreateSlot::Reserved } else { CreateSlot::Lost }).collect())
}

/// One [`begin_create`] for [`begin_create_many`].
#[derive(Debug)]
pub(crate) struct CreateStart {
    pub(crate) claim: Claim,
    pub(crate) body: Value,
}

/// Settles an in-doubt create (invariant 14) that a lookup by its email showed made no contact
/// of this user's: nothing has that address as EMAIL1, or the contact that has it is another
/// user's. Cleared at once, so a later park, a `failures retry` or an email change never looks
/// for that email again (where a stranger's contact, or another user's, may have it by then),
/// and the email no longer holds back another user's create. False if the claim is no longer
/// ours.
pub(crate) async fn settle_create(client: &Db, claim: &Claim, instance: &str) -> Result<bool, DbError> {
    let n = client
        .cached_execute(
            "update keap_sync.outbox set create_sent = null
              where user_key = $1 and leased_by = $2 and attempts = $3",
            &[&claim.user_key, &instance, &claim.attempts],
        )
        .await?;
    Ok(n == 1)
}
