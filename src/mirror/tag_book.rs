//! Keap's tag catalogue by id, for `[inbound] tags`: a contact carries only tag ids
//! (`tag_ids` of the v2 listing), and its column holds the names of the tags of one category.
//!
//! Read whole (`GET /v1/tags`, 1,000 a page) the first time the inbound pass meets a tag id it
//! does not know, and kept in memory for the daemon's life (it outlives database sessions).
//! A tag made in Keap later (an unknown id) makes the pass read it again, through the
//! configuration's client, so the limiter and the day's quota count it like any call
//! (invariant 19). An id still unknown after a read (a tag deleted meanwhile, or Keap's list
//! lagging) is never written as a number: the contact's tags are not written and its mirror
//! row stays due, and the catalogue is read again once [`RETRY_MISSING`] has passed (or at
//! once for an id not seen missing before). A renamed tag or category is seen at the next read
//! (any unknown id), or after a restart.

use std::collections::{BTreeSet, HashMap};
use std::time::Duration;

use serde_json::{json, Value};
use tokio::sync::Mutex;
use tokio::time::Instant;
use tokio_postgres::Client;

use super::{Keap, MirrorError};
use crate::config::TagCategory;
use crate::keap::model::TagPage;
use crate::keap::{Auth, ErrorKind};

/// Tags asked for per call.
const PAGE: usize = 1000;

/// At most this many pages a read (1,000,000 tags).
const MAX_PAGES: usize = 1000;

/// How long an id that a read did not find waits before it makes another read.
pub(crate) const RETRY_MISSING: Duration = Duration::from_secs(600);

/// One tag as the catalogue lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Entry {
    name: String,
    category_id: Option<i64>,
    category_name: Option<String>,
}

impl Entry {
    fn in_category(&self, category: &TagCategory) -> bool {
        match category {
            TagCategory::Id(id) => self.category_id == Some(*id),
            TagCategory::Name(name) => self.category_name.as_deref() == Some(name.as_str()),
        }
    }
}

#[derive(Debug, Default)]
struct Book {
    tags: HashMap<i64, Entry>,
    /// When the catalogue was last read, and the ids that read was asked for and did not find.
    read_at: Option<Instant>,
    missing: BTreeSet<i64>,
}

/// The cache. One per daemon.
#[derive(Debug, Default)]
pub(crate) struct TagBook {
    book: Mutex<Book>,
}

/// What the pass needs of the catalogue for one batch: the tags of the category by id, and
/// every id known.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Names {
    in_category: HashMap<i64, String>,
    known: BTreeSet<i64>,
}

impl Names {
    /// The column's value for a mirrored contact, and whether its row must stay due: the sorted
    /// names of its tags of the category (`[]` when none: Keap says no such tag is applied);
    /// `null` when the copy holds no tag ids at all (a create's body, say) or holds one whose
    /// name is not known (then the row stays due).
    pub(crate) fn value(&self, contact: &Value) -> (Value, bool) {
        let Some(ids) = contact.get("tag_ids").and_then(Value::as_array) else {
            return (Value::Null, false);
        };
        let ids: Vec<i64> = ids.iter().filter_map(Value::as_i64).collect();
        if ids.iter().any(|id| !self.known.contains(id)) {
            return (Value::Null, true);
        }
        let mut names: Vec<&str> =
            ids.iter().filter_map(|id| self.in_category.get(id)).map(String::as_str).collect();
        names.sort_unstable();
        names.dedup();
        (json!(names), false)
    }
}

/// The tag ids of the mirrored contacts' copies.
pub(crate) fn ids_of<'a>(contacts: impl Iterator<Item = &'a Value>) -> BTreeSet<i64> {
    contacts
        .filter_map(|c| c.get("tag_ids").and_then(Value::as_array))
        .flatten()
        .filter_map(Value::as_i64)
        .collect()
}

impl TagBook {
    /// The names of `category`'s tags among `ids`, reading the catalogue first if one of them is
    /// unknown (and may be asked for now, [`RETRY_MISSING`]). A read that fails is logged and
    /// leaves what was known: contacts with an unknown id wait for the next pass.
    pub(crate) async fn names(
        &self,
        db: &Client,
        keap: &Keap<'_>,
        category: &TagCategory,
        ids: &BTreeSet<i64>,
    ) -> Result<Names, MirrorError> {
        let mut book = self.book.lock().await;
        let unknown: BTreeSet<i64> = ids.iter().copied().filter(|id| !book.tags.contains_key(id)).collect();
        let stale = book.read_at.is_none_or(|at| at.elapsed() >= RETRY_MISSING);
        if !unknown.is_empty() && (stale || !unknown.is_subset(&book.missing)) {
            match read_all(db, keap).await {
                Ok(tags) => {
                    let known = tags.len();
                    book.tags = tags;
                    book.missing = unknown.iter().copied().filter(|id| !book.tags.contains_key(id)).collect();
                    tracing::debug!(tags = known, missing = book.missing.len(), "read Keap's tag list");
                    if !book.missing.is_empty() {
                        let ids: Vec<String> = book.missing.iter().map(i64::to_string).collect();
                        tracing::warn!(tags = %ids.join(","), "contacts carry tag ids Keap's tag list does not have; their [inbound] tags wait for a later read");
                    }
                }
                Err(MirrorError::Db(e)) => return Err(MirrorError::Db(e)),
                Err(e) => {
                    tracing::warn!(error = %e, "could not read Keap's tag list; [inbound] tags of contacts with a new tag wait for the next pass");
                    book.missing.extend(unknown);
                }
            }
            book.read_at = Some(Instant::now());
        }
        let in_category = ids
            .iter()
            .filter_map(|id| Some((*id, book.tags.get(id)?)))
            .filter(|(_, e)| e.in_category(category))
            .map(|(id, e)| (id, e.name.clone()))
            .collect();
        let known = ids.iter().copied().filter(|id| book.tags.contains_key(id)).collect();
        Ok(Names { in_category, known })
    }
}

/// The whole catalogue, page by page.
async fn read_all(db: &Client, keap: &Keap<'_>) -> Result<HashMap<i64, Entry>, MirrorError> {
    let mut tags = HashMap::new();
    for page in 0..MAX_PAGES {
        let listed = page_of(db, keap, page * PAGE).await?;
        let count = listed.tags.len();
        for t in listed.tags {
            let (category_id, category_name) = t.category();
            let name = t.name.unwrap_or_default();
            tags.insert(t.id, Entry { name, category_id, category_name });
        }
        if count < PAGE || listed.next.as_deref().is_none_or(str::is_empty) {
            break;
        }
    }
    Ok(tags)
}

/// One page with the current credential; after a 401, refreshed once and asked again.
async fn page_of(db: &Client, keap: &Keap<'_>, offset: usize) -> Result<TagPage, MirrorError> {
    let deadline = Instant::now() + keap.timeout * 2;
    let auth = keap.tokens.auth(db).await.map_err(MirrorError::Token)?;
    match keap.client.list_tags(&auth, PAGE, offset, deadline).await {
        Err(e) if e.kind == ErrorKind::Unauthorized => {
            let fresh: Auth = keap.tokens.after_unauthorized(&auth).await.map_err(MirrorError::Token)?;
            keap.client.list_tags(&fresh, PAGE, offset, deadline).await.map_err(MirrorError::Keap)
        }
        other => other.map_err(MirrorError::Keap),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_contacts_value_is_its_category_tags_sorted_empty_or_nothing() {
        let names = Names {
            in_category: HashMap::from([(1, "Churn risk".to_owned()), (2, "At risk".to_owned())]),
            known: BTreeSet::from([1, 2, 3]),
        };
        assert_eq!(names.value(&json!({"tag_ids": [3, 1, 2]})), (json!(["At risk", "Churn risk"]), false));
        assert_eq!(names.value(&json!({"tag_ids": [3]})), (json!([]), false), "none of the category");
        assert_eq!(names.value(&json!({"tag_ids": []})), (json!([]), false));
        assert_eq!(names.value(&json!({"given_name": "Ada"})), (Value::Null, false), "no tag information");
        assert_eq!(names.value(&json!({"tag_ids": [1, 99]})), (Value::Null, true), "an unknown id waits");
    }
}
