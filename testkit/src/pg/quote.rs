//! Quoting: database names checked, conninfo values, URL percent-encoding, setting list items,
//! shell words, and a command described for messages.

use std::ffi::OsStr;
use std::fmt::Write as _;
use std::process::Command;

use super::{ClusterError, WATCHDOG_SCRIPT};

/// Accept `[a-z0-9_]{1,63}`: always valid once double-quoted, never needs
/// escaping, and within PostgreSQL's 63-byte identifier limit (longer names
/// would be truncated silently, not rejected).
pub(super) fn validate_database_name(name: &str) -> Result<(), ClusterError> {
    let reason = if name.is_empty() {
        Some("empty")
    } else if name.len() > 63 {
        Some("longer than 63 bytes")
    } else if !name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_') {
        Some("only lowercase ASCII letters, digits and '_' are allowed")
    } else {
        None
    };
    match reason {
        Some(reason) => Err(ClusterError::InvalidDatabaseName { name: name.to_owned(), reason }),
        None => Ok(()),
    }
}

/// Quote a libpq/tokio-postgres key=value value if it needs it.
pub(super) fn conninfo_value(value: &str) -> String {
    let plain = !value.is_empty() && !value.chars().any(|c| c.is_whitespace() || c == '\'' || c == '\\');
    if plain {
        return value.to_owned();
    }
    let mut quoted = String::with_capacity(value.len() + 2);
    quoted.push('\'');
    for c in value.chars() {
        if c == '\'' || c == '\\' {
            quoted.push('\\');
        }
        quoted.push(c);
    }
    quoted.push('\'');
    quoted
}

/// Percent-encode everything but RFC 3986 unreserved characters.
pub(super) fn percent_encode(value: &str) -> String {
    let mut encoded = String::with_capacity(value.len() * 3);
    for byte in value.bytes() {
        if byte.is_ascii_alphanumeric() || matches!(byte, b'-' | b'.' | b'_' | b'~') {
            encoded.push(char::from(byte));
        } else {
            // Writing to a String cannot fail.
            let _ = write!(encoded, "%{byte:02X}");
        }
    }
    encoded
}

/// Double-quote one element of a comma-separated GUC list such as
/// `unix_socket_directories`, so commas or spaces in a path are harmless.
pub(super) fn quote_guc_list_item(value: &str) -> String {
    format!("\"{}\"", value.replace('"', "\"\""))
}

/// Single-quote for `sh` (only needed for the `su -c` fallback).
pub(super) fn shell_quote(value: &OsStr) -> String {
    format!("'{}'", value.to_string_lossy().replace('\'', r"'\''"))
}

/// A command line for error messages, without the (long) watchdog script.
pub(super) fn describe(command: &Command) -> String {
    let mut line = command.get_program().to_string_lossy().into_owned();
    for arg in command.get_args() {
        line.push(' ');
        // Also inside the single `su -c` argument.
        line.push_str(&arg.to_string_lossy().replace(WATCHDOG_SCRIPT, "<watchdog script>"));
    }
    line
}
