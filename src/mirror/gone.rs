//! Deletes and merges in Keap, seen by the mirror (issue 29, scope 5; design invariants 20, 21).
//!
//! A linked contact that a hook named but Keap's listing by id did not return (`hooked`), or
//! that a completed full listing did not see (`finish_listing`), may be gone in Keap, or the
//! listing may have missed it. The mirror's word alone unlinks nothing (invariant 20): such a
//! contact is queued in `keap_sync.gone_check` (`sql/0021_gone_check.sql`), and [`confirm`]
//! asks Keap for it by id (`GET /v1/contacts/{id}`, through the limiter and the day's quota).
//!
//! - Keap answers it: it stays linked; the check is dropped.
//! - Keap answers 404: in one statement, the user's mapping is removed, the event recorded
//!   (`keap_sync.contact_gone`, as delivery's 404 records it: `outbox::gone_ctes`), the mirror
//!   row removed, `[inbound] contact_gone_at` stamped with the time, and the user queued at
//!   backfill priority, so its next delivery links it again by email (a merged-away contact's
//!   address now on the surviving contact is linked, never duplicated; the rules of
//!   `deliver::plan` apply) or creates its contact. The users row is never deleted, and no
//!   other column of it is written (invariant 21).
//! - A user whose delivery holds a live lease is left to that delivery (its own call meets the
//!   404): its contact is not asked (at most one Keap call per contact in flight, across both
//!   directions, invariant 18), and the check stays queued for the next pass. The unlink checks
//!   the lease again, for a delivery claimed while Keap was being asked.
//! - Any other failure leaves the rest queued for the next pass.

use tokio::time::Instant;
use tokio_postgres::error::SqlState;
use tokio_postgres::Client;

use super::{Keap, MirrorError};
use crate::db::{self, DbError};
use crate::keap::{Auth, ErrorKind, KeapError};
use crate::outbox::gone_ctes;
use crate::schema::UserTable;

/// Contacts checked in one pass at most; the rest waits for the next pass.
const MAX_CHECKS: i64 = 100;

/// Queues the contacts of `$ids` (a `bigint[]` expression) that a user is linked to: the CTE
/// `suspects` of a statement of the mirror's.
pub(super) fn suspects(ids: &str) -> String {
    format!(
        "suspects as (
             insert into keap_sync.gone_check (contact_id)
             select m.contact_id from keap_sync.contact_map m where m.contact_id = any({ids})
             on conflict (contact_id) do nothing
             returning 1
         )"
    )
}

/// What one pass did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Confirmed {
    /// Contacts asked of Keap.
    pub(crate) calls: u64,
    /// Users unlinked: their contact is gone in Keap.
    pub(crate) unlinked: u64,
    /// Contacts Keap still answers (the listing missed them): left linked.
    pub(crate) kept: u64,
}

/// Asks Keap for each queued contact and unlinks the users of those it no longer has.
pub(crate) async fn confirm(
    db: &Client,
    keap: &Keap<'_>,
    table: &UserTable,
) -> Result<Confirmed, MirrorError> {
    let mut done = Confirmed::default();
    let rows = db
        .query(
            "select g.contact_id, m.user_key from keap_sync.gone_check g
               left join keap_sync.contact_map m on m.contact_id = g.contact_id
              where not exists (select from keap_sync.outbox o
                                 where o.user_key = m.user_key and o.leased_by is not null
                                   and o.lease_until > now())
              order by g.noticed_at, g.contact_id limit $1",
            &[&MAX_CHECKS],
        )
        .await
        .map_err(DbError::from)?;
    for row in rows {
        let (contact_id, user_key): (i64, Option<String>) = (row.get(0), row.get(1));
        let Some(user_key) = user_key else {
            // Unlinked meanwhile (a delivery met the 404 and linked the user again): nothing to ask.
            drop_check(db, contact_id).await?;
            continue;
        };
        done.calls += 1;
        if keap.exists(db, contact_id).await? {
            tracing::info!(contact = contact_id, user = %user_key, "a listing missed a linked contact; Keap still has it, so it stays linked");
            drop_check(db, contact_id).await?;
            done.kept += 1;
        } else if unlink(db, table, contact_id, &user_key).await? {
            tracing::info!(contact = contact_id, user = %user_key, "contact gone in Keap (deleted or merged away); unlinked, the user is queued to be linked again by email");
            done.unlinked += 1;
        }
    }
    if done.unlinked > 0 {
        db::wake_daemons(db).await?;
    }
    Ok(done)
}

/// Drops the check of `contact_id`.
async fn drop_check(db: &Client, contact_id: i64) -> Result<(), DbError> {
    db.execute("delete from keap_sync.gone_check where contact_id = $1", &[&contact_id]).await?;
    Ok(())
}

/// Unlinks `user_key` from `contact_id`, which Keap confirmed gone, in one statement (see the
/// module's text); false when nothing was unlinked (the mapping moved, or a delivery of the
/// user holds a live lease). A refused stamp column is logged with its grant, and the rest is
/// done without it: the stamp never holds the unlink up.
async fn unlink(db: &Client, table: &UserTable, contact_id: i64, user_key: &str) -> Result<bool, DbError> {
    let stamp = table.inbound.iter().find(|c| !c.data.from_mirror());
    let params: [&(dyn tokio_postgres::types::ToSql + Sync); 2] = [&contact_id, &user_key];
    match db.query_one(&unlink_sql(table, stamp.map(|c| c.quoted.as_str())), &params).await {
        Ok(row) => Ok(row.get(0)),
        Err(e) if e.code() == Some(&SqlState::INSUFFICIENT_PRIVILEGE) => {
            let column = stamp.map_or("", |c| c.quoted.as_str());
            tracing::error!(error = %e, table = %table.qualified, "cannot stamp {column} for a contact found gone; grant update ({column}) on the table to the daemon's role");
            Ok(db.query_one(&unlink_sql(table, None), &params).await?.get(0))
        }
        Err(e) => Err(e.into()),
    }
}

/// [`unlink`]'s statement (`$1` the contact, `$2` the user key), stamping column `stamp`
/// (quoted) when given; answers whether the user was unlinked.
fn unlink_sql(table: &UserTable, stamp: Option<&str>) -> String {
    let stamped = match stamp {
        Some(column) => format!(
            ", stamped as (
                 update {t} t set {column} = now() from unlinked u
                  where t.{key} {eq} u.user_key::{key_type}
                 returning 1
             )",
            t = table.qualified,
            key = table.key,
            eq = table.key_eq,
            key_type = table.key_type,
        ),
        None => String::new(),
    };
    format!(
        "with unlinked as (
             delete from keap_sync.contact_map m
              where m.contact_id = $1 and m.user_key = $2
                and not exists (select from keap_sync.outbox o
                                 where o.user_key = $2 and o.leased_by is not null and o.lease_until > now())
             returning m.user_key
         ), {gone}, queued as (
             insert into keap_sync.outbox (user_key, priority)
             select user_key, 2 from unlinked
             on conflict (user_key) do nothing
             returning 1
         ), checked as (
             delete from keap_sync.gone_check
              where contact_id = $1
                and (exists (select from unlinked)
                     or not exists (select from keap_sync.contact_map where contact_id = $1 and user_key = $2))
             returning 1
         ){stamped}
         select exists (select from unlinked)",
        gone = gone_ctes("exists (select from unlinked)"),
    )
}

impl Keap<'_> {
    /// Whether Keap still has contact `id` (`GET /v1/contacts/{id}`): false only for a 404.
    /// After a 401, the credential is refreshed once and the call made again.
    async fn exists(&self, db: &Client, id: i64) -> Result<bool, MirrorError> {
        let deadline = Instant::now() + self.timeout * 2;
        let auth = self.tokens.auth(db).await.map_err(MirrorError::Token)?;
        let answer = match self.client.get_contact(&auth, id, &[], deadline).await {
            Err(e) if e.kind == ErrorKind::Unauthorized => {
                let fresh: Auth = self.tokens.after_unauthorized(&auth).await.map_err(MirrorError::Token)?;
                self.client.get_contact(&fresh, id, &[], deadline).await
            }
            other => other,
        };
        match answer {
            Ok(_) => Ok(true),
            Err(KeapError { kind: ErrorKind::NotFound, .. }) => Ok(false),
            Err(e) => Err(MirrorError::Keap(e)),
        }
    }
}
