//! The demo: keap-sync's whole pipeline on a throwaway PostgreSQL and the fake Keap, on a fresh
//! machine, with no account and nothing else touched. The narration is in the test kit
//! (`keap_sync_testkit::demo`), where a test runs it too.
//!
//! ```sh
//! cargo run --release --example demo                    # narrates, then cleans up
//! cargo run --release --example demo -- --keep-running  # stays up for psql until Ctrl-C
//! ```

#![allow(
    clippy::disallowed_methods,
    reason = "tests, benches and the demo own the servers and daemons they spawn, which end with them"
)]
use std::process::ExitCode;

#[tokio::main]
async fn main() -> ExitCode {
    let keep_running = std::env::args().skip(1).any(|a| a == "--keep-running");
    keap_sync_testkit::install_crypto_provider();
    match keap_sync_testkit::demo::run(&mut std::io::stdout(), keep_running).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}
