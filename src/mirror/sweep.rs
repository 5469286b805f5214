//! The sweep: what Keap changed since the last one, into the mirror. A window on Keap's update
//! time, `[watermark - overlap, now - lag]`, listed oldest first; after each page is stored the
//! watermark moves to that page's newest update time, and to the window's end once the last
//! page is stored, so a sweep cut short resumes from the last page stored. Without a
//! watermark (no full listing yet) the sweep is a full listing.

use serde_json::Value;
use tokio_postgres::Client;

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
    let mut swept = Swept::default();
    if start >= end {
        return Ok(swept);
    }
    let fields = v2::fields(&mapper.properties());
    let filter = format!("start_update_time=={start};end_update_time=={end}");
    let mut token = None;
    loop {
        let route = Route::list_contacts("update_time", &filter, &fields, token.as_deref());
        let page = keap.page(db, route).await?;
        swept.pages += 1;
        swept.contacts += page.contacts.len() as u64;
        token = page.next.clone();
        let reached = match &token {
            Some(_) => page.contacts.last().and_then(|c| c.updated.clone()),
            None => Some(end.clone()),
        };
        store(db, &page, reached.as_deref()).await?;
        if token.is_none() {
            return Ok(swept);
        }
    }
}

/// The window to list, as RFC 3339 UTC with milliseconds; `None` when there is no watermark
/// yet (a full listing is due).
async fn window(db: &Client, timing: &MirrorConfig) -> Result<Option<(String, String)>, DbError> {
    let row = db
        .query_one(
            "select to_char((watermark - make_interval(secs => $1)) at time zone 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.MS\"Z\"'),
                    to_char((now() - make_interval(secs => $2)) at time zone 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.MS\"Z\"')
               from keap_sync.mirror_state",
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
