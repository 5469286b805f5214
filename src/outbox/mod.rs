//! The outbox: claiming pending user changes and recording what became of them.
//!
//! Every function here is a single SQL statement, so each is atomic on its own and none holds
//! a transaction open across a Keap call (ARCHITECTURE.md, invariant 3): [`claim`](fn@claim) commits its lease
//! before the caller does any HTTP, and the result functions check `leased_by` so a daemon
//! whose lease expired (it was paused, partitioned, or assumed dead) cannot overwrite the work
//! of whoever claimed the row after it.
//!
//! A delivery records its steps (the create about to be sent, the link, the success) through
//! [`recorder`], which puts the ones that arrive together in one statement
//! ([`begin_create_many`], [`link_many`], [`complete`](fn@complete)).
//!
//! A row's `version` is bumped by the trigger on every change. A result is final only if the
//! version is still the one claimed; otherwise the row is released and stays queued, and the
//! next delivery reads the newer state (invariant 2).
//!
//! The files: the claim ([`mod@claim`]) and the lease's end ([`lease`]), the fold of the change
//! log ([`mod@fold`]), the user rows read ([`users`]), the results recorded ([`mod@complete`],
//! [`mod@link`], [`create`], [`failure`], tried again by [`retry`]) and the read-only views of
//! the queue ([`queue`]).

use serde_json::Value;

/// How long a statement recording several deliveries' steps waits for an outbox row: 1 ms,
/// set for the statement alone (`set_config(…, true)` in its first CTE, read before any row is
/// taken). Waiting for a row an application's transaction held, while holding the batch's other
/// rows, formed a cycle with a multi-row key change or a TRUNCATE, and PostgreSQL could end it
/// by aborting the application's transaction (after `deadlock_timeout`, 1 s by default). Now
/// the batch gives up long before: nothing is recorded, and the recorder records each step
/// alone (`outbox::recorder`), where waiting for one row holds no other. (Locking the rows up
/// front `for update nowait` did the same at the price of a second write of every row: 0.02 ms
/// more Postgres CPU per delivery in `cargo bench --bench perf`.)
macro_rules! batch_wait {
    () => {
        "cross join (select pg_catalog.set_config('lock_timeout', '1ms', true)) w"
    };
}

mod claim;
mod complete;
mod create;
mod failure;
mod fold;
mod lease;
mod link;
mod queue;
pub(crate) mod recorder;
mod retry;
mod users;

pub(crate) use claim::{claim, next_due_in, ClaimTiming};
pub(crate) use complete::{complete, Completion, Done};
pub(crate) use create::{begin_create, begin_create_many, settle_create, CreateSlot, CreateStart};
pub(crate) use failure::{park, requeue_refused, retry_later, FailureRecord};
pub(crate) use fold::{fold, FOLD_BATCH};
pub(crate) use lease::{orphans, release, release_all, release_instances, Orphan};
pub(crate) use link::{gone_ctes, link, link_many, mapping_if_unchanged, record_gone, LinkTo, Linked};
pub(crate) use queue::{mappings, pending, Mapping};
pub(crate) use retry::{with_retries, with_retries_after};
pub(crate) use users::{read_users, user_keys, ReadUser, UserRow};

/// A claimed outbox row, joined with what we know of its Keap contact.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Claim {
    pub(crate) user_key: String,
    pub(crate) version: i64,
    /// Including this one.
    pub(crate) attempts: i32,
    pub(crate) contact_id: Option<i64>,
    pub(crate) fingerprint: Option<String>,
    /// What Keap holds of the properties we own (`contact_map.sent`); `None` if unknown.
    pub(crate) sent: Option<Value>,
    /// The body of an earlier create whose outcome is unknown (invariant 14).
    pub(crate) create_sent: Option<Value>,
}

impl Claim {
    /// The claim as the recording statements read it (key, version and attempts; not the
    /// contact's values, which would only be copied), for a step handed to `recorder`.
    pub(crate) fn bare(&self) -> Claim {
        Claim {
            user_key: self.user_key.clone(),
            version: self.version,
            attempts: self.attempts,
            contact_id: None,
            fingerprint: None,
            sent: None,
            create_sent: None,
        }
    }
}
