//! The contacts Keap's hooks named (`keap_sync.hook_queue`, filled by `hooks`), read as they
//! are now and stored in the mirror, which marks them due for the inbound pass.
//!
//! Up to [`IDS_PER_CALL`] queued ids a call, one v2 listing filtered by ids (`contact_ids`,
//! the listing's id filter in Keap's 2025-11-05 v2 OpenAPI file; how a set is spelled is not
//! documented, a comma-separated list is assumed). Each call's contacts are stored, and their
//! queue rows removed, in one statement; a row queued again while its contact was being read
//! stays, and is read again. A contact Keap no longer lists (deleted, merged away, or missed by
//! the listing) is removed from the queue; if a user is linked to it, it is queued for Keap to
//! confirm gone by id (`super::gone`: the listing's word alone unlinks nobody).
//!
//! **A hook about a change the mirror already holds costs no call** (design invariant 18: our
//! own writes never come back in). Keap fires `contact.edit`/`contact.add` for every write,
//! keap-sync's included, and may deliver an event more than once; the receiver keeps, per
//! queued contact, the earliest and latest change time the deliveries gave
//! (`object_keys[].timestamp`, `sql/0024_hook_changed_at.sql`). Before each call, the rows
//! whose changes the mirror holds are removed from the queue, in one statement (a row queued
//! again while it runs is checked again as it is then, so a newer change keeps it):
//!
//! - every change at or before the mirror row's `updated_at`, Keap's update time as last read
//!   (by a sweep, a listing or a hook's read): the read would find nothing new;
//! - every change exactly at the row's `written_at`, Keap's stamp of keap-sync's own last write
//!   (`super::remember`): the echo of that write, whose values the mirror holds.
//!
//! The others are read as before: a change after our write, one whose time is unknown, and
//! one made between the row's last read and our write (the write's stamp does not cover it:
//! the mirror merged only what we sent). The skip is tolerant by construction: if Keap's
//! `timestamp` is the time of sending rather than of the change, it is later than every
//! stamp the mirror holds, and the contact is read (one call, still correct), as it is when
//! Keap's answer carried no stamp. A change stamped the very instant of our write is taken
//! for its echo; the sweep, which lists by update time, still finds it.

use serde_json::{json, Value};
use tokio_postgres::Client;

use super::{record, upsert_page, Keap, MirrorError};
use crate::db::DbError;
use crate::hooks::QUEUED;
use crate::keap::route::Route;
use crate::keap::v2::{self, Page};
use crate::mapping::Mapper;

/// Ids in one listing call: a query of about 2 KB, well below any gateway's limit.
const IDS_PER_CALL: i64 = 200;

/// At most this many calls a pass (20,000 contacts); the rest waits for the next pass.
const MAX_CALLS: usize = 100;

/// What one pass did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Hooked {
    /// List calls made.
    pub(crate) calls: u64,
    /// Contacts stored.
    pub(crate) contacts: u64,
    /// Queued ids taken (stored, or gone from Keap).
    pub(crate) taken: u64,
    /// Queued ids removed without a call: changes the mirror already holds.
    pub(crate) skipped: u64,
}

/// Removes the queued contacts whose every change the mirror holds (see the module's docs).
///
/// Rows the receiver is queueing again right now are skipped, not waited for (`skip locked`,
/// here and in [`store`]): the receiver locks its rows in id order and these statements in
/// whatever order they meet them, so waiting could close a cycle that Postgres breaks only
/// after `deadlock_timeout` (1 s), with a receiver answer held that long (seen in
/// `cargo bench --bench hooks`). A skipped row was queued again: it is read next pass.
const SEEN: &str = "delete from keap_sync.hook_queue where contact_id in (
                        select q.contact_id from keap_sync.hook_queue q
                          join keap_sync.mirror m on m.contact_id = q.contact_id
                         where q.changed_at <= m.updated_at
                            or (q.first_changed_at = q.changed_at and q.changed_at = m.written_at)
                           for update of q skip locked)";

/// Reads every queued contact into the mirror, oldest first.
pub(crate) async fn read_queued(
    db: &Client,
    keap: &Keap<'_>,
    mapper: &Mapper,
) -> Result<Hooked, MirrorError> {
    let fields = v2::fields(&mapper.properties());
    let mut done = Hooked::default();
    for _ in 0..MAX_CALLS {
        done.skipped += db.execute(SEEN, &[]).await.map_err(DbError::from)?;
        let rows = db.query(QUEUED, &[&IDS_PER_CALL]).await.map_err(DbError::from)?;
        if rows.is_empty() {
            break;
        }
        let taken: Vec<Value> =
            rows.iter().map(|r| json!({"id": r.get::<_, i64>(0), "at": r.get::<_, String>(1)})).collect();
        let ids: Vec<String> = rows.iter().map(|r| r.get::<_, i64>(0).to_string()).collect();
        let filter = format!("contact_ids=={}", ids.join(","));
        let page = keap.page(db, Route::list_contacts("id", &filter, &fields, None)).await?;
        done.calls += 1;
        done.contacts += page.contacts.len() as u64;
        done.taken += rows.len() as u64;
        store(db, &page, taken).await?;
        if (rows.len() as i64) < IDS_PER_CALL {
            break;
        }
    }
    Ok(done)
}

/// Stores a call's contacts (one the mirror holds from a newer read is kept), queues the linked
/// ones it did not return for Keap to confirm gone, and removes the queue rows read, unless
/// queued again since, in one statement.
async fn store(db: &Client, page: &Page, taken: Vec<Value>) -> Result<(), DbError> {
    let rows: Vec<Value> = page.contacts.iter().map(record).collect();
    let newer =
        "where m.updated_at is null or excluded.updated_at is null or excluded.updated_at >= m.updated_at";
    let missing = "array(select x.id from jsonb_to_recordset($2::jsonb) as x(id bigint)
                          where x.id not in (select (r->>'id')::bigint from jsonb_array_elements($1::jsonb) r))";
    let sql = format!(
        "{}, {} delete from keap_sync.hook_queue where contact_id in (
             select q.contact_id from keap_sync.hook_queue q
               join jsonb_to_recordset($2::jsonb) as x(id bigint, at timestamptz)
                 on q.contact_id = x.id and q.queued_at = x.at
                for update of q skip locked)",
        upsert_page(newer),
        super::gone::suspects(missing)
    );
    db.execute(&sql, &[&Value::Array(rows), &Value::Array(taken)]).await?;
    Ok(())
}
