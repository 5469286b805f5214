//! A new user's lookup answered from the mirror instead of a call per user
//! (`GET /v1/contacts?email=…`): with a full listing in the mirror, a backfill costs one call
//! per user (the create, or the one call that links a contact found here) instead of two.
//!
//! The mirror answers only as of its last listing of Keap's changes, so before it answers,
//! the contacts Keap changed since are listed ([`super::catch_up`]): at most once every
//! `[mirror] confirm_secs` for all lookups together (one delivery lists, the others wait for
//! it), usually one call. Where the mirror can still be wrong, delivery checks with Keap
//! before anything it could not undo (invariant 20):
//!
//! - **A contact deleted in Keap** stays in the mirror until the next full listing (a listing
//!   of changes does not show deletions). A contact found here is linked only with a call to
//!   it right after (the `PATCH` or tag apply that follows the link, else a read before it);
//!   Keap's 404 removes it from the mirror ([`forget`]) and the user is looked up in Keap.
//! - **Contacts keap-sync creates or readdresses** are written here as it goes ([`remember`]),
//!   so that a second user with the same address finds them before the next listing (with
//!   `[hooks]`, every write Keap accepts is, with Keap's stamp of it: `super::hooked`).
//! - **Another user's contact, or an address held only in another slot**: the mirror's word
//!   would park the user; Keap is asked instead, and its answer decides, as without a mirror.
//! - **A contact made in Keap after the last listing of changes** (at most `confirm_secs`
//!   before the create) is not seen. The create is Keap's upsert by email
//!   (`duplicate_option=Email`), so no duplicate is made; that contact is updated with the
//!   user's owned properties, and, as with any create that meets a contact made a moment
//!   before it, array slots Keap may replace (EMAIL2/EMAIL3, other phones) can be lost. The
//!   window is the same race a lookup and a create always had, widened from the time
//!   between the two calls to at most `confirm_secs`; `lookups = false` closes it at the
//!   cost of a lookup per new user.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use serde_json::{Map, Value};
use tokio::sync::Mutex;
use tokio::time::Instant;
use tokio_postgres::Client;

use super::{catch_up, Keap, MirrorError};
use crate::config::MirrorConfig;
use crate::db::{Db, DbError};
use crate::keap::model::{ByEmail, Contact};
use crate::keap::stamp;
use crate::keap::KeapClient;
use crate::mapping::Mapper;
use crate::token::TokenSource;

/// How far before the watermark a listing of changes for lookups starts: the time between
/// keap-sync's database clock and Keap's that this tolerates.
const CLOCK_SKEW: Duration = Duration::from_secs(10);

/// The mirror as the daemon's deliveries ask it, with when it last caught up with Keap.
pub(crate) struct Lookups {
    /// How old the last listing of changes may be when the mirror answers.
    confirm: Duration,
    /// Keap's request timeout (a page of a listing must arrive within twice that).
    timeout: Duration,
    /// A full listing has completed (the mirror has a watermark). Known once, it stays so for
    /// the session (only a Keap app switch, with no daemon running, takes it away); until
    /// then each lookup checks with one prepared statement, without waiting on `caught_up`.
    listed: AtomicBool,
    /// When the last listing of changes started; held while one runs, so that the
    /// deliveries waiting for an answer make one listing, not one each.
    caught_up: Mutex<Option<Instant>>,
}

impl Lookups {
    /// The lookups `[mirror]` asks for; `None` when every new user is to be looked up in Keap.
    pub(crate) fn new(config: &MirrorConfig, timeout: Duration) -> Option<Lookups> {
        config.lookups.then(|| Lookups {
            confirm: config.confirm,
            timeout,
            listed: AtomicBool::new(false),
            caught_up: Mutex::new(None),
        })
    }

    /// What Keap holds for `email`, as the mirror knows it once caught up with Keap's
    /// changes; `None` when the mirror cannot answer (no full listing yet, or Keap's changes
    /// could not be listed: the caller looks the address up in Keap, and meets the same
    /// error there if it lasts).
    pub(crate) async fn find(
        &self,
        db: &Db,
        (client, tokens): (&KeapClient, &TokenSource),
        mapper: &Mapper,
        email: &str,
    ) -> Result<Option<ByEmail>, DbError> {
        let keap = Keap { client, tokens, timeout: self.timeout, retries: 0 };
        if !self.caught_up(db, &keap, mapper).await? {
            return Ok(None);
        }
        let rows = db
            .cached_query(
                "select contact_id, contact from keap_sync.mirror where emails @> array[$1::text]",
                &[&email.trim().to_ascii_lowercase()],
            )
            .await?;
        let contacts = rows.iter().map(|r| Contact { id: r.get(0), json: r.get(1) }).collect();
        Ok(Some(ByEmail::of(email, contacts)))
    }

    /// Whether the mirror holds Keap's changes up to at most `confirm` ago, listing them
    /// first if not. One listing at a time: the others wait for it and then use it.
    async fn caught_up(&self, db: &Db, keap: &Keap<'_>, mapper: &Mapper) -> Result<bool, DbError> {
        if !self.listed.load(Ordering::Relaxed) {
            if !db.cached_query_one(super::LISTED, &[]).await?.get::<_, bool>(0) {
                return Ok(false);
            }
            self.listed.store(true, Ordering::Relaxed);
        }
        let mut caught_up = self.caught_up.lock().await;
        if caught_up.is_some_and(|at| at.elapsed() < self.confirm) {
            return Ok(true);
        }
        let started = Instant::now();
        match catch_up(db, keap, mapper, CLOCK_SKEW).await {
            Ok(Some(swept)) => {
                tracing::debug!(
                    pages = swept.pages,
                    contacts = swept.contacts,
                    "listed Keap's latest changes into the mirror"
                );
                *caught_up = Some(started);
                Ok(true)
            }
            Ok(None) => Ok(false),
            Err(MirrorError::Db(e)) => Err(e),
            Err(e) => {
                tracing::warn!(error = %e, "could not list Keap's latest changes; looking the address up in Keap instead");
                Ok(false)
            }
        }
    }
}

/// Records in the mirror what keap-sync just wrote to contact `id` (a create's body, or a
/// `PATCH`), so that a lookup finds it before the next listing shows it, with `written`,
/// Keap's stamp of the write (`last_updated` in its answer, microseconds since the epoch), so
/// that the hooks Keap fires for it cost no call (`super::hooked`). Keap's update time as read
/// is left unknown: the row now holds what was sent, not a change someone made in Keap since
/// its last read; any listing of the contact replaces this. A write that carries addresses (a
/// create, a readdress) adds the contact if the mirror lacks it; another one only updates a
/// row the mirror has (a row holding one property would be a wrong picture of the contact).
pub(crate) async fn remember(
    db: &Db,
    id: i64,
    body: &Map<String, Value>,
    written: Option<i64>,
) -> Result<(), DbError> {
    let contact = Value::Object(body.clone());
    if !body.contains_key("email_addresses") {
        let sql = format!(
            "update keap_sync.mirror m
                set contact = m.contact || $2, updated_at = null, read_at = now(), written_at = {}
              where contact_id = $1",
            stamp::sql("$3::bigint")
        );
        db.cached_execute(&sql, &[&id, &contact, &written]).await?;
        return Ok(());
    }
    let (emails, email1) = super::addresses(&contact);
    let sql = format!(
        "insert into keap_sync.mirror as m (contact_id, emails, email1, contact, written_at)
         values ($1, $2, $3, $4, {})
         on conflict (contact_id) do update
            set contact = m.contact || excluded.contact, emails = excluded.emails, email1 = excluded.email1,
                updated_at = null, read_at = now(), written_at = excluded.written_at",
        stamp::sql("$5::bigint")
    );
    db.cached_execute(&sql, &[&id, &emails, &email1, &contact, &written]).await?;
    Ok(())
}

/// Removes contact `id`, which Keap has just answered 404 for, from the mirror.
pub(crate) async fn forget(db: &Client, id: i64) -> Result<(), DbError> {
    db.execute("delete from keap_sync.mirror where contact_id = $1", &[&id]).await?;
    Ok(())
}
