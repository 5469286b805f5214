//! Bookkeeping statements tried again after a failure of the moment (a deadlock, a lock
//! timeout), never after a lost connection.

use std::time::Duration;

use tokio_postgres::error::SqlState;

use crate::db::DbError;

/// How many times [`with_retries`] runs a statement that failed without losing the connection.
const RECORD_ATTEMPTS: u32 = 4;

/// Runs one bookkeeping statement of a delivery (`what`, for `user_key`) and runs it again when
/// it failed for a reason that is the moment's, not the connection's: a deadlock (with the
/// key-change trigger, say) or a serialization failure at once, a lock or statement timeout (a
/// row an app transaction holds) or any other statement error after a short backoff, at most
/// [`RECORD_ATTEMPTS`] times in all. A lost connection is returned at once: that is the
/// session's to handle. Every statement here is safe to repeat (it is one statement, rolled
/// back if it failed, and checks the claim), and the result of a Keap call already made is
/// worth a few tries, since giving up means the change is delivered again after its lease.
///
/// Between tries the shared connection serves the other deliveries, so one locked row costs
/// its own delivery, not everyone's (ARCHITECTURE.md, "Where concurrency lives").
pub(crate) async fn with_retries<T, F, Fut>(what: &str, user_key: &str, statement: F) -> Result<T, DbError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, DbError>>,
{
    retrying(what, user_key, 1, statement).await
}

/// [`with_retries`] for a statement whose first try was part of one that failed with `failed`
/// (a batch of steps, `recorder`): it waits as after a first failed try, then has the
/// tries left. After a failure that no try can mend (a lost connection), it runs once.
pub(crate) async fn with_retries_after<T, F, Fut>(
    failed: &DbError,
    what: &str,
    user_key: &str,
    statement: F,
) -> Result<T, DbError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, DbError>>,
{
    match retry_delay(failed, 1) {
        Some(delay) => {
            tokio::time::sleep(delay).await;
            retrying(what, user_key, 2, statement).await
        }
        None => retrying(what, user_key, RECORD_ATTEMPTS, statement).await,
    }
}

/// Runs `statement` from try `attempt` on, until it succeeds, or [`retry_delay`] says to give up.
async fn retrying<T, F, Fut>(
    what: &str,
    user_key: &str,
    mut attempt: u32,
    mut statement: F,
) -> Result<T, DbError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, DbError>>,
{
    loop {
        let error = match statement().await {
            Ok(value) => return Ok(value),
            Err(e) => e,
        };
        let Some(delay) = retry_delay(&error, attempt) else { return Err(error) };
        tracing::warn!(user = %user_key, statement = what, attempt, retry_in_ms = delay.as_millis() as u64, error = %error, detail = %error.server_message(), "a bookkeeping statement failed; trying it again");
        tokio::time::sleep(delay).await;
        attempt += 1;
    }
}

/// How long to wait before running again a statement that failed with `e` on try `attempt`
/// (1-based); `None`: give up.
fn retry_delay(e: &DbError, attempt: u32) -> Option<Duration> {
    if attempt >= RECORD_ATTEMPTS || e.is_connection_lost() {
        return None;
    }
    let DbError::Query(q) = e else {
        // A value this version does not know: trying again reads the same value.
        return None;
    };
    let code = q.code();
    if code == Some(&SqlState::T_R_DEADLOCK_DETECTED) || code == Some(&SqlState::T_R_SERIALIZATION_FAILURE) {
        // The other transaction has gone ahead: the next try finds no conflict.
        return Some(Duration::ZERO);
    }
    // Lock and statement timeouts (55P03, 57014) and the rest: 200 ms, 400 ms, 800 ms.
    Some(Duration::from_millis(200 << (attempt - 1).min(4)))
}
