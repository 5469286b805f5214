//! The outbox: claiming pending user changes and recording what became of them.
//!
//! Every function here is a single SQL statement, so each is atomic on its own and none holds
//! a transaction open across a Keap call (ARCHITECTURE.md, invariant 3): [`claim`] commits its lease
//! before the caller does any HTTP, and the result functions check `leased_by` so a daemon
//! whose lease expired (it was paused, partitioned, or assumed dead) cannot overwrite the work
//! of whoever claimed the row after it.
//!
//! A row's `version` is bumped by the trigger on every change. A result is final only if the
//! version is still the one claimed; otherwise the row is released and stays queued, and the
//! next delivery reads the newer state (invariant 2).

use std::collections::HashMap;
use std::time::Duration;

use serde_json::Value;
use tokio_postgres::error::SqlState;
use tokio_postgres::Client;

use crate::db::{Db, DbError};
use crate::schema::UserTable;

/// A claimed outbox row, joined with what we know of its Keap contact.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Claim {
    pub(crate) user_key: String,
    pub(crate) version: i64,
    /// Including this one.
    pub(crate) attempts: i32,
    pub(crate) contact_id: Option<i64>,
    pub(crate) fingerprint: Option<String>,
    /// What Keap holds of the properties we own (`contact_map.sent`); `None` if unknown.
    pub(crate) sent: Option<Value>,
    /// The body of an earlier create whose outcome is unknown (invariant 14).
    pub(crate) create_sent: Option<Value>,
}

/// The mapped values of one user, as text, in the order of `UserTable::selects` (the mapped
/// fields, then the tag rules); NULL reads as `None`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct UserRow {
    pub(crate) values: Vec<Option<String>>,
}

/// Timing knobs for [`claim`].
#[derive(Debug, Clone, Copy)]
pub(crate) struct ClaimTiming {
    pub lease: Duration,
    /// A change is claimed once the user has been quiet this long...
    pub settle: Duration,
    /// ...or once it has waited this long, so a user who never goes quiet still syncs.
    pub max_settle: Duration,
}

/// Claims up to `limit` due rows for `instance`, oldest schedule first.
pub(crate) async fn claim(
    client: &Db,
    instance: &str,
    limit: i64,
    t: ClaimTiming,
) -> Result<Vec<Claim>, DbError> {
    let rows = client
        .cached_query(
            "with due as (
                 select user_key from keap_sync.outbox
                  where parked_at is null
                    and next_attempt_at <= now()
                    and (changed_at <= now() - make_interval(secs => $3)
                         or first_changed_at <= now() - make_interval(secs => $4))
                    and (lease_until is null or lease_until < now())
                  order by priority, next_attempt_at
                  limit $1
                  for update skip locked
             )
             update keap_sync.outbox o
                set lease_until = now() + make_interval(secs => $2),
                    leased_by   = $5,
                    attempts    = o.attempts + 1
               from due
               left join keap_sync.contact_map m on m.user_key = due.user_key
              where o.user_key = due.user_key
          returning o.user_key, o.version, o.attempts, m.contact_id, m.fingerprint, m.sent, o.create_sent",
            &[
                &limit,
                &t.lease.as_secs_f64(),
                &t.settle.as_secs_f64(),
                &t.max_settle.as_secs_f64(),
                &instance,
            ],
        )
        .await?;
    Ok(rows
        .iter()
        .map(|r| Claim {
            user_key: r.get(0),
            version: r.get(1),
            attempts: r.get(2),
            contact_id: r.get(3),
            fingerprint: r.get(4),
            sent: r.get(5),
            create_sent: r.get(6),
        })
        .collect())
}

/// Why one user's row could not be read: the park reason, naming the user key and the column.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Unreadable(pub(crate) String);

/// One user as [`read_users`] found it: its synced columns, or why they could not be read.
pub(crate) type ReadUser = Result<UserRow, Unreadable>;

/// A user's link to its contact, as `preview` reads it.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Mapping {
    pub(crate) contact_id: i64,
    pub(crate) fingerprint: Option<String>,
    pub(crate) sent: Option<Value>,
}

/// The mappings of `keys` (read only).
pub(crate) async fn mappings(client: &Client, keys: &[String]) -> Result<HashMap<String, Mapping>, DbError> {
    let rows = client
        .query(
            "select user_key, contact_id, nullif(fingerprint, ''), sent
               from keap_sync.contact_map where user_key = any($1)",
            &[&keys],
        )
        .await?;
    Ok(rows
        .iter()
        .map(|r| (r.get(0), Mapping { contact_id: r.get(1), fingerprint: r.get(2), sent: r.get(3) }))
        .collect())
}

/// Keys of the changes waiting for delivery, with their version, in the order the daemon
/// claims them (read only, for `preview` and `run --dry-run`).
pub(crate) async fn pending(client: &Client, limit: i64) -> Result<Vec<(String, i64)>, DbError> {
    let rows = client
        .query(
            "select user_key, version from keap_sync.outbox
              where parked_at is null
              order by priority, next_attempt_at
              limit $1",
            &[&limit],
        )
        .await?;
    Ok(rows.iter().map(|r| (r.get(0), r.get(1))).collect())
}

/// Keys of the users table in key order, at most `limit` (`None`: all), after `after`.
pub(crate) async fn user_keys(
    client: &Client,
    table: &UserTable,
    after: Option<&str>,
    limit: i64,
) -> Result<Vec<String>, DbError> {
    let sql = format!(
        "select t.{key}::text from {table} t
          where $1::text is null or t.{key} > $1::text::{key_type}
          order by t.{key} limit $2",
        key = table.key,
        table = table.qualified,
        key_type = table.key_type,
    );
    let rows = client.query(&sql, &[&after, &limit]).await?;
    Ok(rows.iter().map(|r| r.get(0)).collect())
}

/// Reads the current rows of `keys` from the users table. A key with no row was deleted.
///
/// Only the key and the synced columns are read (so the daemon's role needs `SELECT` on those
/// columns alone: `sql/role.example.sql`), each as text. The key as `key::text` is the text the
/// trigger writes (`to_jsonb(row) ->> key`) for integer, bigint, uuid and text keys, so it
/// matches the outbox key (`tests/it/capture.rs` checks each type); any column type (citext,
/// varchar, …) reads as text.
///
/// One bad row stays bad alone: if the batch statement fails on a value (a `::text` conversion
/// that raises, a key the key type no longer accepts after a type change) or a value does not
/// decode (non-UTF-8 bytes in a `SQL_ASCII` database), every key of the batch is read again on
/// its own, column by column, and the one that fails gets an [`Unreadable`] reason for
/// `outbox::park` instead of failing the batch — every batch, forever. A failure that is not
/// about a value (a dropped column, a lost connection, a missing privilege) is still an error:
/// it concerns every user alike.
pub(crate) async fn read_users(
    client: &Client,
    table: &UserTable,
    keys: &[String],
) -> Result<HashMap<String, ReadUser>, DbError> {
    match read_batch(client, table, keys).await {
        Ok(Some(rows)) => return Ok(rows.into_iter().map(|(k, row)| (k, Ok(row))).collect()),
        Ok(None) => {
            tracing::warn!("a user row of this batch does not decode; reading the batch one user at a time")
        }
        Err(e) if is_about_a_value(&e) => {
            tracing::warn!(error = %e, "a user row of this batch cannot be read; reading the batch one user at a time")
        }
        Err(e) => return Err(e),
    }
    let mut found = HashMap::with_capacity(keys.len());
    for key in keys {
        if let Some(row) = read_one(client, table, key).await? {
            found.insert(key.clone(), row);
        }
    }
    Ok(found)
}

/// `t.key::text, <every mapped value>`: the one select list of a user read.
pub(crate) fn user_select_list(table: &UserTable) -> String {
    let mut list = format!("t.{}::text", table.key);
    for s in &table.selects {
        list.push_str(", ");
        list.push_str(&s.sql);
    }
    list
}

/// The whole batch in one statement; `Ok(None)` when a value does not decode.
async fn read_batch(
    client: &Client,
    table: &UserTable,
    keys: &[String],
) -> Result<Option<HashMap<String, UserRow>>, DbError> {
    let sql = format!(
        "select {list}
           from {table} t
          where t.{key} = any($1::text[]::{key_type}[])",
        list = user_select_list(table),
        table = table.qualified,
        key = table.key,
        key_type = table.key_type,
    );
    let rows = client.query(&sql, &[&keys]).await?;
    let mut found = HashMap::with_capacity(rows.len());
    for r in &rows {
        let decoded = (|| {
            let values = (1..=table.selects.len()).map(|i| r.try_get(i)).collect::<Result<_, _>>()?;
            Ok::<_, tokio_postgres::Error>((r.try_get::<_, Option<String>>(0)?, UserRow { values }))
        })();
        match decoded {
            Ok((Some(key), row)) => {
                found.insert(key, row);
            }
            Ok((None, _)) => {}
            Err(_) => return Ok(None),
        }
    }
    Ok(Some(found))
}

/// One user, one column at a time, so a failure names its column. `Ok(None)`: no such row.
async fn read_one(client: &Client, table: &UserTable, key: &str) -> Result<Option<ReadUser>, DbError> {
    let row_of = |select: &str| {
        format!(
            "select {select} from {table} t where t.{key} = $1::text::{key_type}",
            table = table.qualified,
            key = table.key,
            key_type = table.key_type,
        )
    };
    let exists = client.query_opt(&row_of("1"), &[&key]).await;
    match exists {
        Ok(Some(_)) => {}
        Ok(None) => return Ok(None),
        Err(e) => {
            let e = DbError::from(e);
            if !is_about_a_value(&e) {
                return Err(e);
            }
            return Ok(Some(Err(Unreadable(format!(
                "user {key}: the key does not read as {key_type} (column {column}): {why}; fix the row or \
                 the column's type, then run `keap-sync failures retry {key}`",
                key_type = table.key_type,
                column = table.key,
                why = reason(&e),
            )))));
        }
    }
    let mut values: Vec<Option<String>> = Vec::with_capacity(table.selects.len());
    for selected in &table.selects {
        let result = client.query_opt(&row_of(&selected.sql), &[&key]).await.map_err(DbError::from);
        let value = match result {
            // Deleted meanwhile.
            Ok(None) => return Ok(None),
            Ok(Some(r)) => r.try_get::<_, Option<String>>(0).map_err(DbError::from),
            Err(e) if is_about_a_value(&e) => Err(e),
            Err(e) => return Err(e),
        };
        match value {
            Ok(v) => values.push(v),
            Err(e) => {
                return Ok(Some(Err(Unreadable(format!(
                    "user {key}: {what} cannot be read as text: {why}; fix the value (or the \
                     column's type, or the expression), and the user syncs on its next change or on \
                     `keap-sync failures retry {key}`",
                    what = selected.what,
                    why = reason(&e),
                )))))
            }
        }
    }
    Ok(Some(Ok(UserRow { values })))
}

/// True when a failure is about a value of one row rather than the setup or the connection:
/// any server error outside the classes of connection (08), resources (53), operator
/// intervention (57), system (58) and schema/privilege problems (42: a dropped column, a
/// revoked grant), and any value that does not decode on our side.
fn is_about_a_value(e: &DbError) -> bool {
    if e.is_connection_lost() {
        return false;
    }
    let DbError::Query(e) = e else { return false };
    match e.code() {
        Some(code) => !["08", "42", "53", "57", "58"].iter().any(|class| code.code().starts_with(class)),
        // No server code and not a lost connection: a value that did not decode (`try_get`).
        None => true,
    }
}

/// The server's message, without driver framing.
fn reason(e: &DbError) -> String {
    match e {
        DbError::Query(q) => match q.as_db_error() {
            Some(db) => db.message().to_owned(),
            None => std::error::Error::source(q).map_or_else(|| q.to_string(), |s| s.to_string()),
        },
        other => other.to_string(),
    }
}

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

/// Records a success: the contact map is updated, and the outbox row is deleted if no newer
/// change arrived meanwhile, else released for the next delivery. Returns true if the row was
/// deleted.
///
/// No mapping is written for a key that is gone (ARCHITECTURE.md, invariant 13): if the newest
/// change of the row is the key's disappearance (a delete, or a key change to another key),
/// `key_gone` says so. The capture trigger enqueues the old key before it moves a mapping, so a
/// key change that races this statement waits for it and then carries the mapping along.
pub(crate) async fn complete(
    client: &Db,
    claim: &Claim,
    instance: &str,
    done: &Done,
) -> Result<bool, DbError> {
    // `gone` must be evaluated before `kept` decides; the CTE reference guarantees that, and the
    // two never touch the same row (one deletes it, the other runs only if it was not deleted).
    // `ours` holds a row only if this claim still owned the outbox row (same instance and the
    // same attempt count: a re-claim bumps it), so a holder whose lease expired changes nothing,
    // not even the contact map.
    let (variant, contact_id, fingerprint, sent) = match done {
        Done::Synced { contact_id, fingerprint, sent } => {
            (0, Some(*contact_id), Some(fingerprint.as_str()), Some(sent))
        }
        Done::Forgotten => (1, None, None, None),
        Done::Nothing => (2, None, None, None),
    };
    let synced = matches!(done, Done::Synced { .. });
    // Built once: the statement is prepared once per connection by its text.
    static SQL: std::sync::LazyLock<[String; 3]> = std::sync::LazyLock::new(|| {
        [COMPLETE_SYNCED, COMPLETE_FORGOTTEN, COMPLETE_NOTHING].map(complete_sql)
    });
    let sql = &SQL[variant];
    let row = client
        .cached_query_one(
            sql,
            &[
                &claim.user_key,
                &claim.version,
                &instance,
                &contact_id,
                &fingerprint,
                &claim.attempts,
                &synced,
                &sent,
            ],
        )
        .await?;
    Ok(row.get(0))
}

/// What [`complete`] does to the contact map, by outcome: `$4`, `$5`, `$8` are the contact id,
/// fingerprint and `sent` (typed even where unused, so every variant takes the same parameters).
const COMPLETE_SYNCED: &str =
    "insert into keap_sync.contact_map (user_key, contact_id, fingerprint, sent, synced_at)
             select $1, $4, $5, $8, now() from ours
              where not ours.key_gone
                and not exists (select from keap_sync.contact_map where contact_id = $4 and user_key <> $1)
             on conflict (user_key) do update
                set contact_id = excluded.contact_id, fingerprint = excluded.fingerprint,
                    sent = excluded.sent, synced_at = now()";
const COMPLETE_FORGOTTEN: &str = "delete from keap_sync.contact_map
              where user_key = $1 and exists (select from ours)
                and $4::int8 is null and $5::text is null and $8::jsonb is null";
const COMPLETE_NOTHING: &str = "select where $4::int8 is null and $5::text is null and $8::jsonb is null";

/// The statement of [`complete`] around one of the contact-map parts above.
fn complete_sql(map_sql: &str) -> String {
    format!(
        "with gone as (
             delete from keap_sync.outbox
              where user_key = $1 and version = $2 and leased_by = $3 and attempts = $6
             returning key_gone
         ), kept as (
             update keap_sync.outbox
                set lease_until = null, leased_by = null, attempts = 0, next_attempt_at = now(),
                    first_changed_at = now(), last_error = null, last_status = null, last_body = null,
                    payload = null, first_failed_at = null, last_failed_at = null,
                    create_sent = case when $7 then null else create_sent end
              where user_key = $1 and leased_by = $3 and attempts = $6 and not exists (select from gone)
             returning key_gone
         ), ours as (
             select key_gone from gone union all select key_gone from kept
         ), mapped as (
             {map_sql}
         )
         select exists (select from gone)"
    )
}

/// How many times [`with_retries`] runs a statement that failed without losing the connection.
const RECORD_ATTEMPTS: u32 = 4;

/// Runs one bookkeeping statement of a delivery (`what`, for `user_key`) and runs it again when
/// it failed for a reason that is the moment's, not the connection's: a deadlock (with the
/// key-change trigger, say) or a serialization failure at once, a lock or statement timeout (a
/// row an app transaction holds) or any other statement error after a short backoff, at most
/// [`RECORD_ATTEMPTS`] times in all. A lost connection is returned at once: that is the
/// session's to handle. Every statement here is safe to repeat (it is one statement, rolled
/// back if it failed, and checks the claim), and the result of a Keap call already made is
/// worth a few tries, since giving up means the change is delivered again after its lease.
///
/// Between tries the shared connection serves the other deliveries, so one locked row costs
/// its own delivery, not everyone's (ARCHITECTURE.md, "Where concurrency lives").
pub(crate) async fn with_retries<T, F, Fut>(
    what: &str,
    user_key: &str,
    mut statement: F,
) -> Result<T, DbError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, DbError>>,
{
    let mut attempt = 1;
    loop {
        let error = match statement().await {
            Ok(value) => return Ok(value),
            Err(e) => e,
        };
        let Some(delay) = retry_delay(&error, attempt) else { return Err(error) };
        tracing::warn!(user = %user_key, statement = what, attempt, retry_in_ms = delay.as_millis() as u64, error = %error, detail = %error.server_message(), "a bookkeeping statement failed; trying it again");
        tokio::time::sleep(delay).await;
        attempt += 1;
    }
}

/// How long to wait before running again a statement that failed with `e` on try `attempt`
/// (1-based); `None`: give up.
fn retry_delay(e: &DbError, attempt: u32) -> Option<Duration> {
    if attempt >= RECORD_ATTEMPTS || e.is_connection_lost() {
        return None;
    }
    let DbError::Query(q) = e else {
        // A value this version does not know: trying again reads the same value.
        return None;
    };
    let code = q.code();
    if code == Some(&SqlState::T_R_DEADLOCK_DETECTED) || code == Some(&SqlState::T_R_SERIALIZATION_FAILURE) {
        // The other transaction has gone ahead: the next try finds no conflict.
        return Some(Duration::ZERO);
    }
    // Lock and statement timeouts (55P03, 57014) and the rest: 200 ms, 400 ms, 800 ms.
    Some(Duration::from_millis(200 << (attempt - 1).min(4)))
}

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
    let (ours, key_gone, linked, taken_by): (bool, bool, bool, Option<String>) =
        (row.get(0), row.get(1), row.get(2), row.get(3));
    Ok(match (ours, key_gone, linked, taken_by) {
        (false, ..) => Linked::Lost,
        (true, true, ..) => Linked::KeyGone,
        (true, false, true, _) => Linked::Yes,
        (true, false, false, other) => Linked::TakenBy(other.unwrap_or_default()),
    })
}

async fn owner_of(client: &Client, contact_id: i64) -> Result<Option<String>, DbError> {
    let row = client
        .query_opt("select user_key from keap_sync.contact_map where contact_id = $1", &[&contact_id])
        .await?;
    Ok(row.map(|r| r.get(0)))
}

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
                    parked_at = case when $3::float8 is null and version = $2 then now() end,
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
            ],
        )
        .await?;
    Ok(())
}

/// Gives back a claim without a result (shutdown, lost token), so it is retried at once by
/// whoever runs next. The attempt is not counted.
pub(crate) async fn release(client: &Db, claim: &Claim, instance: &str) -> Result<(), DbError> {
    client
        .cached_execute(
            "update keap_sync.outbox
                set lease_until = null, leased_by = null, attempts = greatest(attempts - 1, 0)
              where user_key = $1 and leased_by = $2 and attempts = $3",
            &[&claim.user_key, &instance, &claim.attempts],
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

/// Gives back every claim `instance` still holds (stop, or a new session after a lost
/// connection): claimable again after `after` (zero: at once), which covers a call that may
/// still be in flight at Keap for an aborted delivery.
pub(crate) async fn release_all(client: &Client, instance: &str, after: Duration) -> Result<u64, DbError> {
    Ok(client
        .execute(
            "update keap_sync.outbox
                set lease_until = case when $2::float8 > 0
                                       then least(lease_until, now() + make_interval(secs => $2)) end,
                    leased_by = null,
                    attempts = greatest(attempts - 1, 0)
              where leased_by = $1",
            &[&instance, &after.as_secs_f64()],
        )
        .await?)
}

/// Forgets every instance other than `instance` none of whose recorded database session
/// (`keap_sync.instances.backend_pid` and `backend_start`) is still connected, and releases its
/// claims at once. Called only by the holder of the delivery lock: since that lock is ours, no
/// other instance is delivering, and one with no session left cannot record a result either,
/// so its claims would otherwise sit out their lease (two minutes by default) after a crash.
/// A live instance that lost the lock releases its own claims as its session ends, so its rows
/// are left to it. The attempt each claim counted is given back, as in [`release_all`].
///
/// Two statements, the second only when an instance is gone: the first reads the small
/// instances table, and the outbox (which has no index on `leased_by`, so that claims stay HOT
/// updates) is scanned only after a crash, not on every heartbeat.
pub(crate) async fn release_orphaned(client: &Client, instance: &str) -> Result<u64, DbError> {
    let gone: Vec<String> = client
        .query(
            "delete from keap_sync.instances i
              where i.instance <> $1
                and not exists (select from pg_catalog.pg_stat_activity a
                                 where a.pid = i.backend_pid and a.backend_start = i.backend_start)
          returning i.instance",
            &[&instance],
        )
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect();
    if gone.is_empty() {
        return Ok(0);
    }
    Ok(client
        .execute(
            "update keap_sync.outbox
                set lease_until = null, leased_by = null, attempts = greatest(attempts - 1, 0)
              where leased_by = any($1)",
            &[&gone],
        )
        .await?)
}

/// When the loop should claim again, after a claim that took fewer rows than it asked for.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct NextDue {
    /// How long until the earliest pending row that was not due at the claim becomes due (zero
    /// if one became due since); `None` if there is none.
    pub(crate) due_in: Option<Duration>,
    /// Some row was already due at the claim, yet the claim did not take it: an open
    /// transaction holds its lock (an application transaction that changed the user and has not
    /// committed, typically), and `skip locked` passed it over. Claiming again at once would
    /// only skip it again; its commit sends a NOTIFY anyway.
    pub(crate) skipped_locked: bool,
}

/// How long until the next row becomes claimable, looking past rows the last claim skipped
/// because someone else holds their lock. `since_claim` is how long ago the claim was sent: a
/// row that was due by then and is still here was skipped (the caller asks only after a claim
/// that took fewer rows than its limit, so the limit did not leave it). Looks at the 1,000
/// earliest schedules of each priority only; anything later is found by the regular poll.
///
/// One index range scan per priority (`outbox_claim_idx` is `(priority, next_attempt_at)`), so
/// the cost does not grow with the backlog; ordering all pending rows by `next_attempt_at`
/// alone would sort every one of them.
pub(crate) async fn next_due_in(
    client: &Db,
    t: ClaimTiming,
    since_claim: Duration,
) -> Result<NextDue, DbError> {
    let row = client
        .cached_query_one(
            "with pending as (
                 (select next_attempt_at, changed_at, first_changed_at, lease_until from keap_sync.outbox
                   where parked_at is null and priority = 0 order by next_attempt_at limit 1000)
                 union all
                 (select next_attempt_at, changed_at, first_changed_at, lease_until from keap_sync.outbox
                   where parked_at is null and priority = 1 order by next_attempt_at limit 1000)
                 union all
                 (select next_attempt_at, changed_at, first_changed_at, lease_until from keap_sync.outbox
                   where parked_at is null and priority = 2 order by next_attempt_at limit 1000)
             ), due as (
                 select greatest(
                            next_attempt_at,
                            least(changed_at + make_interval(secs => $1), first_changed_at + make_interval(secs => $2)),
                            coalesce(lease_until, '-infinity')) as at
                   from pending
             )
             select extract(epoch from min(at) filter (where at > now() - make_interval(secs => $3)) - now())::float8,
                    coalesce(bool_or(at <= now() - make_interval(secs => $3)), false)
               from due",
            &[&t.settle.as_secs_f64(), &t.max_settle.as_secs_f64(), &since_claim.as_secs_f64()],
        )
        .await?;
    let secs: Option<f64> = row.get(0);
    Ok(NextDue { due_in: secs.map(|s| Duration::from_secs_f64(s.max(0.0))), skipped_locked: row.get(1) })
}
