//! The server's processes: its pid file read, waiting for a child to exit, signals, and the
//! tail of its log for error messages.

use std::fs;
use std::io;
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use super::POLL_INTERVAL;

/// The status word PostgreSQL ≥ 10 writes as the 8th line of `postmaster.pid`
/// (`starting`, `ready`, `stopping`, `standby`), space-padded.
pub(super) fn pid_file_status(contents: &str) -> Option<&str> {
    contents.lines().nth(7).map(str::trim)
}

/// Poll `child` until it exits or `timeout` passes: `None` if it is still
/// running, else how it ended (an error means it cannot be waited for, e.g.
/// already reaped, so there is nothing left to wait for either).
pub(super) fn wait_for_exit(child: &mut Child, timeout: Duration) -> Option<io::Result<ExitStatus>> {
    let deadline = Instant::now() + timeout;
    loop {
        match child.try_wait() {
            Ok(Some(status)) => return Some(Ok(status)),
            Err(error) => return Some(Err(error)),
            Ok(None) if Instant::now() >= deadline => return None,
            Ok(None) => std::thread::sleep(POLL_INTERVAL / 2),
        }
    }
}

/// Send `signal` to `pid` with the shell's `kill` builtin (no `unsafe` FFI).
pub(super) fn send_signal(pid: u32, signal: &str) {
    let result = Command::new("/bin/sh")
        .args(["-c", "kill -s \"$1\" \"$2\"", "sh", signal])
        .arg(pid.to_string())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
    if let Err(error) = result {
        tracing::warn!(%error, pid, signal, "cannot run kill");
    }
}

/// The last `lines` lines of a log file, or a note why there are none.
pub(super) fn log_tail(path: &Path, lines: usize) -> String {
    match fs::read(path) {
        Ok(bytes) => {
            let text = String::from_utf8_lossy(&bytes);
            let all: Vec<&str> = text.lines().collect();
            let tail = all[all.len().saturating_sub(lines)..].join("\n");
            if tail.trim().is_empty() {
                "(log is empty)".to_owned()
            } else {
                tail
            }
        }
        Err(error) => format!("(cannot read log: {error})"),
    }
}
