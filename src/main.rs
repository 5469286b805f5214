//! The `keap-sync` binary: everything lives in the library; see `keap_sync::cli`.
#![forbid(unsafe_code)]

fn main() -> std::process::ExitCode {
    keap_sync::cli::main()
}
