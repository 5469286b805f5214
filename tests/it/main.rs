//! keap-sync's integration tests: one binary (so the crate is linked once), one throwaway
//! PostgreSQL cluster per run (started on first use by the test kit), a fresh database and a
//! fresh fake Keap per test, and the real daemon — in-process, or as a child process where a
//! test must SIGKILL it.
//!
//! Each module is an area; run one with `cargo test --test it sync::` (or any name filter).
//! Tests never sleep to synchronise: they wait for a condition with a deadline.

mod architecture;
mod backlog;
mod capture;
mod cli;
mod contacts;
mod database;
mod faults;
mod limits;
mod mapping;
mod ops;
mod pg_restart;
mod refusals;
mod sync;
mod tokens;
mod transport;
