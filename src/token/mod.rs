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
//! - **A [`TaskTracker`] owned by the token source** (`OAuth::tasks`) runs the refresh itself.
//!   Once a caller holds the mutex, the guard moves into a task of that tracker, and the caller
//!   only awaits the task's result: dropping or aborting the caller (a delivery ended by
//!   shutdown or by a lost database session) detaches from the task instead of cancelling it, so
//!   a refresh that may already have spent the single-use refresh token always stores the pair
//!   Keap answered with (ARCHITECTURE.md, invariant 16). A caller dropped while still queued on
//!   the mutex has sent nothing. The daemon waits for the tracker ([`TokenSource::settle`],
//!   bounded by the token request timeout) before it returns, so a stop never cuts a refresh
//!   between Keap's answer and the commit. A tracker rather than a bare `tokio::spawn`
//!   because the task must be owned: someone waits for it before the process exits.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Mutex;
use tokio_postgres::{Client, Config as PgConfig};
use tokio_util::task::TaskTracker;

use crate::config::Credential;
use crate::db::{self, DbError};
use crate::keap::model::{ErrorBody, TokenResponse};
use crate::keap::Auth;
use crate::secret::Secret;

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
    pub(crate) fn from_db(text: &str) -> Result<Self, DbError> {
        match text {
            "ok" => Ok(GrantState::Ok),
            "reauthorization_needed" => Ok(GrantState::ReauthorizationNeeded),
            other => Err(DbError::unknown_value("keap_sync.oauth_token.state", other)),
        }
    }
}

/// A stored OAuth grant, as read from the token table.
struct Stored {
    access_token: Secret,
    refresh_token: Secret,
    /// Seconds until the access token expires (negative: expired).
    expires_in: f64,
    /// Seconds since the refresh token was issued.
    refresh_age: f64,
    state: GrantState,
    state_detail: Option<String>,
    /// The Keap app the grant is for, if known.
    account: Option<String>,
}

/// Reads the grant as [`Stored`] (columns in `stored_from`'s order).
const SELECT_STORED: &str = "select access_token, refresh_token,
        extract(epoch from expires_at - now())::float8,
        extract(epoch from now() - refresh_token_issued_at)::float8,
        state, state_detail, account
   from keap_sync.oauth_token where id = 1";

/// Supplies the credential for each Keap call. Shared as `Arc<TokenSource>` by every delivery
/// task and the daemon's idle check; the locks inside say what they guard.
pub(crate) struct TokenSource {
    inner: Inner,
}

enum Inner {
    /// The key, and when Keap last refused it (a person must fix it; we retry rarely). A std
    /// `Mutex`: set by the delivery that got the 401, read by the loop's pause check, each in a
    /// few instructions and never across an await.
    ApiKey(Secret, std::sync::Mutex<Option<tokio::time::Instant>>),
    /// In an `Arc` so a refresh task can own it (see "Where concurrency lives" above).
    OAuth(Arc<OAuth>),
}

/// After Keap refuses an API key, deliveries pause this long before one more try: nothing
/// but a person can fix the key, and every refused call still counts against the quota.
pub(crate) const API_KEY_RETRY: Duration = Duration::from_secs(60);

struct OAuth {
    client_id: String,
    client_secret: Secret,
    token_url: String,
    http: reqwest::Client,
    pg: PgConfig,
    policy: TokenPolicy,
    /// Serialises refreshes inside this process, so concurrent deliveries that all find the
    /// token stale queue here and then find the fresh pair, instead of each opening a
    /// connection to wait on the row lock (which serialises across processes). An async
    /// `Mutex` because it is held across the token request; in an `Arc` so its guard can move
    /// into the refresh task.
    refreshing: Arc<Mutex<()>>,
    /// The refresh in flight (at most one: it holds `refreshing`), owned here so it outlives
    /// the caller that started it and [`TokenSource::settle`] can wait for it.
    tasks: TaskTracker,
    metrics: Arc<crate::metrics::Metrics>,
}

impl TokenSource {
    pub(crate) fn new(
        credential: &Credential,
        token_url: &str,
        pg: PgConfig,
        policy: TokenPolicy,
        request_timeout: Duration,
        connect_timeout: Duration,
        metrics: Arc<crate::metrics::Metrics>,
    ) -> Result<TokenSource, String> {
        let inner = match credential {
            Credential::ApiKey(key) => Inner::ApiKey(key.clone(), std::sync::Mutex::new(None)),
            Credential::OAuth { client_id, client_secret } => Inner::OAuth(Arc::new(OAuth {
                client_id: client_id.clone(),
                client_secret: client_secret.clone(),
                token_url: token_url.to_owned(),
                http: crate::keap::http_client(request_timeout, connect_timeout)?,
                pg,
                policy,
                refreshing: Arc::new(Mutex::new(())),
                tasks: TaskTracker::new(),
                metrics,
            })),
        };
        Ok(TokenSource { inner })
    }

    /// True for OAuth (refreshable) credentials.
    pub(crate) fn is_oauth(&self) -> bool {
        matches!(self.inner, Inner::OAuth(_))
    }

    /// The credential to use now, refreshing first if the access token is about to expire.
    pub(crate) async fn auth(&self, db: &Client) -> Result<Auth, TokenError> {
        match &self.inner {
            Inner::ApiKey(key, _) => Ok(Auth::ApiKey(key.clone())),
            Inner::OAuth(o) => {
                let stored = read(db).await?;
                check_state(&stored)?;
                if o.needs_refresh(&stored) {
                    return match o.refresh(Some(&stored.access_token)).await {
                        Ok(fresh) => Ok(Auth::Bearer(fresh)),
                        // The token endpoint is having trouble but the current access token
                        // still works: use it, and try the refresh again on the next call.
                        Err(TokenError::Transient(reason)) if stored.expires_in > 5.0 => {
                            tracing::warn!(%reason, "token refresh failed; using the current access token meanwhile");
                            Ok(Auth::Bearer(stored.access_token))
                        }
                        Err(e) => Err(e),
                    };
                }
                Ok(Auth::Bearer(stored.access_token))
            }
        }
    }

    /// Keap answered 401 to `rejected`. Returns a credential worth one retry: a freshly
    /// refreshed token, or the one another process refreshed meanwhile. An API key has no
    /// remedy but a person.
    pub(crate) async fn after_unauthorized(&self, rejected: &Auth) -> Result<Auth, TokenError> {
        match (&self.inner, rejected) {
            (Inner::OAuth(o), Auth::Bearer(token)) => o.refresh(Some(token)).await.map(Auth::Bearer),
            (Inner::OAuth(o), Auth::ApiKey(_)) => o.refresh(None).await.map(Auth::Bearer),
            (Inner::ApiKey(_, refused), _) => {
                *refused.lock().unwrap_or_else(std::sync::PoisonError::into_inner) =
                    Some(tokio::time::Instant::now());
                Err(TokenError::NeedsAuthorization(
                    "Keap refused the API key (401): check KEAP_API_KEY or the api key file \
                     (Personal Access Tokens and Service Account Keys are managed under Settings > API \
                     in Keap); one retry a minute until then"
                        .into(),
                ))
            }
        }
    }

    /// Waits, at most `limit`, for a refresh in flight to store its pair; true if none is left.
    /// The daemon calls this last, after its deliveries ended: a refresh whose caller was
    /// aborted still runs, and the process must not exit before it commits (ARCHITECTURE.md,
    /// invariant 16).
    pub(crate) async fn settle(&self, limit: Duration) -> bool {
        let Inner::OAuth(o) = &self.inner else { return true };
        if o.tasks.is_empty() {
            return true;
        }
        tracing::info!("waiting for the token refresh in flight to store the new pair");
        o.tasks.close();
        let settled = tokio::time::timeout(limit, o.tasks.wait()).await.is_ok();
        o.tasks.reopen();
        settled
    }

    /// While paused for authorisation: true once a usable grant is stored again.
    pub(crate) async fn usable_again(&self, db: &Client) -> Result<bool, TokenError> {
        match &self.inner {
            Inner::ApiKey(_, refused) => {
                let refused = refused.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
                Ok(refused.is_none_or(|at| at.elapsed() >= API_KEY_RETRY))
            }
            Inner::OAuth(_) => match read(db).await {
                Ok(stored) => Ok(stored.state == GrantState::Ok),
                Err(TokenError::NeedsAuthorization(_)) => Ok(false),
                Err(e) => Err(e),
            },
        }
    }
}

impl OAuth {
    fn needs_refresh(&self, s: &Stored) -> bool {
        s.expires_in <= self.policy.refresh_margin.as_secs_f64()
            || s.refresh_age >= self.policy.max_refresh_token_age.as_secs_f64()
    }

    /// Refreshes under the row lock, in a task of `self.tasks` that runs to its end even if
    /// the caller is dropped (see "Where concurrency lives" above). `stale` is the access token
    /// the caller found wanting; if the row already holds a different, unexpired one, another
    /// process or task refreshed first and that one is returned without spending the refresh
    /// token again.
    async fn refresh(self: &Arc<Self>, stale: Option<&Secret>) -> Result<Secret, TokenError> {
        // Queue in the caller: one dropped while waiting here has sent nothing. From the moment
        // the guard is ours there is no await until it belongs to the task.
        let turn = Arc::clone(&self.refreshing).lock_owned().await;
        let (this, stale) = (Arc::clone(self), stale.cloned());
        let task = self.tasks.spawn(async move {
            let result = this.refresh_locked(stale.as_ref()).await;
            drop(turn);
            result
        });
        task.await
            .unwrap_or_else(|e| Err(TokenError::Transient(format!("the token refresh task failed: {e}"))))
    }

    /// The client's credentials for the token endpoint: an `Authorization: Basic` header value,
    /// marked sensitive (HTTP/2 never indexes it, and `Debug` hides it).
    fn basic_credentials(&self) -> Result<reqwest::header::HeaderValue, TokenError> {
        let value = crate::secret::basic_credentials(&self.client_id, &self.client_secret);
        // Base64 after "Basic " is always a valid header value; say so rather than panic.
        let mut header = reqwest::header::HeaderValue::from_str(value.expose()).map_err(|_| {
            TokenError::NeedsAuthorization("the OAuth client credentials cannot be sent in a header".into())
        })?;
        header.set_sensitive(true);
        Ok(header)
    }

    /// The refresh itself; the caller holds `refreshing`.
    async fn refresh_locked(&self, stale: Option<&Secret>) -> Result<Secret, TokenError> {
        let mut conn = db::connect(&self.pg).await?;
        let tx = conn.transaction().await?;
        // This transaction holds the token row across Keap's token request (bounded by the
        // request timeout) and must commit the new pair Keap hands out, and a second refresher
        // must wait for it, not fail: the connection-wide timeouts (`db::parse`) do not apply.
        tx.batch_execute(
            "set local statement_timeout = 0; set local lock_timeout = 0;
             set local idle_in_transaction_session_timeout = 0",
        )
        .await?;
        let row = tx.query_opt(&format!("{SELECT_STORED} for update"), &[]).await?;
        let stored = stored_from(row)?;
        check_state(&stored)?;
        let someone_else_refreshed = stale.is_some_and(|s| s != &stored.access_token);
        if someone_else_refreshed && !self.needs_refresh(&stored) {
            tx.commit().await?;
            return Ok(stored.access_token);
        }

        let answer = self
            .http
            .post(&self.token_url)
            .header(reqwest::header::AUTHORIZATION, self.basic_credentials()?)
            .form(&[("grant_type", "refresh_token"), ("refresh_token", stored.refresh_token.expose())])
            .send()
            .await;
        let response = match answer {
            Ok(r) => r,
            Err(e) => {
                tx.rollback().await.ok();
                return Err(TokenError::Transient(format!(
                    "token endpoint unreachable: {}",
                    crate::keap::describe_reqwest(&e)
                )));
            }
        };
        let status = response.status();
        if status.is_redirection() {
            // Not followed: the form holds the refresh token (ARCHITECTURE.md, invariant 16).
            // Transient, and the grant is kept: a redirect refuses nothing, and the refresh
            // token never left for the other host, so it is still good once the endpoint
            // answers again (or `keap.token_url` is corrected).
            tx.rollback().await.ok();
            self.metrics.token_refresh(false);
            return Err(TokenError::Transient(format!(
                "token endpoint answered {status}: {}",
                crate::keap::redirect_refused(&response, "keap.token_url (KEAP_TOKEN_URL)")
            )));
        }
        // Read up to the cap (invariant 16). An error answer we cannot read is judged by its
        // status alone, as before.
        let (text, unread) = match crate::keap::read_reply(response).await {
            Ok(text) => (text, None),
            Err(e) => (String::new(), Some(e)),
        };
        if let (true, Some(e)) = (status.is_success(), &unread) {
            // A success we cannot read, too large or cut off, may still mean Keap rotated the
            // pair and the old refresh token is spent. There is nothing to store, so this is
            // the same case as an unreadable body below: transient. The next refresh tells
            // (invalid_grant asks for re-authorisation), and reading more would not help: the
            // cap exists so that no answer can grow memory without bound.
            tx.rollback().await.ok();
            self.metrics.token_refresh(false);
            return Err(TokenError::Transient(format!("token endpoint answered {status}, but {e}")));
        }
        if status.is_success() {
            let parsed: TokenResponse = match serde_json::from_str(&text) {
                Ok(t) => t,
                Err(e) => {
                    let why = format!(
                        "the token endpoint answered {status} with a body keap-sync cannot read as a token answer ({})",
                        e.classify_name()
                    );
                    if rotated(&text) {
                        return self.hold(tx, &text, &why, HeldUse::Salvage).await;
                    }
                    // No refresh token in it: nothing to keep. Retry, and if Keap then says
                    // invalid_grant, ask for re-authorisation.
                    tx.rollback().await.ok();
                    return Err(TokenError::Transient(format!(
                        "token endpoint answered {status} with an unreadable body ({})",
                        e.classify_name()
                    )));
                }
            };
            if let Some(detail) = refreshed_for_other_app(stored.account.as_deref(), &parsed) {
                if rotated(&text) {
                    return self.hold(tx, &text, &detail, HeldUse::Switch).await;
                }
                self.metrics.token_refresh(false);
                mark_reauthorization_needed(&tx, &detail).await?;
                tx.commit().await?;
                tracing::error!(reason = %detail, "the token refresh answered for another Keap app; deliveries pause");
                return Err(TokenError::NeedsAuthorization(format!("{detail}; {REAUTHORIZE_HINT}")));
            }
            match store(&tx, &parsed, false).await {
                Ok(()) => {}
                Err(TokenError::InvalidResponse(why)) if rotated(&text) => {
                    let why = format!("Keap's answer to the token refresh cannot be stored: {why}");
                    return self.hold(tx, &text, &why, HeldUse::Salvage).await;
                }
                Err(e) => return Err(e),
            }
            tx.commit().await?;
            self.metrics.token_refresh(true);
            tracing::info!(expires_in_secs = parsed.expires_in, "refreshed the Keap access token");
            return Ok(Secret::new(parsed.access_token));
        }

        let body: ErrorBody = serde_json::from_str(&text).unwrap_or_default();
        let code = body.error.clone().unwrap_or_default();
        let describe = body.summary().unwrap_or_else(|| match &unread {
            Some(e) => format!("{status}; {e}"),
            None => status.to_string(),
        });
        let lost = match status.as_u16() {
            401 | 403 => true,
            400 => {
                code == "invalid_grant"
                    || code == "invalid_client"
                    || code == "unauthorized_client"
                    || describe.to_ascii_lowercase().contains("refresh token")
            }
            _ => false,
        };
        self.metrics.token_refresh(false);
        if lost {
            let detail = format!("Keap refused the token refresh ({status}: {describe})");
            mark_reauthorization_needed(&tx, &detail).await?;
            tx.commit().await?;
            return Err(TokenError::NeedsAuthorization(format!("{detail}; {REAUTHORIZE_HINT}")));
        }
        tx.rollback().await.ok();
        Err(TokenError::Transient(format!("token endpoint answered {status}: {describe}")))
    }
}

impl OAuth {
    /// Keeps aside a 200 answer that rotated the pair but is refused (`why`), in the
    /// transaction that holds the token row, marks the grant "re-authorisation needed" with a
    /// detail that says it was kept and how to store it, and commits. Keap has spent the old
    /// refresh token, so the answer's is the only live one: thrown away, the grant would be
    /// lost for good. The answer is a secret: it goes to the table, never to a log or error.
    async fn hold(
        &self,
        tx: tokio_postgres::Transaction<'_>,
        answer: &str,
        why: &str,
        used: HeldUse,
    ) -> Result<Secret, TokenError> {
        self.metrics.token_refresh(false);
        let how = match used {
            HeldUse::Switch => {
                "to move the sync to that app with it, stop every keap-sync daemon, then run \
                 `psql \"$DATABASE_URL\" -Atc 'select held_answer from keap_sync.oauth_token' | keap-sync auth \
                 import --switch-account`"
            }
            HeldUse::Salvage => {
                "its refresh token is still unspent: once the answer is corrected (or Keap support \
                 confirms it), `psql \"$DATABASE_URL\" -Atc 'select held_answer from keap_sync.oauth_token' | \
                 keap-sync auth import` stores it"
            }
        };
        let detail = format!(
            "{why}. Keap rotated the pair all the same (the refresh token sent is spent), so its answer is kept \
             aside, unused, in keap_sync.oauth_token.held_answer (a secret: never logged); {how}"
        );
        tx.execute(
            "update keap_sync.oauth_token set held_answer = $1, held_at = now() where id = 1",
            &[&answer],
        )
        .await?;
        mark_reauthorization_needed(&tx, &detail).await?;
        tx.commit().await?;
        tracing::error!(reason = %detail, "refused the token refresh answer and kept it aside; deliveries pause");
        Err(TokenError::NeedsAuthorization(format!("{detail}; otherwise {REAUTHORIZE_HINT}")))
    }
}

/// How a kept answer can be used, for the message that says it was kept.
#[derive(Debug, Clone, Copy)]
enum HeldUse {
    /// A valid grant for another Keap app: `auth import --switch-account`.
    Switch,
    /// An answer that failed a check: worth keeping for its refresh token.
    Salvage,
}

/// True when a 200 answer of the token endpoint carries a refresh token: Keap rotated the
/// pair, so the one sent is spent and this one must not be thrown away.
fn rotated(answer: &str) -> bool {
    serde_json::from_str::<serde_json::Value>(answer)
        .ok()
        .and_then(|v| v.get("refresh_token").and_then(|t| t.as_str()).map(|t| !t.trim().is_empty()))
        .unwrap_or(false)
}

trait ClassifyName {
    fn classify_name(&self) -> &'static str;
}

impl ClassifyName for serde_json::Error {
    fn classify_name(&self) -> &'static str {
        match self.classify() {
            serde_json::error::Category::Io => "i/o",
            serde_json::error::Category::Syntax => "not JSON",
            serde_json::error::Category::Data => "missing or mistyped fields",
            serde_json::error::Category::Eof => "cut off",
        }
    }
}

/// Puts the stored grant in the "re-authorisation needed" state with `detail` as the reason.
async fn mark_reauthorization_needed(
    db: &impl tokio_postgres::GenericClient,
    detail: &str,
) -> Result<(), TokenError> {
    db.execute(
        "update keap_sync.oauth_token
            set state = 'reauthorization_needed', state_detail = $1, updated_at = now()
          where id = 1",
        &[&detail],
    )
    .await?;
    Ok(())
}

fn check_state(s: &Stored) -> Result<(), TokenError> {
    if s.state == GrantState::Ok {
        return Ok(());
    }
    Err(TokenError::NeedsAuthorization(format!(
        "{}; {REAUTHORIZE_HINT}",
        s.state_detail.as_deref().unwrap_or("the Keap grant needs re-authorisation")
    )))
}

async fn read(db: &Client) -> Result<Stored, TokenError> {
    let row = db.query_opt(SELECT_STORED, &[]).await?;
    stored_from(row)
}

fn stored_from(row: Option<tokio_postgres::Row>) -> Result<Stored, TokenError> {
    let row = row.ok_or_else(|| {
        TokenError::NeedsAuthorization(format!("no Keap OAuth tokens are stored yet; {REAUTHORIZE_HINT}"))
    })?;
    Ok(Stored {
        access_token: Secret::new(row.get::<_, String>(0)),
        refresh_token: Secret::new(row.get::<_, String>(1)),
        expires_in: row.get(2),
        refresh_age: row.get(3),
        state: GrantState::from_db(row.get(4))?,
        state_detail: row.get(5),
        account: row.get(6),
    })
}

/// Writes a token response into the store. `new_grant` (import, login) also resets the grant's
/// start time and clears a "re-authorisation needed" state. A refresh must have been checked
/// with [`refreshed_for_other_app`] first; a new grant for another app than the stored one is
/// not written (see [`Write::NewGrant`]).
pub(crate) async fn store(
    db: &impl tokio_postgres::GenericClient,
    t: &TokenResponse,
    new_grant: bool,
) -> Result<(), TokenError> {
    let how = if new_grant { Write::NewGrant } else { Write::Refresh };
    if write_grant(db, t, how).await? {
        Ok(())
    } else {
        Err(TokenError::InvalidResponse("the grant is for another Keap app than the stored one".into()))
    }
}

/// How [`write_grant`] treats the app (account) a token response names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Write {
    /// A refresh of the stored grant: same app (checked before), or the stored one kept.
    Refresh,
    /// A new grant: written only if it is for the stored app, or either app is unknown; a
    /// response that names no app keeps the stored one.
    NewGrant,
    /// A new grant for another app, on the user's explicit word: recorded as the switch.
    SwitchApp,
}

/// Writes `t`; false if [`Write::NewGrant`] found a grant for another app stored (nothing
/// written). The check is part of the one statement, so two imports racing cannot both win.
async fn write_grant(
    db: &impl tokio_postgres::GenericClient,
    t: &TokenResponse,
    how: Write,
) -> Result<bool, TokenError> {
    if t.access_token.is_empty() || t.refresh_token.is_empty() || t.expires_in <= 0 {
        return Err(TokenError::InvalidResponse(
            "the token response needs a non-empty access_token and refresh_token and a positive expires_in"
                .into(),
        ));
    }
    let account = t.scope.as_deref().and_then(account_from_scope);
    let new_grant = how != Write::Refresh;
    let switch = how == Write::SwitchApp;
    let written = db
        .execute(
            "insert into keap_sync.oauth_token as o
                    (id, access_token, refresh_token, expires_at, scope, account, account_switched_at, granted_at,
                     refresh_token_issued_at, refreshed_at, state, state_detail, updated_at)
             values (1, $1, $2, now() + make_interval(secs => $3), $4, $6, case when $7 then now() end, now(),
                     now(), null, 'ok', null, now())
             on conflict (id) do update
                set access_token = excluded.access_token,
                    refresh_token = excluded.refresh_token,
                    expires_at = excluded.expires_at,
                    scope = coalesce(excluded.scope, o.scope),
                    account = case when $7 then excluded.account else coalesce(excluded.account, o.account) end,
                    previous_account = case when $7 then o.account else o.previous_account end,
                    account_switched_at = case when $7 then now() else o.account_switched_at end,
                    granted_at = case when $5 then now() else o.granted_at end,
                    refresh_token_issued_at = now(),
                    refreshed_at = case when $5 then o.refreshed_at else now() end,
                    held_answer = case when $5 then null else o.held_answer end,
                    held_at = case when $5 then null else o.held_at end,
                    state = 'ok', state_detail = null, updated_at = now()
              where $7 or o.account is null or excluded.account is null or o.account = excluded.account",
            &[&t.access_token, &t.refresh_token, &(t.expires_in as f64), &t.scope, &new_grant, &account, &switch],
        )
        .await
        .map_err(|e| TokenError::Db(DbError::Query(e)))?;
    Ok(written == 1)
}

/// The Keap app (account, tenant) a token response's `scope` names: Keap answers
/// `full|abc123.infusionsoft.com`, and the part after the `|` is the app's host name
/// (`docs/keap-api.md`, "Token response"). `None` when it names none recognisably: no `|`,
/// more than one, or anything but letters, digits, dots and dashes after it. Lower case, as
/// host names compare. `sql/0006_grant_account.sql` (`keap_sync.grant_account`) reads stored
/// scopes the same way.
pub(crate) fn account_from_scope(scope: &str) -> Option<String> {
    let (_, app) = scope.split_once('|')?;
    let app = app.trim();
    let host_like = app.chars().all(|c| c.is_ascii_alphanumeric() || c == '.' || c == '-');
    (host_like && app.chars().any(|c| c.is_ascii_alphanumeric())).then(|| app.to_ascii_lowercase())
}

/// Why a refresh answer must not be stored: it names another app than the stored grant's.
/// Contact ids are per app, so adopting it would point the contact map at unrelated contacts;
/// the grant is treated as refused instead (ARCHITECTURE.md, invariant 7). An answer that
/// names no app, or a stored grant whose app is unknown, is no evidence of a switch.
fn refreshed_for_other_app(stored: Option<&str>, answer: &TokenResponse) -> Option<String> {
    let stored = stored?;
    let answered = answer.scope.as_deref().and_then(account_from_scope)?;
    (answered != stored).then(|| {
        format!(
            "Keap answered the token refresh for Keap app {answered}, but the grant is for {stored}, whose contacts \
             the contact map links; the answer was not stored (to move the sync to {answered}, use \
             `keap-sync auth login --switch-account`)"
        )
    })
}

/// Parses a token endpoint answer (`auth import`'s standard input, or the code exchange's
/// reply). Extra fields such as `token_type` are ignored.
pub(crate) fn parse_token_response(text: &str) -> Result<TokenResponse, TokenError> {
    let parsed: TokenResponse = serde_json::from_str(text.trim()).map_err(|e| {
        TokenError::InvalidResponse(format!(
            "not a token response: expected JSON with access_token, refresh_token and expires_in ({})",
            e.classify_name()
        ))
    })?;
    if parsed.access_token.trim().is_empty()
        || parsed.refresh_token.trim().is_empty()
        || parsed.expires_in <= 0
    {
        return Err(TokenError::InvalidResponse(
            "the token response needs a non-empty access_token and refresh_token and a positive expires_in"
                .into(),
        ));
    }
    Ok(parsed)
}

/// Stores a new OAuth grant given as the token endpoint's JSON answer (what `keap-sync auth
/// import` reads on standard input) and wakes any daemon paused for authorisation. Returns the
/// access token's lifetime in seconds.
///
/// A grant for another Keap app than the stored one is refused with [`ImportError::OtherApp`]
/// and nothing is stored: the contact map holds contact ids of the stored grant's app.
/// Switching apps is `keap-sync auth import --switch-account`.
pub async fn import_grant(client: &Client, token_json: &str) -> Result<i64, ImportError> {
    let tokens = parse_token_response(token_json)?;
    let imported = import_new_grant(client, &tokens, false).await?;
    // Wake any paused daemon now rather than at its next recheck.
    db::wake_daemons(client).await.map_err(TokenError::from)?;
    Ok(imported.expires_in)
}

/// What storing a new grant did, for the command to report.
#[derive(Debug)]
pub(crate) struct Imported {
    /// The access token's lifetime in seconds.
    pub expires_in: i64,
    /// The app the stored grant is for now (`None`: unknown).
    pub account: Option<String>,
    /// The token response named no app (its `scope`, if any, is here); `account` is what was
    /// known before.
    pub unnamed_scope: Option<Option<String>>,
    /// Set when the grant moved the sync to another app.
    pub switched: Option<Switched>,
    /// Users the contact map links to contacts of an app keap-sync cannot name (made under a
    /// grant stored before the app was recorded, or an API key): they may be in another app.
    pub unverified_links: i64,
}

/// A deliberate switch to another Keap app.
#[derive(Debug)]
pub(crate) struct Switched {
    /// The app before (`None`: unknown).
    pub from: Option<String>,
    /// Links of the contact map to contacts of the old app that were forgotten.
    pub unlinked: u64,
}

/// Stores a new grant for `auth import` and `auth login`, in one transaction. With
/// `switch_account`, a grant for another app than the stored one (or than the contact map's
/// links, when their app is unknown) is accepted: the links to the old app's contacts are
/// forgotten, so no call ever goes to one of its contact ids in the new app, and the switch is
/// recorded and logged. That needs no daemon delivering meanwhile, so it takes the delivery
/// lock (waiting briefly for a daemon that is just stopping).
pub(crate) async fn import(
    client: &mut Client,
    tokens: &TokenResponse,
    switch_account: bool,
) -> Result<Imported, ImportError> {
    let tx = client.transaction().await?;
    let imported = import_new_grant(&tx, tokens, switch_account).await?;
    tx.commit().await?;
    db::wake_daemons(client).await.map_err(TokenError::from)?;
    Ok(imported)
}

/// Stores a new grant, refusing one for another app unless `allow_switch`; see [`import`].
/// `allow_switch` only inside a transaction: the contact map is cleared under the delivery
/// lock, in the same transaction as the new grant is stored.
async fn import_new_grant(
    db: &impl tokio_postgres::GenericClient,
    tokens: &TokenResponse,
    allow_switch: bool,
) -> Result<Imported, ImportError> {
    let offered = tokens.scope.as_deref().and_then(account_from_scope);
    // Read without a row lock: the refusal is also part of the write's one statement, and the
    // delivery lock below must not be waited for while holding the token row a daemon refreshes.
    let row = db
        .query_one(
            "select (select account from keap_sync.oauth_token where id = 1),
                    (select count(*) from keap_sync.contact_map)",
            &[],
        )
        .await?;
    let (stored, linked): (Option<String>, i64) = (row.get(0), row.get(1));
    let same = stored.is_some() && stored == offered;
    let words = |a: &Option<String>| a.clone().unwrap_or_else(|| "an app keap-sync did not record".into());
    if let (Some(stored), Some(offered), false, false) = (&stored, &offered, same, allow_switch) {
        return Err(ImportError::OtherApp { stored: stored.clone(), offered: offered.clone(), linked });
    }
    let switching = allow_switch && !same && (stored.is_some() || linked > 0);
    let mut unlinked = 0;
    if switching {
        // A daemon that is just stopping releases the lock within moments; one that runs does not.
        db.batch_execute("set local lock_timeout = '3s'").await?;
        if let Err(e) = db.execute("select pg_advisory_xact_lock($1)", &[&db::DELIVERY_LOCK]).await {
            if e.code() == Some(&tokio_postgres::error::SqlState::LOCK_NOT_AVAILABLE) {
                return Err(ImportError::SwitchWhileDelivering { from: words(&stored), to: words(&offered) });
            }
            return Err(e.into());
        }
        unlinked = db.execute("delete from keap_sync.contact_map", &[]).await?;
    }
    let how = if switching { Write::SwitchApp } else { Write::NewGrant };
    if !write_grant(db, tokens, how).await? {
        // Another import stored a grant for another app since the read above.
        let now: Option<String> =
            db.query_one("select account from keap_sync.oauth_token where id = 1", &[]).await?.get(0);
        return Err(ImportError::OtherApp { stored: words(&now), offered: words(&offered), linked });
    }
    if switching {
        tracing::warn!(
            from = %words(&stored),
            to = %words(&offered),
            unlinked,
            "switched the Keap app of the grant; links to contacts of the old app were forgotten"
        );
    }
    Ok(Imported {
        expires_in: tokens.expires_in,
        account: if switching { offered.clone() } else { offered.clone().or_else(|| stored.clone()) },
        unnamed_scope: offered.is_none().then(|| tokens.scope.clone()),
        switched: switching.then(|| Switched { from: stored.clone(), unlinked }),
        unverified_links: if !switching && stored.is_none() && linked > 0 { linked } else { 0 },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_account_is_the_host_after_the_bar_of_scope() {
        let cases = [
            ("full|abc123.infusionsoft.com", Some("abc123.infusionsoft.com")),
            (" full| Abc123.Infusionsoft.com ", Some("abc123.infusionsoft.com")),
            ("|abc123.infusionsoft.com", Some("abc123.infusionsoft.com")),
            ("full|my-app.keap.app", Some("my-app.keap.app")),
            // Without a bar, or with nothing after it: no account.
            ("full", None),
            ("", None),
            ("full|", None),
            ("full|  ", None),
            // Odd input is not guessed at.
            ("full|a|b", None),
            ("full|abc 123", None),
            ("full|abc123.infusionsoft.com openid", None),
            ("full|...", None),
            ("full|abc/../x", None),
            ("full|äbc.infusionsoft.com", None),
        ];
        for (scope, want) in cases {
            assert_eq!(account_from_scope(scope).as_deref(), want, "scope {scope:?}");
        }
    }

    fn answer(scope: Option<&str>) -> TokenResponse {
        TokenResponse {
            access_token: "at".into(),
            token_type: None,
            expires_in: 60,
            refresh_token: "rt".into(),
            scope: scope.map(Into::into),
        }
    }

    #[test]
    fn only_a_refresh_naming_another_app_is_refused() {
        let a = "a1.infusionsoft.com";
        assert!(refreshed_for_other_app(Some(a), &answer(Some("full|a1.infusionsoft.com"))).is_none());
        assert!(refreshed_for_other_app(Some(a), &answer(Some("full|A1.Infusionsoft.com"))).is_none());
        assert!(refreshed_for_other_app(Some(a), &answer(None)).is_none(), "names none: keep the app");
        assert!(refreshed_for_other_app(Some(a), &answer(Some("full"))).is_none());
        assert!(refreshed_for_other_app(None, &answer(Some("full|b2.infusionsoft.com"))).is_none());
        let why = refreshed_for_other_app(Some(a), &answer(Some("full|b2.infusionsoft.com"))).unwrap();
        assert!(why.contains(a) && why.contains("b2.infusionsoft.com"), "{why}");
        assert!(why.contains("--switch-account"), "{why}");
    }

    #[test]
    fn the_refusal_names_both_apps_and_the_ways_out() {
        let e = ImportError::OtherApp { stored: "a1.x".into(), offered: "b2.x".into(), linked: 3 };
        let text = e.to_string();
        for needle in [
            "a1.x",
            "b2.x",
            "links 3 users",
            "--switch-account",
            "keap-sync auth login",
            "backfill --restart",
        ] {
            assert!(text.contains(needle), "{needle}: {text}");
        }
        let none = ImportError::OtherApp { stored: "a1.x".into(), offered: "b2.x".into(), linked: 0 };
        assert!(!none.to_string().contains("contact map links"), "{none}");
        let one = ImportError::OtherApp { stored: "a1.x".into(), offered: "b2.x".into(), linked: 1 };
        assert!(one.to_string().contains("links 1 user to a contact there"), "{one}");
    }
}
