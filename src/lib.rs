//! # keap-sync
//!
//! Keeps Keap (formerly Infusionsoft) contacts in step with an application's Postgres `users`
//! table, without changes to the application.
//!
//! ```text
//!  app writes users ──trigger, same txn──▶ keap_sync.outbox (one row per user, version++)
//!                                    └──▶ pg_notify('keap_sync')          (a wake-up only)
//!
//!  daemon: LISTEN + poll ─▶ claim (SKIP LOCKED, lease, commit) ─▶ read the user's CURRENT row
//!          ─▶ map to a contact ─▶ rate limiter ─▶ Keap REST v1 (upsert by email / PATCH by id)
//!          ─▶ record: contact map + fingerprint │ retry schedule │ parked failure   (one statement)
//! ```
//!
//! Capture is durable because the trigger writes the outbox in the application's own
//! transaction; delivery is exactly-one-contact because an unmapped user is upserted by email
//! and a mapped one is patched by id; a burst of updates costs one call because the outbox
//! holds state (a version counter), not events, and the daemon sends the row as it is *now*.
//! The invariants are spelled out in `DESIGN.md` terms in each module's docs.
//!
//! ## Modules, by domain
//! - [`config`] — the TOML file and environment overrides; [`secret`] keeps credentials out of output.
//! - [`schema`] — migrations in `sql/`, the capture trigger, catalog checks.
//! - [`outbox`] — claim with a lease, record results; every function one atomic statement.
//! - [`daemon`] — the run loop: LISTEN, poll, dispatch, reconnect, standby, graceful stop.
//! - [`backfill`] — enqueue the users that existed before install, resumably, lowest priority.
//! - [`deliver`] — one change: decide, call Keap at most once, classify the result.
//! - [`failures`] — parked changes: list and replay; [`status`] — depth, lag, token, instances.
//! - [`mapping`] — user row → contact payload and its fingerprint.
//! - [`keap`] — the REST client, wire types, and the fake Keap server used by tests and the demo.
//! - [`token`] — API key or OAuth grant: refresh under a row lock, re-authorisation state.
//! - [`ratelimit`] — one limiter per credential (per second, minute, day).
//! - [`metrics`] — Prometheus counters and the optional loopback `/metrics` + `/healthz` listener.
//! - [`db`] — connections (TLS), LISTEN, identifier quoting.
//! - [`pgcluster`] — a throwaway Postgres cluster for tests, benchmarks and [`demo`].
//! - [`systemd`] — readiness, watchdog and status notifications; journal log format.
//! - [`cli`] — the `keap-sync` command line; `main.rs` only calls it.

#![forbid(unsafe_code)]

pub mod backfill;
pub mod cli;
pub mod config;
pub mod daemon;
pub mod db;
pub mod deliver;
pub mod demo;
pub mod failures;
pub mod keap;
pub mod mapping;
pub mod metrics;
pub mod outbox;
pub mod pgcluster;
pub mod ratelimit;
pub mod schema;
pub mod secret;
pub mod status;
pub mod systemd;
pub mod token;

/// Selects rustls' crypto provider (ring) for the whole process. reqwest and tokio-postgres
/// both use rustls without a built-in provider choice; calling this more than once is harmless.
pub fn install_crypto_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}
