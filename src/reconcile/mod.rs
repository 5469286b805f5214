//! `keap-sync reconcile`: Keap as it is, against the table. The mirror is brought up to date
//! (a full v2 listing, [`crate::mirror`]), then every user is classified ([`classify`]) from
//! its row, its mapping and the mirror: in sync, an owned property that differs in Keap, a
//! mapped contact gone, no contact yet, parked, or two contacts with its address. The report
//! changes nothing but the mirror: no Keap write, no change to the users table, the outbox or
//! the contact map. `--apply` queues each repairable user for delivery, having made its next
//! delivery rewrite what keap-sync owns (its record of what Keap holds is cleared). Nothing is
//! unlinked on the mirror's word (invariant 20): a contact the listing no longer saw is
//! confirmed gone by Keap's 404 to that delivery, which then links the user again by email;
//! delivery never makes a duplicate (invariant 4) and sends only owned properties (invariant 12).
//!
//! The report streams: each user not in sync is handed to a [`ReportSink`] as its batch is
//! compared, and the [`Report`] keeps counts only, so memory holds one batch of users whatever
//! the number of users or of drifts (`scan`). The daemon runs the same report on a schedule
//! ([`scheduled`], `[mirror] reconcile_hours`), counting only.

mod classify;
mod scan;

use std::collections::BTreeMap;
use std::time::Duration;

use serde::Serialize;
use tokio_postgres::Client;

use crate::access::{AccessError, KeapAccess};
use crate::config::{Config, ConfigError};
use crate::db::{self, DbError};
use crate::mapping::Mapper;
use crate::mirror::{self, MirrorError};
use crate::ratelimit::Reserving;
use crate::schema::{self, SchemaError, UserTable};

pub use crate::mirror::Listing;
pub use classify::Class;

/// Why reconcile could not run. Its own variants rather than the daemon's `RunError`, so that
/// the daemon may run the report (a module of its layer uses another only without a cycle).
#[derive(Debug, thiserror::Error)]
pub enum ReconcileError {
    /// The configuration is incomplete or invalid.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// Schema `keap_sync` is missing or outdated, or the users table does not match the config.
    #[error(transparent)]
    Schema(#[from] SchemaError),
    /// The database could not be reached or answered with an error.
    #[error(transparent)]
    Db(#[from] DbError),
    /// Keap's client could not be set up (TLS).
    #[error("{0}")]
    Setup(String),
    /// Keap's listing failed; what was stored stays, and the next run resumes the listing.
    #[error("{0}")]
    Mirror(String),
}

impl From<MirrorError> for ReconcileError {
    fn from(e: MirrorError) -> Self {
        match e {
            MirrorError::Db(e) => ReconcileError::Db(e),
            other => ReconcileError::Mirror(other.to_string()),
        }
    }
}

impl From<AccessError> for ReconcileError {
    fn from(e: AccessError) -> Self {
        match e {
            AccessError::Config(e) => ReconcileError::Config(e),
            AccessError::Setup(message) => ReconcileError::Setup(message),
        }
    }
}

/// One user that is not in sync.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Drift {
    /// The user key.
    pub user: String,
    /// How it stands.
    pub class: Class,
    /// The contact it is linked to, if any.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub contact_id: Option<i64>,
    /// What differs: owned property paths, `tag <id>`, or the contacts sharing the address.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub differs: Vec<String>,
    /// With `show_values` only: each differing property's value in the table and in Keap.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub values: Vec<Difference>,
}

/// One owned property that differs, with both values (personal data: shown only when asked).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Difference {
    /// The property path, as `preview` names it (`given_name`, `phone_numbers.PHONE1.number`).
    pub path: String,
    /// The value the table gives it.
    pub table: serde_json::Value,
    /// The value Keap holds.
    pub keap: serde_json::Value,
}

/// What `reconcile` does besides reporting.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ReconcileOptions {
    /// Queue each repairable user for delivery.
    pub apply: bool,
    /// Put each differing property's values in the report (personal data).
    pub show_values: bool,
}

/// What a reconcile found (and, with `apply`, queued), in counts: the users not in sync went
/// to the [`ReportSink`] one by one.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Report {
    /// The listing that refreshed the mirror.
    pub listing: Listing,
    /// Users compared.
    pub users: u64,
    /// Users in sync.
    pub in_sync: u64,
    /// Users not in sync, by class (a class no user stood in is absent).
    pub counts: BTreeMap<Class, u64>,
    /// Users queued for delivery by `--apply`.
    pub queued: u64,
}

impl Report {
    /// Users not in sync.
    pub fn drifted(&self) -> u64 {
        self.counts.values().sum()
    }

    /// Users not in sync that `--apply` cannot repair (they need a person).
    pub fn need_a_person(&self) -> u64 {
        self.counts.iter().filter(|(class, _)| !class.repairable()).map(|(_, n)| n).sum()
    }
}

/// Where a reconcile hands what it finds, as it finds it: the listing once, then each user not
/// in sync, in key order. A closure taking a [`Drift`] is one (it does not see the listing).
pub trait ReportSink {
    /// The mirror is up to date; called once, before any drift.
    fn listed(&mut self, listing: &Listing) {
        let _ = listing;
    }

    /// One user not in sync.
    fn drift(&mut self, drift: Drift);
}

impl<F: FnMut(Drift)> ReportSink for F {
    fn drift(&mut self, drift: Drift) {
        self(drift)
    }
}

/// Lists every Keap contact into the mirror (resuming a listing stopped half-way), counting
/// the calls against the day like deliveries. Changes nothing in Keap or the users table.
pub async fn refresh_mirror(config: &Config) -> Result<Listing, ReconcileError> {
    let (client, pg) = connect(config).await?;
    list(config, &client, &pg).await
}

/// `keap-sync reconcile [KEYS…] [--apply]`: refreshes the mirror, then classifies `keys` (all
/// users when empty), handing each user not in sync to `sink` as it is found; with `apply`,
/// queues the repairable ones for delivery. A whole-table run records its counts for `status`.
pub async fn reconcile<S: ReportSink + ?Sized>(
    config: &Config,
    keys: &[String],
    options: ReconcileOptions,
    sink: &mut S,
) -> Result<Report, ReconcileError> {
    let (client, pg) = connect(config).await?;
    let table = UserTable::resolve(&client, &config.users).await?;
    let mut report = Report { listing: list(config, &client, &pg).await?, ..Report::default() };
    sink.listed(&report.listing);
    let mapper = Mapper::new(&config.users);
    scan::walk(&client, &table, &mapper, keys, options, &mut report, sink).await?;
    if keys.is_empty() {
        scan::record_counts(&client, &report).await?;
    }
    Ok(report)
}

/// The daemon's scheduled report (`[mirror] reconcile_hours`): the whole table, as
/// `keap-sync reconcile` without `--apply` runs it, its counts recorded for `status` and
/// `/metrics`; the users not in sync are counted, not kept. Calls Keap through `keap`, so the
/// daemon's limiter and reserved day's calls count them.
///
/// It starts with a full listing, not the mirror as the sweep keeps it: the sweep lists what
/// Keap *changed*, and a contact deleted or merged away in Keap is a change no listing by
/// update time shows, so it would stay in a swept mirror and its user be counted in sync (or
/// as differing from a contact that is gone) — the drift a person is least likely to notice,
/// and the one a scheduled report is for. Only a completed full listing removes what it did
/// not see (from the mirror alone, invariant 20), and the sweep may be off altogether. The
/// cost is one call per 1,000 contacts a run (1,000 for a million contacts: under 1 % of an
/// OAuth app's 150,000 calls a day, 3.3 % of an API key's 30,000, at one run a day), and a
/// listing cut short resumes at the next run.
pub(crate) async fn scheduled(
    db: &Client,
    keap: &mirror::Keap<'_>,
    mapper: &Mapper,
    table: &UserTable,
) -> Result<Report, MirrorError> {
    let mut report = Report { listing: mirror::list_all(db, keap, mapper).await?, ..Report::default() };
    let mut counted_only = |_: Drift| {};
    scan::walk(db, table, mapper, &[], ReconcileOptions::default(), &mut report, &mut counted_only).await?;
    scan::record_counts(db, &report).await?;
    Ok(report)
}

/// How long ago the last whole-table reconcile (the daemon's or the command's) recorded its
/// counts; `None`: never.
pub(crate) async fn since_recorded(db: &Client) -> Result<Option<Duration>, DbError> {
    let secs: Option<f64> = db
        .query_one(
            "select extract(epoch from now() - reconciled_at)::float8 from keap_sync.mirror_state",
            &[],
        )
        .await?
        .get(0);
    Ok(secs.map(|s| Duration::from_secs_f64(s.max(0.0))))
}

/// A connection at this binary's schema version, and the settings it was made from (the
/// listing's reservations open connections of their own).
async fn connect(config: &Config) -> Result<(Client, db::Target), ReconcileError> {
    let pg = db::parse(config.database()?)?;
    let client = db::connect(&pg).await?;
    schema::ensure_current(&client).await?;
    Ok((client, pg))
}

/// The full listing, with the day's calls reserved like the daemon's and the rest given back.
async fn list(config: &Config, client: &Client, pg: &db::Target) -> Result<Listing, ReconcileError> {
    let access = KeapAccess::build(config, pg)?;
    let reserving = Reserving::start(&access.limiter, pg);
    let mapper = Mapper::new(&config.users);
    let keap = mirror::Keap {
        client: &access.keap,
        tokens: &access.tokens,
        timeout: config.keap.request_timeout,
        retries: mirror::RETRIES,
    };
    let listed = mirror::list_all(client, &keap, &mapper).await;
    drop(reserving);
    access.limiter.give_back(client).await;
    Ok(listed?)
}
