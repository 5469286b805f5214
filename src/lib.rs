//! # keap-sync
//!
//! Keeps Keap (formerly Infusionsoft) contacts in step with an application's Postgres `users`
//! table, without changes to the application.
//!
//! ```text
//!  app writes users ──trigger, same txn──▶ keap_sync.change (user_key, at; append only)
//!                                    └──▶ pg_notify('keap_sync')          (a wake-up only)
//!
//!  daemon: LISTEN ─▶ fold the log ─▶ keap_sync.outbox (one row per user, version++)
//!          poll ─▶ claim (SKIP LOCKED, lease, commit) ─▶ read the user's CURRENT row
//!          ─▶ map to a contact ─▶ rate limiter ─▶ Keap REST v1 (upsert by email / PATCH by id)
//!          ─▶ record: contact map + fingerprint │ retry schedule │ parked failure   (one statement)
//! ```
//!
//! Capture is durable because the trigger appends the changed keys to the change log in the
//! application's own transaction, and cheap because that is all it does (the daemon folds the
//! log into the outbox, one row per user, in the statement that empties it); delivery is exactly-one-contact because an unmapped user is upserted by email
//! and a mapped one is patched by id; a burst of updates costs one call because the outbox
//! holds state (a version counter), not events, and the daemon sends the row as it is *now*.
//! `ARCHITECTURE.md` at the top of the repository states the invariants this keeps; code that
//! relies on one cites it by number.
//!
//! ## Layers
//!
//! Each module uses only modules in the layers above it in this list, never one below (checked
//! by `tests/it/architecture.rs`):
//!
//! 1. `config`, `secret`, `tls`, `http` — the TOML file and environment; credentials that never
//!    print; the one TLS configuration of every connection (and one per `[database] ca_file`);
//!    the one HTTP/1 server loop behind `/metrics` and the hook receiver.
//! 2. `db` — connections (TLS, LISTEN), identifier quoting, the NOTIFY channel.
//! 3. `schema` — migrations in `sql/`, the capture triggers and the fold they feed, catalog checks.
//! 4. `outbox` — fold captured changes in, claim with a lease, record results; every function
//!    one atomic statement (`outbox::recorder` runs the steps of deliveries that arrive together
//!    in one).
//! 5. `mapping` (user row → the contact properties and tags we own, checked against Keap's
//!    rules; per-field fingerprints of what Keap holds), `keap` (REST client and wire types), `ratelimit`,
//!    `metrics`, `token` (API key or OAuth grant, refreshed under a row lock), `systemd`,
//!    `hooks` (the receiver of Keap's REST hooks: ids queued, never a Keap call).
//! 6. `access` — the Keap client, credential and limiter of a configuration, built once for
//!    whoever calls Keap; `mirror` — keap-sync's picture of Keap, listed page by page;
//!    `deliver` — one change: decide, make the fewest Keap calls (one write per net change,
//!    at most one tag apply and one tag remove), classify the result; `catalog` — Keap's
//!    custom field and tag names, resolved once and cached.
//! 7. `daemon` (the run loop and every task it owns), `backfill`, `failures`, `status`,
//!    `preview` (the dry run: the calls a sync would make, with no Keap write and no state change),
//!    `reconcile` (Keap as it is: the mirror brought up to date), `doctor` (every prerequisite
//!    checked, each with its fix), `init` (a first configuration proposed from the live table).
//! 8. [`cli`] — the command line; `main.rs` only calls [`cli::main`].
//!
//! Everything is private to the crate except the small embedding API below, which the
//! binary, the test kit (`testkit/`), the benchmarks and the demo use. The fake Keap server
//! and the throwaway Postgres cluster live in the test kit, never in this crate.
//!
//! ```no_run
//! # async fn demo() -> Result<(), keap_sync::RunError> {
//! let config = keap_sync::config::Config::load(None, &|name| std::env::var(name).ok())?;
//! let daemon = keap_sync::Daemon::build(config, keap_sync::RunOptions::default()).await?;
//! daemon.run(async { let _ = tokio::signal::ctrl_c().await; }).await
//! # }
//! ```

#![forbid(unsafe_code)]

pub mod cli;
pub mod config;

mod access;
mod backfill;
mod catalog;
mod daemon;
mod db;
mod deliver;
mod doctor;
mod failures;
mod hooks;
mod http;
mod init;
mod keap;
mod mapping;
mod metrics;
mod mirror;
mod outbox;
mod preview;
mod ratelimit;
mod reconcile;
mod schema;
mod secret;
mod status;
mod systemd;
mod tls;
mod token;

pub use backfill::BackfillMode;
pub use daemon::{enqueue_backfill, Daemon, RunError, RunOptions};
pub use db::DbError;
pub use preview::{dry_run, preview, Call, Plan, PreviewError, Selection};
pub use reconcile::{
    reconcile, refresh_mirror, Class, Difference, Drift, Listing, ReconcileError, ReconcileOptions, Report,
    ReportSink,
};
pub use schema::{migrate, migrate_reporting, uninstall, MigrateReport, SchemaError};
pub use secret::Secret;
pub use token::{import_grant, ImportError, TokenError};
