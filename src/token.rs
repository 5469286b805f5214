//! Keap credentials: an API key as it is, or an OAuth grant kept alive in Postgres.
//!
//! The OAuth pair lives in `keap_sync.oauth_token` (one row). Keap's refresh tokens are
//! single-use: spending one returns a new pair and kills the old refresh token. Two daemons
//! refreshing at once would therefore lose the grant, so a refresh runs inside a transaction
//! holding the row lock (`select … for update`) and commits the new pair before anyone uses it.
//! A second process that was waiting on the lock then reads the fresh pair and does not refresh
//! again (design invariant 7). This is the one place where a transaction is held across an HTTP
//! call, on purpose, on its own short-lived connection.
//!
//! A refresh that Keap rejects for good (`invalid_grant`, bad client credentials) marks the
//! row `reauthorization_needed`; callers pause and poll the row until `keap-sync auth import`
//! or `auth login` stores a new grant.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Mutex;
use tokio_postgres::{Client, Config as PgConfig};

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
    #[error(transparent)]
    Db(#[from] DbError),
}

impl From<tokio_postgres::Error> for TokenError {
    fn from(e: tokio_postgres::Error) -> Self {
        TokenError::Db(DbError::Query(e))
    }
}

/// The command that fixes a lost grant; every message about one ends with it.
pub const REAUTHORIZE_HINT: &str =
    "re-authorise with `keap-sync auth login`, or pipe a token response into `keap-sync auth import`";

/// Tuning of the OAuth lifecycle.
#[derive(Debug, Clone, Copy)]
pub struct TokenPolicy {
    /// Refresh when the access token expires within this margin.
    pub refresh_margin: Duration,
    /// Refresh a grant whose refresh token is older than this even if idle, so the 45-day
    /// refresh token never lapses.
    pub max_refresh_token_age: Duration,
}

impl TokenPolicy {
    pub fn from_config(keap: &crate::config::KeapConfig) -> TokenPolicy {
        TokenPolicy { refresh_margin: keap.refresh_margin, max_refresh_token_age: keap.refresh_token_max_age }
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
    state: String,
    state_detail: Option<String>,
}

/// Reads the grant as [`Stored`] (columns in `stored_from`'s order).
const SELECT_STORED: &str = "select access_token, refresh_token,
        extract(epoch from expires_at - now())::float8,
        extract(epoch from now() - refresh_token_issued_at)::float8,
        state, state_detail
   from keap_sync.oauth_token where id = 1";

/// Supplies the credential for each Keap call.
pub struct TokenSource {
    inner: Inner,
}

enum Inner {
    /// The key, and when Keap last refused it (a person must fix it; we retry rarely).
    ApiKey(Secret, std::sync::Mutex<Option<tokio::time::Instant>>),
    OAuth(Box<OAuth>),
}

/// After Keap refuses an API key, deliveries pause this long before one more try: nothing
/// but a person can fix the key, and every refused call still counts against the quota.
pub const API_KEY_RETRY: Duration = Duration::from_secs(60);

struct OAuth {
    client_id: String,
    client_secret: Secret,
    token_url: String,
    http: reqwest::Client,
    pg: PgConfig,
    policy: TokenPolicy,
    /// Serialises refreshes inside this process; the row lock does it across processes.
    refreshing: Mutex<()>,
    metrics: Arc<crate::metrics::Metrics>,
}

impl TokenSource {
    pub fn new(
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
            Credential::OAuth { client_id, client_secret } => Inner::OAuth(Box::new(OAuth {
                client_id: client_id.clone(),
                client_secret: client_secret.clone(),
                token_url: token_url.to_owned(),
                http: crate::keap::http_client(request_timeout, connect_timeout)?,
                pg,
                policy,
                refreshing: Mutex::new(()),
                metrics,
            })),
        };
        Ok(TokenSource { inner })
    }

    /// True for OAuth (refreshable) credentials.
    pub fn is_oauth(&self) -> bool {
        matches!(self.inner, Inner::OAuth(_))
    }

    /// The credential to use now, refreshing first if the access token is about to expire.
    pub async fn auth(&self, db: &Client) -> Result<Auth, TokenError> {
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
    pub async fn after_unauthorized(&self, rejected: &Auth) -> Result<Auth, TokenError> {
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

    /// While paused for authorisation: true once a usable grant is stored again.
    pub async fn usable_again(&self, db: &Client) -> Result<bool, TokenError> {
        match &self.inner {
            Inner::ApiKey(_, refused) => {
                let refused = refused.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
                Ok(refused.is_none_or(|at| at.elapsed() >= API_KEY_RETRY))
            }
            Inner::OAuth(_) => match read(db).await {
                Ok(stored) => Ok(stored.state == "ok"),
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

    /// Refreshes under the row lock. `stale` is the access token the caller found wanting; if
    /// the row already holds a different, unexpired one, another process refreshed first and
    /// that one is returned without spending the refresh token again.
    async fn refresh(&self, stale: Option<&Secret>) -> Result<Secret, TokenError> {
        let _local = self.refreshing.lock().await;
        let mut conn = db::connect(&self.pg).await?;
        let tx = conn.transaction().await?;
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
            .basic_auth(&self.client_id, Some(self.client_secret.expose()))
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
        let text = response.text().await.unwrap_or_default();
        if status.is_success() {
            let parsed: TokenResponse = match serde_json::from_str(&text) {
                Ok(t) => t,
                Err(e) => {
                    // The old refresh token may already be spent; nothing better to do than
                    // retry and, if Keap then says invalid_grant, ask for re-authorisation.
                    tx.rollback().await.ok();
                    return Err(TokenError::Transient(format!(
                        "token endpoint answered {status} with an unreadable body ({})",
                        e.classify_name()
                    )));
                }
            };
            store(&tx, &parsed, false).await?;
            tx.commit().await?;
            self.metrics.token_refresh(true);
            tracing::info!(expires_in_secs = parsed.expires_in, "refreshed the Keap access token");
            return Ok(Secret::new(parsed.access_token));
        }

        let body: ErrorBody = serde_json::from_str(&text).unwrap_or_default();
        let code = body.error.clone().unwrap_or_default();
        let describe = body.summary().unwrap_or_else(|| status.to_string());
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
            tx.execute(
                "update keap_sync.oauth_token
                    set state = 'reauthorization_needed', state_detail = $1, updated_at = now()
                  where id = 1",
                &[&detail],
            )
            .await?;
            tx.commit().await?;
            return Err(TokenError::NeedsAuthorization(format!("{detail}; {REAUTHORIZE_HINT}")));
        }
        tx.rollback().await.ok();
        Err(TokenError::Transient(format!("token endpoint answered {status}: {describe}")))
    }
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

fn check_state(s: &Stored) -> Result<(), TokenError> {
    if s.state == "ok" {
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
        state: row.get(4),
        state_detail: row.get(5),
    })
}

/// Writes a token response into the store. `new_grant` (import, login) also resets the grant's
/// start time and clears a "re-authorisation needed" state.
pub async fn store(
    db: &impl tokio_postgres::GenericClient,
    t: &TokenResponse,
    new_grant: bool,
) -> Result<(), TokenError> {
    if t.access_token.is_empty() || t.refresh_token.is_empty() || t.expires_in <= 0 {
        return Err(TokenError::NeedsAuthorization(
            "the token response needs a non-empty access_token and refresh_token and a positive expires_in"
                .into(),
        ));
    }
    db.execute(
        "insert into keap_sync.oauth_token as o
                (id, access_token, refresh_token, expires_at, scope, granted_at, refresh_token_issued_at,
                 refreshed_at, state, state_detail, updated_at)
         values (1, $1, $2, now() + make_interval(secs => $3), $4, now(), now(), null, 'ok', null, now())
         on conflict (id) do update
            set access_token = excluded.access_token,
                refresh_token = excluded.refresh_token,
                expires_at = excluded.expires_at,
                scope = coalesce(excluded.scope, o.scope),
                granted_at = case when $5 then now() else o.granted_at end,
                refresh_token_issued_at = now(),
                refreshed_at = case when $5 then o.refreshed_at else now() end,
                state = 'ok', state_detail = null, updated_at = now()",
        &[&t.access_token, &t.refresh_token, &(t.expires_in as f64), &t.scope, &new_grant],
    )
    .await
    .map_err(|e| TokenError::Db(DbError::Query(e)))?;
    Ok(())
}

/// `keap-sync auth …` commands.
pub mod cli {
    use std::io::Read;

    use crate::cli::CliError;
    use crate::config::{Config, Credential};
    use crate::db;
    use crate::keap::model::TokenResponse;
    use crate::status::human_secs;

    /// `auth import`: a token response on standard input becomes the stored grant.
    pub async fn import(config: Config) -> Result<(), CliError> {
        let mut text = String::new();
        std::io::stdin()
            .read_to_string(&mut text)
            .map_err(|e| CliError::Other(format!("cannot read standard input: {e}")))?;
        let tokens = parse_token_response(&text)?;
        let client = crate::cli::connect_migrated(&config).await?;
        super::store(&client, &tokens, true).await.map_err(|e| CliError::Other(e.to_string()))?;
        // Wake any paused daemon now rather than at its next recheck.
        client
            .execute("select pg_notify($1, 'token')", &[&crate::daemon::CHANNEL])
            .await
            .map_err(db::DbError::from)?;
        println!(
            "stored a new Keap grant; the access token expires in {} s and will be refreshed automatically",
            tokens.expires_in
        );
        Ok(())
    }

    /// `auth login`: the authorization-code flow. Prints the consent URL, takes the redirected
    /// URL (pasted on standard input, or received by a loopback listener), checks `state`,
    /// exchanges the code and stores the grant.
    pub async fn login(config: Config, listen: Option<std::net::SocketAddr>) -> Result<(), CliError> {
        let Credential::OAuth { client_id, client_secret } = config.credential()? else {
            return Err(CliError::Other(
                "`auth login` is for OAuth clients (KEAP_CLIENT_ID and KEAP_CLIENT_SECRET); an API key needs no login"
                    .into(),
            ));
        };
        let redirect_uri = config.keap.redirect_uri.clone().ok_or_else(|| {
            CliError::Other(
                "set `redirect_uri` under [keap] to the redirect URL registered for your Keap app; \
                 Keap sends the browser there with ?code=…"
                    .into(),
            )
        })?;
        let client = crate::cli::connect_migrated(&config).await?;

        // Listen before printing the URL, so the redirect can never arrive before we are ready.
        let listener = match listen {
            Some(addr) => Some(bind_redirect_listener(addr).await?),
            None => None,
        };
        let state = format!("{:032x}", rand::random::<u128>());
        let url = reqwest::Url::parse_with_params(
            &config.keap.authorize_url,
            [
                ("client_id", client_id.as_str()),
                ("redirect_uri", redirect_uri.as_str()),
                ("response_type", "code"),
                ("scope", "full"),
                ("state", state.as_str()),
            ],
        )
        .map_err(|e| CliError::Other(format!("keap.authorize_url is not a URL: {e}")))?;
        println!("Open this URL in a browser, sign in to Keap and allow access:\n\n  {url}\n");
        let answer = match listener {
            Some(listener) => {
                if let Some(addr) = listen {
                    println!("Waiting for the redirect on http://{addr}/ …");
                }
                receive_redirect(listener).await?
            }
            None => {
                println!(
                    "Then paste the address the browser was sent to (or just its code) and press Enter:"
                );
                let mut line = String::new();
                std::io::stdin()
                    .read_line(&mut line)
                    .map_err(|e| CliError::Other(format!("cannot read standard input: {e}")))?;
                line
            }
        };
        let code = code_from_redirect(&answer, &state)?;

        let http = crate::keap::http_client(config.keap.request_timeout, config.keap.connect_timeout)
            .map_err(CliError::Other)?;
        let response = http
            .post(&config.keap.token_url)
            .form(&[
                ("client_id", client_id.as_str()),
                ("client_secret", client_secret.expose()),
                ("code", code.as_str()),
                ("grant_type", "authorization_code"),
                ("redirect_uri", redirect_uri.as_str()),
            ])
            .send()
            .await
            .map_err(|e| {
                CliError::Other(format!(
                    "cannot reach the token endpoint: {}",
                    crate::keap::describe_reqwest(&e)
                ))
            })?;
        let status = response.status();
        let text = response.text().await.unwrap_or_default();
        if !status.is_success() {
            let body: crate::keap::model::ErrorBody = serde_json::from_str(&text).unwrap_or_default();
            return Err(CliError::Other(format!(
                "Keap refused the code ({status}: {}); codes are single-use and expire quickly: run `keap-sync auth login` again",
                body.summary().unwrap_or_default()
            )));
        }
        let tokens = parse_token_response(&text)?;
        super::store(&client, &tokens, true).await.map_err(|e| CliError::Other(e.to_string()))?;
        client
            .execute("select pg_notify($1, 'token')", &[&crate::daemon::CHANNEL])
            .await
            .map_err(db::DbError::from)?;
        println!("Authorised. The grant is stored; the daemon refreshes it from now on.");
        Ok(())
    }

    /// The authorization code from what the user pasted: the redirected URL (whose `state`
    /// must match ours — a mismatch means the redirect is not from this login), its query
    /// string, or the bare code.
    pub fn code_from_redirect(answer: &str, expected_state: &str) -> Result<String, CliError> {
        let answer = answer.trim();
        if answer.is_empty() {
            return Err(CliError::Other("nothing was pasted: run `keap-sync auth login` again".into()));
        }
        if !answer.contains('=') {
            return Ok(answer.to_owned());
        }
        let query = answer.split_once('?').map_or(answer, |(_, q)| q);
        let query = query.split('#').next().unwrap_or(query);
        let pairs: Vec<(String, String)> = reqwest::Url::parse(&format!("http://x/?{query}"))
            .map(|u| u.query_pairs().map(|(k, v)| (k.into_owned(), v.into_owned())).collect())
            .unwrap_or_default();
        let get = |name: &str| pairs.iter().find(|(k, _)| k == name).map(|(_, v)| v.clone());
        if let Some(error) = get("error") {
            return Err(CliError::Other(format!(
                "Keap did not authorise: {error} {}",
                get("error_description").unwrap_or_default()
            )));
        }
        if get("state").as_deref() != Some(expected_state) {
            return Err(CliError::Other(
                "the redirect's state does not match this login (it belongs to another attempt, or was forged); \
                 run `keap-sync auth login` again"
                    .into(),
            ));
        }
        get("code").filter(|c| !c.is_empty()).ok_or_else(|| {
            CliError::Other("the redirect has no code: paste the full address the browser was sent to".into())
        })
    }

    /// Binds the `--listen` address, which must be loopback.
    async fn bind_redirect_listener(addr: std::net::SocketAddr) -> Result<tokio::net::TcpListener, CliError> {
        if !addr.ip().is_loopback() {
            return Err(CliError::Other(format!(
                "--listen {addr}: only loopback addresses are allowed (forward the redirect to it)"
            )));
        }
        tokio::net::TcpListener::bind(addr)
            .await
            .map_err(|e| CliError::Other(format!("cannot listen on {addr}: {e}")))
    }

    /// Accepts HTTP requests until one carries the redirect, and returns its target
    /// (`/path?query`). Other requests (a browser's favicon) get a 404.
    async fn receive_redirect(listener: tokio::net::TcpListener) -> Result<String, CliError> {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        loop {
            let (mut socket, _) =
                listener.accept().await.map_err(|e| CliError::Other(format!("accept failed: {e}")))?;
            let mut buf = Vec::new();
            let mut chunk = [0u8; 2048];
            while !buf.windows(4).any(|w| w == b"\r\n\r\n") && buf.len() < 16 * 1024 {
                match socket.read(&mut chunk).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => buf.extend_from_slice(&chunk[..n]),
                }
            }
            let head = String::from_utf8_lossy(&buf);
            let target = head.lines().next().and_then(|l| l.split_whitespace().nth(1)).unwrap_or("");
            if !target.contains("code=") && !target.contains("error=") {
                let _ = socket.write_all(b"HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\n\r\n").await;
                continue;
            }
            let body = "keap-sync received the authorisation; you can close this window.";
            let reply = format!(
                "HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = socket.write_all(reply.as_bytes()).await;
            return Ok(target.to_owned());
        }
    }

    /// Accepts the token endpoint's JSON as is (extra fields such as `token_type` are ignored).
    pub fn parse_token_response(text: &str) -> Result<TokenResponse, CliError> {
        let parsed: TokenResponse = serde_json::from_str(text.trim()).map_err(|e| {
            CliError::Other(format!(
                "standard input is not a token response: expected JSON with access_token, refresh_token and \
                 expires_in ({})",
                super::ClassifyName::classify_name(&e)
            ))
        })?;
        if parsed.access_token.trim().is_empty()
            || parsed.refresh_token.trim().is_empty()
            || parsed.expires_in <= 0
        {
            return Err(CliError::Other(
                "the token response needs a non-empty access_token and refresh_token and a positive expires_in".into(),
            ));
        }
        Ok(parsed)
    }

    /// `auth status`: what is in use and how the grant stands; never a secret.
    pub async fn status(config: Config) -> Result<(), CliError> {
        let credential = config.credential()?;
        match credential {
            Credential::ApiKey(_) => {
                println!("credential: API key (X-Keap-API-Key); no token refresh needed");
                return Ok(());
            }
            Credential::OAuth { client_id, .. } => println!("credential: OAuth client {client_id}"),
        }
        let client = crate::cli::connect_migrated(&config).await?;
        let row = client
            .query_opt(
                "select state, state_detail,
                        to_char(expires_at at time zone 'UTC', 'YYYY-MM-DD HH24:MI:SS \"UTC\"'),
                        extract(epoch from expires_at - now())::float8,
                        extract(epoch from now() - refresh_token_issued_at)::float8,
                        to_char(refreshed_at at time zone 'UTC', 'YYYY-MM-DD HH24:MI:SS \"UTC\"'),
                        to_char(granted_at at time zone 'UTC', 'YYYY-MM-DD HH24:MI:SS \"UTC\"'),
                        scope
                   from keap_sync.oauth_token where id = 1",
                &[],
            )
            .await
            .map_err(db::DbError::from)?;
        let Some(row) = row else {
            println!("state: re-authorisation needed (no grant stored)");
            println!("fix: {}", super::REAUTHORIZE_HINT);
            return Ok(());
        };
        let state: String = row.get(0);
        let detail: Option<String> = row.get(1);
        let expires_at: String = row.get(2);
        let expires_in: f64 = row.get(3);
        let age: f64 = row.get(4);
        let refreshed: Option<String> = row.get(5);
        let granted: String = row.get(6);
        let scope: Option<String> = row.get(7);
        match state.as_str() {
            "ok" => println!("state: ok"),
            _ => {
                println!("state: re-authorisation needed");
                if let Some(d) = detail {
                    println!("reason: {d}");
                }
                println!("fix: {}", super::REAUTHORIZE_HINT);
            }
        }
        if expires_in >= 0.0 {
            println!("access token expires: {expires_at} (in {})", human_secs(expires_in));
        } else {
            println!(
                "access token expired: {expires_at} ({} ago; refreshed on next use)",
                human_secs(-expires_in)
            );
        }
        println!("refresh token age: {} (Keap's lapse after 45 days; refreshed at 30)", human_secs(age));
        println!("last refresh: {}", refreshed.as_deref().unwrap_or("never"));
        println!("grant stored: {granted}");
        if let Some(scope) = scope {
            println!("scope: {scope}");
        }
        Ok(())
    }
}
