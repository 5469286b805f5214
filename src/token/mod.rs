//! Keap credentials: an API key as it is, or an OAuth grant kept alive in Postgres.
//!
//! The OAuth pair lives in `keap_sync.oauth_token` (one row). Keap's refresh tokens are
//! single-use: spending one returns a new pair and kills the old refresh token. Two daemons
//! refreshing at once would therefore lose the grant, so a refresh runs inside a transaction
//! holding the row lock (`select … for update`) and commits the new pair before anyone uses it.
//! A second process that was waiting on the lock then reads the fresh pair and does not refresh
//! again (ARCHITECTURE.md, invariant 7). This is the one place where a transaction is held across an HTTP
//! call, on purpose, on its own short-lived connection.
//!
//! A refresh that Keap rejects for good (`invalid_grant`, bad client credentials) marks the
//! row `reauthorization_needed`; callers pause and poll the row until `keap-sync auth import`
//! or `auth login` stores a new grant.
//!
//! # Where concurrency lives
//!
//! - **The token row's lock** (`select … for update`, on a connection of the refresh's own)
//!   serialises refreshes across processes: the second one finds the new pair and spends nothing.
//! - **An async `Mutex` in-process** (`OAuth::refreshing`) queues this process's callers before
//!   they open a connection, so N deliveries that find the token stale make one refresh, not N
//!   waiters on the row lock. Async because its guard is held across the token request.
//! - **A [`TaskTracker`](tokio_util::task::TaskTracker) owned by the token source**
//!   (`OAuth::tasks`) runs the refresh itself. Once a caller holds the mutex, the guard moves
//!   into a task of that tracker, and the caller only awaits the task's result: dropping or
//!   aborting the caller (a delivery ended by shutdown or by a lost database session)
//!   detaches from the task instead of cancelling it, so
//!   a refresh that may already have spent the single-use refresh token always stores the pair
//!   Keap answered with (ARCHITECTURE.md, invariant 16). A caller dropped while still queued on
//!   the mutex has sent nothing. The daemon waits for the tracker ([`TokenSource::settle`],
//!   bounded by the token request timeout) before it returns, so a stop never cuts a refresh
//!   between Keap's answer and the commit. A tracker rather than a bare `tokio::spawn`
//!   because the task must be owned: someone waits for it before the process exits.
//!
//! The files: [`TokenSource`] and its in-process queue (`source`), the refresh and the
//! classification of Keap's answer (`refresh`), the token row (`store`) and new grants
//! (`import`).

use std::time::Duration;

use crate::db::DbError;

mod import;
mod refresh;
mod source;
mod store;

pub use import::import_grant;
pub(crate) use import::{import, parse_token_response, Imported};
pub(crate) use source::TokenSource;

/// Why no usable credential is at hand.
#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    /// A person must act (import/login a new grant, fix the API key); retrying will not help.
    #[error("{0}")]
    NeedsAuthorization(String),
    /// The token endpoint or the network failed; try again later.
    #[error("token refresh failed, will retry: {0}")]
    Transient(String),
    /// A token response (from `auth import` or the code exchange) that cannot be stored.
    #[error("{0}")]
    InvalidResponse(String),
    /// The token store could not be read or written.
    #[error(transparent)]
    Db(#[from] DbError),
}

/// Why a new grant (`auth import`, `auth login`, [`import_grant`]) was not stored.
#[derive(Debug, thiserror::Error)]
pub enum ImportError {
    /// The token response is unusable, or the token store failed.
    #[error(transparent)]
    Token(#[from] TokenError),
    /// A new grant is for another Keap app than the stored one; nothing was stored. Contact
    /// ids are per app, so the contact map would point at unrelated contacts.
    #[error(
        "this grant is for Keap app {offered}, but the stored grant is for {stored}{}; nothing was stored. \
         If you signed in to the wrong app, run `keap-sync auth login` again and choose {stored}. \
         To move the sync to {offered} instead, stop the daemon and repeat the command with --switch-account: \
         keap-sync then forgets its links to contacts in {stored} (which stay there untouched), and \
         `keap-sync backfill --restart` sends every user to {offered}, matched by email",
        match linked {
            0 => String::new(),
            1 => ", and the contact map links 1 user to a contact there".into(),
            n => format!(", and the contact map links {n} users to contacts there"),
        }
    )]
    OtherApp {
        /// The app of the stored grant.
        stored: String,
        /// The app the new grant is for.
        offered: String,
        /// Users the contact map links to contacts in `stored`.
        linked: i64,
    },
    /// `--switch-account` while a daemon delivers: nothing was stored.
    #[error(
        "a keap-sync daemon is delivering right now, with contact ids of {from}; switching to {to} under it \
         could write to unrelated contacts there. Stop every keap-sync daemon (e.g. `systemctl stop keap-sync`), \
         repeat the command with --switch-account, then start it again; nothing was stored"
    )]
    SwitchWhileDelivering {
        /// The app switched from, as words (it may be unknown).
        from: String,
        /// The app switched to, as words.
        to: String,
    },
}

impl From<tokio_postgres::Error> for ImportError {
    fn from(e: tokio_postgres::Error) -> Self {
        ImportError::Token(e.into())
    }
}

impl From<tokio_postgres::Error> for TokenError {
    fn from(e: tokio_postgres::Error) -> Self {
        TokenError::Db(DbError::Query(e))
    }
}

/// The command that fixes a lost grant; every message about one ends with it.
pub(crate) const REAUTHORIZE_HINT: &str =
    "re-authorise with `keap-sync auth login`, or pipe a token response into `keap-sync auth import`";

/// Tuning of the OAuth lifecycle.
#[derive(Debug, Clone, Copy)]
pub(crate) struct TokenPolicy {
    /// Refresh when the access token expires within this margin.
    pub refresh_margin: Duration,
    /// Refresh a grant whose refresh token is older than this even if idle, so the 45-day
    /// refresh token never lapses.
    pub max_refresh_token_age: Duration,
}

impl TokenPolicy {
    /// The refresh margin and maximum refresh-token age `[keap]` sets.
    pub(crate) fn from_config(keap: &crate::config::KeapConfig) -> TokenPolicy {
        TokenPolicy { refresh_margin: keap.refresh_margin, max_refresh_token_age: keap.refresh_token_max_age }
    }
}

/// Whether the stored grant can be used, as `keap_sync.oauth_token.state` records it (the column
/// keeps the text).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub(crate) enum GrantState {
    /// Usable; refreshed by the daemon as needed.
    Ok,
    /// Keap refused a refresh for good: a person must run `auth login` or `auth import`.
    ReauthorizationNeeded,
}

impl GrantState {
    /// The state `keap_sync.oauth_token.state` holds; any other text is an error naming the column.
    pub(crate) fn from_db(text: &str) -> Result<Self, DbError> {
        match text {
            "ok" => Ok(GrantState::Ok),
            "reauthorization_needed" => Ok(GrantState::ReauthorizationNeeded),
            other => Err(DbError::unknown_value("keap_sync.oauth_token.state", other)),
        }
    }
}

#[cfg(test)]
mod tests;
