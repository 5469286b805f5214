//! The sweep: what Keap changed since the last one, into the mirror. A window on Keap's update
//! time, `[watermark - overlap, now - lag]`, listed oldest first; after each page is stored the
//! watermark moves to that page's newest update time, and to the window's end once the last
//! page is stored, so a sweep cut short resumes from the last page stored. Without a
//! watermark (no full listing yet) the sweep is a full listing.
//!
//! [`catch_up`] is the sweep a lookup needs (`super::lookup`): no lag, and a short overlap,
//! so that the mirror holds every contact Keap changed up to the moment it is asked.

use serde_json::Value;
use tokio_postgres::Client;

use std::time::Duration;

use super::{list_all, record, upsert_page, Keap, MirrorError};
use crate::config::MirrorConfig;
use crate::db::DbError;
use crate::keap::route::Route;
use crate::keap::v2::{self, Page};
use crate::mapping::Mapper;

/// What one sweep did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Swept {
    /// List calls made.
    pub(crate) pages: u64,
    /// Contacts stored.
    pub(crate) contacts: u64,
    /// Whether it was a full listing (the mirror had none).
    pub(crate) full: bool,
}

/// One sweep of Keap's changes into the mirror.
pub(crate) async fn sweep(
    db: &Client,
    keap: &Keap<'_>,
    mapper: &Mapper,
    timing: &MirrorConfig,
) -> Result<Swept, MirrorError> {
    let Some((start, end)) = window(db, timing).await? else {
        let listed = list_all(db, keap, mapper).await?;
        return Ok(Swept { pages: listed.pages, contacts: listed.contacts, full: true });
    };
    if start >= end {
        return Ok(Swept::default());
    }
    let filter = format!("start_update_time=={start};end_update_time=={end}");
    list_changes(db, keap, mapper, &filter, Reach::PageByPage(end)).await
}

/// How far the watermark moves as a listing of changes is stored.
enum Reach {
    /// To each page's newest update time, and to this (the window's end) after the last page.
    PageByPage(String),
    /// Only once the last page is stored, to this (when the listing started).
    AtTheEnd(String),
}

/// Lists the contacts `filter` selects, oldest change first, into the mirror.
async fn list_changes(
    db: &Client,
    keap: &Keap<'_>,
    mapper: &Mapper,
    filter: &str,
    reach: Reach,
) -> Result<Swept, MirrorError> {
    let fields = v2::fields(&mapper.properties());
    let mut swept = Swept::default();
    let mut token = None;
    loop {
        let route = Route::list_contacts("update_time", filter, &fields, token.as_deref());
        let page = keap.page(db, route).await?;
        swept.pages += 1;
        swept.contacts += page.contacts.len() as u64;
        token = page.next.clone();
        let reached = match (&token, &reach) {
            (Some(_), Reach::PageByPage(_)) => page.contacts.last().and_then(|c| c.updated.clone()),
            (Some(_), Reach::AtTheEnd(_)) => None,
            (None, Reach::PageByPage(end) | Reach::AtTheEnd(end)) => Some(end.clone()),
        };
        store(db, &page, reached.as_deref()).await?;
        if token.is_none() {
            return Ok(swept);
        }
    }
}

/// Lists every contact Keap changed since `overlap` before the watermark, up to now (no lag,
/// and no end: a contact stamped by a clock ahead of the database's is still seen), and moves
/// the watermark to when this listing started. `None`: the mirror has no watermark (no full
/// listing yet), so it cannot answer for Keap.
pub(crate) async fn catch_up(
    db: &Client,
    keap: &Keap<'_>,
    mapper: &Mapper,
    overlap: Duration,
) -> Result<Option<Swept>, MirrorError> {
    let sql = format!(
        "select {}, {} from keap_sync.mirror_state",
        utc("watermark - make_interval(secs => $1)"),
        utc("now()")
    );
    let row = db.query_one(&sql, &[&overlap.as_secs_f64()]).await.map_err(DbError::from)?;
    let (Some(start), now): (Option<String>, String) = (row.get(0), row.get(1)) else { return Ok(None) };
    let filter = format!("start_update_time=={start}");
    list_changes(db, keap, mapper, &filter, Reach::AtTheEnd(now)).await.map(Some)
}

/// SQL rendering the timestamp `expr` as RFC 3339 UTC with milliseconds.
fn utc(expr: &str) -> String {
    format!("to_char(({expr}) at time zone 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.MS\"Z\"')")
}

/// The window to list, as RFC 3339 UTC with milliseconds; `None` when there is no watermark
/// yet (a full listing is due).
async fn window(db: &Client, timing: &MirrorConfig) -> Result<Option<(String, String)>, DbError> {
    let row = db
        .query_one(
            &format!(
                "select {}, {} from keap_sync.mirror_state",
                utc("watermark - make_interval(secs => $1)"),
                utc("now() - make_interval(secs => $2)")
            ),
            &[&timing.overlap.as_secs_f64(), &timing.lag.as_secs_f64()],
        )
        .await?;
    let start: Option<String> = row.get(0);
    Ok(start.map(|s| (s, row.get(1))))
}

/// Stores a page (a contact already stored with a newer update time is kept) and moves the
/// watermark to `reached`, in one statement.
async fn store(db: &Client, page: &Page, reached: Option<&str>) -> Result<(), DbError> {
    let rows: Vec<Value> = page.contacts.iter().map(record).collect();
    let newer =
        "where m.updated_at is null or excluded.updated_at is null or excluded.updated_at >= m.updated_at";
    let sql = format!(
        "{} update keap_sync.mirror_state set watermark = greatest(watermark, $2::text::timestamptz)",
        upsert_page(newer)
    );
    db.execute(&sql, &[&Value::Array(rows), &reached]).await?;
    Ok(())
}
