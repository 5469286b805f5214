//! Test kit for keap-sync: everything the tests, benchmarks and demo need that the product must
//! not contain.
//!
//! - [`pg`] — a throwaway PostgreSQL cluster started with the system's `initdb`/`postgres`
//!   (as root too), private to the process and removed when it ends; optionally also on
//!   loopback TCP with TLS, its certificate signed by a throwaway CA.
//! - [`fake`] — a fake Keap server over real HTTP on loopback, with its own wire types (an
//!   independent witness of the daemon's client), playing the strictest reading of Keap's API.
//! - [`bench`](mod@bench) — what the benchmarks share: `/proc` CPU and memory readings, the daemon as a
//!   child process, `pg_stat_statements`, the capture-cost measurement.
//! - [`app`] — the `spawn_app()` harness: a fresh database, the fake, and the real daemon,
//!   in-process or as a child process, plus waiting helpers that never sleep blindly.
//!
//! keap-sync depends on this crate as a dev-dependency only: `cargo tree -e normal -p
//! keap-sync` lists none of it, and the release binary holds no fake and no cluster code.

#![forbid(unsafe_code)]
#![allow(
    clippy::disallowed_methods,
    reason = "the fake's servers and the harness own the tasks they spawn; waits are on conditions (app::eventually)"
)]

pub mod app;
pub mod bench;
pub mod demo;
pub mod fake;
pub mod pg;

/// Selects rustls' crypto provider (ring) for HTTP clients the tests build themselves; calling
/// it more than once is harmless.
pub fn install_crypto_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}
