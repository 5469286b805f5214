//! Checks of single values the sections share: durations and counts that must be positive, and
//! identifiers named in the file.

use std::time::Duration;

use super::ConfigError;

/// Identifiers are later checked against the catalog and always quoted (a double quote inside
/// one is doubled, as SQL spells it); this early check only turns an obviously broken value
/// into an error that names the key. 63 bytes is PostgreSQL's limit for a name.
pub(super) fn validate_identifier(key: &str, value: &str, qualified: bool) -> Result<(), ConfigError> {
    let parts: Vec<&str> = if qualified { value.split('.').collect() } else { vec![value] };
    let ok = !parts.is_empty()
        && parts.len() <= 2
        && parts.iter().all(|p| !p.is_empty() && p.len() <= 63 && !p.contains('\0'));
    if ok {
        Ok(())
    } else {
        Err(ConfigError::Invalid(format!(
            "{key} = {value:?} is not a valid {}: use 1 to 63 bytes, no NUL character{}",
            if qualified { "table name" } else { "column name" },
            if qualified { ", optionally as schema.table" } else { "" }
        )))
    }
}

/// `value` seconds as a duration; zero is refused, naming `key`.
pub(super) fn secs(key: &str, value: u64) -> Result<Duration, ConfigError> {
    positive(key, value).map(Duration::from_secs)
}

/// `value` milliseconds as a duration; zero is refused, naming `key`.
pub(super) fn millis(key: &str, value: u64) -> Result<Duration, ConfigError> {
    positive(key, value).map(Duration::from_millis)
}

/// Refuses zero.
pub(super) fn positive<T: PartialEq + Default>(key: &str, value: T) -> Result<T, ConfigError> {
    if value == T::default() {
        return Err(ConfigError::Invalid(format!("{key} must be at least 1")));
    }
    Ok(value)
}
