//! keap-sync's picture of Keap (`keap_sync.mirror`, `sql/0015_mirror.sql`): per contact, its
//! addresses, the mapped properties as Keap holds them, its tags and Keap's update time.
//!
//! Filled by a full listing ([`list_all`]: the v2 listing ordered by id, 1,000 contacts a
//! page, only the fields the mapping reads), page by page: each page is stored in one
//! statement that also records the next page's token, so memory holds one page whatever the
//! number of contacts, and a listing stopped half-way resumes where it was. A listing that
//! completes removes the contacts it did not see (deleted or merged away in Keap) and moves
//! the watermark to its start: every change Keap made before then is in the mirror. A linked
//! contact it did not see is only queued for Keap to confirm gone (`gone`, invariant 20): the
//! listing itself unlinks nobody.
//!
//! Calls go through the configuration's Keap access, so the limiter and the day's quota
//! count them like deliveries (invariant 15).
//!
//! With `[inbound]`, what the mirror stores also lands in the users table's Keap-owned columns
//! (`inbound`, after each of the daemon's sweeps; tag names from Keap's tag list, `tag_book`). The contacts Keap's hooks named are read by
//! id into the mirror (`hooked`) and applied the same way.

mod gone;
mod history;
mod hooked;
mod inbound;
mod lookup;
mod sweep;
mod tag_book;

pub(crate) use gone::confirm as confirm_gone;
pub(crate) use hooked::read_queued as read_hooked;
pub(crate) use inbound::{apply as apply_inbound, InboundError, Tagging};
pub(crate) use lookup::{forget, remember, Lookups};
pub(crate) use sweep::{catch_up, sweep};
pub(crate) use tag_book::TagBook;

use std::collections::HashMap;
use std::time::Duration;

use serde_json::{json, Value};
use tokio::time::Instant;
use tokio_postgres::Client;

use crate::db::DbError;
use crate::keap::route::Route;
use crate::keap::v2::{self, Listed, Page};
use crate::keap::{Auth, ErrorKind, KeapClient, KeapError};
use crate::mapping::Mapper;
use crate::token::{TokenError, TokenSource};

/// What a full listing did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct Listing {
    /// List calls made.
    pub pages: u64,
    /// Contacts stored.
    pub contacts: u64,
    /// Contacts the mirror held that the listing did not see (gone from Keap), removed.
    pub removed: u64,
}

/// Why the mirror could not be brought up to date (what was stored stays; a listing resumes).
#[derive(Debug, thiserror::Error)]
pub(crate) enum MirrorError {
    #[error(transparent)]
    Db(#[from] DbError),
    #[error("cannot list Keap's contacts: {0}")]
    Keap(KeapError),
    #[error("cannot list Keap's contacts: {0}")]
    Token(TokenError),
}

/// Lists every contact into the mirror, resuming a listing in progress.
pub(crate) async fn list_all(db: &Client, keap: &Keap<'_>, mapper: &Mapper) -> Result<Listing, MirrorError> {
    let fields = v2::fields(&mapper.properties());
    let mut token = resume_or_start(db).await?;
    let mut listing = Listing::default();
    loop {
        let route = Route::list_contacts("id", "", &fields, token.as_deref());
        let page = keap.page(db, route).await?;
        listing.pages += 1;
        listing.contacts += page.contacts.len() as u64;
        token = page.next.clone();
        store_page(db, &page).await?;
        if token.is_none() {
            break;
        }
    }
    listing.removed = finish_listing(db).await?;
    Ok(listing)
}

/// The next page of a listing in progress, or `None` having started a new one now.
async fn resume_or_start(db: &Client) -> Result<Option<String>, DbError> {
    let row = db
        .query_one(
            "update keap_sync.mirror_state
                set listing_started_at = coalesce(listing_started_at, now())
              returning listing_token",
            &[],
        )
        .await?;
    Ok(row.get(0))
}

/// Stores one page and the token of the next, in one statement: a page is stored whole or
/// not at all, and a resumed listing starts after the last page stored.
async fn store_page(db: &Client, page: &Page) -> Result<(), DbError> {
    let rows: Vec<Value> = page.contacts.iter().map(record).collect();
    let sql = format!("{} update keap_sync.mirror_state set listing_token = $2", upsert_page(""));
    db.execute(&sql, &[&Value::Array(rows), &page.next]).await?;
    Ok(())
}

/// The first part of a statement that stores a page (`$1`, rows as [`record`] makes them) and
/// then moves the listing's state: a CTE upserting every contact, `guard` added to its update
/// (`""`, or a condition that keeps a row stored from a newer read).
pub(crate) fn upsert_page(guard: &str) -> String {
    format!(
        "with page as (
             insert into keap_sync.mirror as m (contact_id, emails, email1, contact, tag_ids, opted_in, updated_at, read_at)
             select c.id, c.emails, c.email1, c.contact, c.tag_ids, c.opted_in, c.updated_at, now()
               from jsonb_to_recordset($1::jsonb)
                    as c(id bigint, emails text[], email1 text, contact jsonb, tag_ids bigint[], opted_in boolean, updated_at timestamptz)
             on conflict (contact_id) do update
                set emails = excluded.emails, email1 = excluded.email1, contact = excluded.contact,
                    tag_ids = excluded.tag_ids, opted_in = excluded.opted_in,
                    updated_at = excluded.updated_at, read_at = excluded.read_at, inbound_due = true
              {guard}
         )"
    )
}

/// One listed contact as a row of `keap_sync.mirror`.
pub(crate) fn record(listed: &Listed) -> Value {
    let c = &listed.contact;
    let (emails, email1) = addresses(&c.json);
    let tags = c.json.get("tag_ids").cloned().unwrap_or_else(|| json!([]));
    json!({
        "id": c.id,
        "emails": emails,
        "email1": email1,
        "contact": c.json,
        "tag_ids": tags,
        "opted_in": listed.opted_in,
        "updated_at": listed.updated,
    })
}

/// A contact's addresses (v1 shape), lower-cased (ASCII) in slot order, and its EMAIL1.
fn addresses(contact: &Value) -> (Vec<String>, Option<String>) {
    let mut emails: Vec<(String, String)> = contact
        .get("email_addresses")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter_map(|e| {
            Some((
                e.get("field")?.as_str()?.to_owned(),
                e.get("email")?.as_str()?.trim().to_ascii_lowercase(),
            ))
        })
        .collect();
    emails.sort();
    let email1 = emails.iter().find(|(slot, _)| slot == "EMAIL1").map(|(_, e)| e.clone());
    (emails.into_iter().map(|(_, e)| e).collect(), email1)
}

/// Ends a completed listing: removes the contacts it did not see (queuing the linked ones for
/// Keap to confirm gone, `gone::confirm`), and records how far the mirror reaches. Returns how
/// many were removed.
async fn finish_listing(db: &Client) -> Result<u64, DbError> {
    let sql = format!(
        "with gone as (
             delete from keap_sync.mirror
              where read_at < (select listing_started_at from keap_sync.mirror_state)
             returning contact_id
         ), {}, done as (
             update keap_sync.mirror_state
                set listed_at = listing_started_at,
                    watermark = greatest(watermark, listing_started_at),
                    listing_token = null, listing_started_at = null
             returning 1
         )
         select (select count(*) from gone), (select count(*) from done)",
        gone::suspects("array(select contact_id from gone)")
    );
    let row = db.query_one(&sql, &[]).await?;
    Ok(u64::try_from(row.get::<_, i64>(0)).unwrap_or(0))
}

/// What a listing needs of Keap: the client (its limiter counts the calls) and the credential.
pub(crate) struct Keap<'a> {
    pub(crate) client: &'a KeapClient,
    pub(crate) tokens: &'a TokenSource,
    /// Keap's request timeout; a page must arrive within twice that.
    pub(crate) timeout: Duration,
    /// How many times a page Keap throttled (429) is asked again, after `Retry-After` or a
    /// doubling pause from 1 s (at most 30 s): a listing that shares Keap's limits with a
    /// running daemon (`reconcile` beside it) still finishes. Any other failure stops the
    /// listing, which resumes at its next run from the last page stored. 0 where a caller has
    /// a better way out (a lookup falls back to Keap's own).
    pub(crate) retries: u32,
}

/// Retries of a page for a listing with no other way out (pauses of 1, 2, 4, 8, 16 s, or Keap's
/// `Retry-After`): about half a minute before it gives up, keeping what it stored.
pub(crate) const RETRIES: u32 = 5;
/// The pause before the first retry of a page; it doubles, up to [`MAX_PAUSE`].
const FIRST_PAUSE: Duration = Duration::from_secs(1);
/// The longest pause before a retry of a page, whatever `Retry-After` says.
const MAX_PAUSE: Duration = Duration::from_secs(30);

impl Keap<'_> {
    /// [`Keap::page_once`], asked again up to `retries` times while Keap answers 429.
    async fn page(&self, db: &Client, route: Route) -> Result<Page, MirrorError> {
        let mut pause = FIRST_PAUSE;
        for _ in 0..self.retries {
            match self.page_once(db, route.clone()).await {
                Err(MirrorError::Keap(e)) if e.kind == ErrorKind::Throttled => {
                    let wait = e.retry_after.unwrap_or(pause).min(MAX_PAUSE);
                    tracing::info!(error = %e, wait_ms = wait.as_millis() as u64, "listing Keap's contacts: asking for the page again");
                    tokio::time::sleep(wait).await;
                    pause = (pause * 2).min(MAX_PAUSE);
                }
                other => return other,
            }
        }
        self.page_once(db, route).await
    }

    /// One list call with the current credential; after a 401, refreshed once and tried again.
    async fn page_once(&self, db: &Client, route: Route) -> Result<Page, MirrorError> {
        let deadline = Instant::now() + self.timeout * 2;
        let auth = self.tokens.auth(db).await.map_err(MirrorError::Token)?;
        match self.client.list_contacts(&auth, route.clone(), deadline).await {
            Err(e) if e.kind == ErrorKind::Unauthorized => {
                let fresh: Auth = self.tokens.after_unauthorized(&auth).await.map_err(MirrorError::Token)?;
                self.client.list_contacts(&fresh, route, deadline).await.map_err(MirrorError::Keap)
            }
            other => other.map_err(MirrorError::Keap),
        }
    }
}

/// The mirrored contacts of `ids`: their properties (v1 shape) and tag ids.
pub(crate) async fn contacts(db: &Client, ids: &[i64]) -> Result<HashMap<i64, (Value, Vec<i64>)>, DbError> {
    let rows = db
        .query(
            "select contact_id, contact, tag_ids from keap_sync.mirror where contact_id = any($1)",
            &[&ids],
        )
        .await?;
    Ok(rows.iter().map(|r| (r.get(0), (r.get(1), r.get(2)))).collect())
}

/// For each of `emails` (lower-cased), the mirrored contacts whose EMAIL1 it is, by id.
pub(crate) async fn by_email1(db: &Client, emails: &[String]) -> Result<HashMap<String, Vec<i64>>, DbError> {
    let rows = db
        .query(
            "select email1, array_agg(contact_id order by contact_id) from keap_sync.mirror
              where email1 = any($1) group by email1",
            &[&emails],
        )
        .await?;
    Ok(rows.iter().map(|r| (r.get(0), r.get(1))).collect())
}

/// Whether a full listing has completed: the mirror has a watermark.
const LISTED: &str = "select watermark is not null from keap_sync.mirror_state";

/// Whether a full listing has completed ([`LISTED`]).
pub(crate) async fn listed(db: &Client) -> Result<bool, DbError> {
    Ok(db.query_one(LISTED, &[]).await?.get(0))
}

/// How fresh the mirror is, and what the last reconcile found, for `status`.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize)]
pub(crate) struct Freshness {
    /// Contacts mirrored (counted up to 1,000,000; more reads as that).
    pub(crate) contacts: i64,
    /// Seconds since the newest of Keap's changes known to be in the mirror (now − watermark);
    /// `None`: no listing has completed.
    pub(crate) behind_secs: Option<f64>,
    /// Seconds since the last completed full listing started.
    pub(crate) listed_secs_ago: Option<f64>,
    /// A full listing is under way (it resumes where it stopped).
    pub(crate) listing: bool,
    /// Seconds since the last `reconcile`, the users it compared and its counts by class.
    pub(crate) reconciled_secs_ago: Option<f64>,
    pub(crate) reconciled_users: Option<i64>,
    pub(crate) drift: Option<Value>,
    /// Linked contacts Keap answered 404 for (`keap_sync.contact_gone`).
    pub(crate) gone: i64,
}

/// Reads [`Freshness`].
pub(crate) async fn freshness(db: &Client) -> Result<Freshness, DbError> {
    let r = db
        .query_one(
            "select (select count(*) from (select 1 from keap_sync.mirror limit 1000000) m),
                    extract(epoch from now() - watermark)::float8,
                    extract(epoch from now() - listed_at)::float8,
                    listing_started_at is not null,
                    extract(epoch from now() - reconciled_at)::float8, reconciled_users, drift,
                    (select count(*) from keap_sync.contact_gone)
               from keap_sync.mirror_state",
            &[],
        )
        .await?;
    Ok(Freshness {
        contacts: r.get(0),
        behind_secs: r.get(1),
        listed_secs_ago: r.get(2),
        listing: r.get(3),
        reconciled_secs_ago: r.get(4),
        reconciled_users: r.get(5),
        drift: r.get(6),
        gone: r.get(7),
    })
}

/// The watermark as Unix seconds and the last reconcile's counts by class, for `/metrics`.
pub(crate) async fn gauges(db: &Client) -> Result<(Option<f64>, Vec<(String, i64)>), DbError> {
    let r = db
        .query_one("select extract(epoch from watermark)::float8, drift from keap_sync.mirror_state", &[])
        .await?;
    let drift: Option<Value> = r.get(1);
    let counts = drift
        .as_ref()
        .and_then(Value::as_object)
        .into_iter()
        .flatten()
        .map(|(class, n)| (class.clone(), n.as_i64().unwrap_or(0)))
        .collect();
    Ok((r.get(0), counts))
}
