//! The credential source the deliveries share: an API key as it is, or the OAuth grant read
//! from the token row and refreshed, one refresh at a time, in a task the source owns.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Mutex;
use tokio_postgres::Client;
use tokio_util::task::TaskTracker;

use super::store::{check_state, read, Stored};
use super::{GrantState, TokenError, TokenPolicy};
use crate::config::Credential;
use crate::db;
use crate::keap::Auth;
use crate::secret::Secret;

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

pub(super) struct OAuth {
    pub(super) client_id: String,
    pub(super) client_secret: Secret,
    pub(super) token_url: String,
    pub(super) http: reqwest::Client,
    pub(super) pg: db::Target,
    pub(super) policy: TokenPolicy,
    /// Serialises refreshes inside this process, so concurrent deliveries that all find the
    /// token stale queue here and then find the fresh pair, instead of each opening a
    /// connection to wait on the row lock (which serialises across processes). An async
    /// `Mutex` because it is held across the token request; in an `Arc` so its guard can move
    /// into the refresh task.
    pub(super) refreshing: Arc<Mutex<()>>,
    /// The refresh in flight (at most one: it holds `refreshing`), owned here so it outlives
    /// the caller that started it and [`TokenSource::settle`] can wait for it.
    pub(super) tasks: TaskTracker,
    pub(super) metrics: Arc<crate::metrics::Metrics>,
}

impl TokenSource {
    /// The token source for `credential`: an API key as it is, or an OAuth client that refreshes the
    /// stored grant through `token_url`.
    pub(crate) fn new(
        credential: &Credential,
        token_url: &str,
        pg: db::Target,
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
    /// Whether to refresh now: the access token expires within the margin, or the refresh token has
    /// reached its maximum age.
    pub(super) fn needs_refresh(&self, s: &Stored) -> bool {
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
    pub(super) fn basic_credentials(&self) -> Result<reqwest::header::HeaderValue, TokenError> {
        let value = crate::secret::basic_credentials(&self.client_id, &self.client_secret);
        // Base64 after "Basic " is always a valid header value; say so rather than panic.
        let mut header = reqwest::header::HeaderValue::from_str(value.expose()).map_err(|_| {
            TokenError::NeedsAuthorization("the OAuth client credentials cannot be sent in a header".into())
        })?;
        header.set_sensitive(true);
        Ok(header)
    }
}
