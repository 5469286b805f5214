//! `keap-sync auth …`: import a grant, log in with the authorization-code flow, show the
//! grant's state. The token lifecycle itself (refresh, rotation, re-authorisation state) lives
//! in `crate::token`; this module only talks to the person at the terminal.

use std::convert::Infallible;
use std::io::Read;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::sync::mpsc;

use super::render::human_secs;
use super::{connect_migrated, CliError};
use crate::config::{Config, Credential};
use crate::db::DbError;
use crate::keap::model::ErrorBody;
use crate::secret::Secret;
use crate::token::{self, REAUTHORIZE_HINT};

/// How long a browser connection may take to send its request head to the `--listen`
/// receiver. A connection that opens and sends nothing (a port scan, a preconnect) must not
/// hold the login up.
const REDIRECT_READ_TIMEOUT: Duration = Duration::from_secs(10);

/// `auth import`: a token response on standard input becomes the stored grant.
pub(super) async fn import(config: Config, switch_account: bool) -> Result<(), CliError> {
    let mut text = String::new();
    std::io::stdin()
        .read_to_string(&mut text)
        .map_err(|e| CliError::Other(format!("cannot read standard input: {e}")))?;
    // Checked before connecting, so a bad paste is reported as such even without a database.
    let tokens =
        token::parse_token_response(&text).map_err(|e| CliError::Other(format!("standard input is {e}")))?;
    let mut client = connect_migrated(&config).await?;
    let imported = token::import(&mut client, &tokens, switch_account).await.map_err(import_failed)?;
    println!(
        "stored a new Keap grant{}; the access token expires in {} s and will be refreshed automatically",
        imported.account.as_deref().map(|a| format!(" for Keap app {a}")).unwrap_or_default(),
        imported.expires_in
    );
    report_account(&imported, switch_account);
    Ok(())
}

/// An import that failed, as the command's error.
fn import_failed(e: token::ImportError) -> CliError {
    CliError::Other(e.to_string())
}

/// What the user must know about the Keap app of a grant just stored: a switch and what to do
/// next, a grant that names no app, links whose app keap-sync cannot check.
fn report_account(imported: &token::Imported, switch_account: bool) {
    let to = imported.account.as_deref().unwrap_or("an app the grant does not name");
    if let Some(s) = &imported.switched {
        let from = s.from.as_deref().unwrap_or("the app of the earlier links");
        println!(
            "switched the sync from Keap app {from} to {to}: forgot {} to contacts in {from} (they stay there \
             untouched). Run `keap-sync backfill --restart` to send every user to {to}: they are matched by email, \
             so contacts already there are linked, not duplicated. Changes already queued go to {to} as the daemon \
             delivers them.",
            if s.unlinked == 1 { "1 link".to_owned() } else { format!("{} links", s.unlinked) }
        );
    } else if switch_account {
        println!("--switch-account: nothing to switch; neither the stored grant nor the contact map belongs to another Keap app");
    }
    if let Some(scope) = &imported.unnamed_scope {
        let scope = scope.as_deref().map(|s| format!("scope {s:?}")).unwrap_or_else(|| "no scope".into());
        match (&imported.account, &imported.switched) {
            (Some(a), None) => println!(
                "note: the token response names no Keap app ({scope}); keap-sync keeps assuming {a}, \
                 the app of the grant before"
            ),
            _ => println!(
                "note: the token response names no Keap app ({scope}); keap-sync cannot check that later grants \
                 are for the same app"
            ),
        }
    }
    if imported.unverified_links > 0 {
        println!(
            "note: the contact map links {} to contacts made before keap-sync recorded its Keap app; \
             if they are not in {to}, repeat with --switch-account (every daemon stopped), then run \
             `keap-sync backfill --restart`",
            if imported.unverified_links == 1 {
                "1 user".to_owned()
            } else {
                format!("{} users", imported.unverified_links)
            }
        );
    }
}

/// `auth login`: the authorization-code flow. Prints the consent URL, takes the redirected
/// URL (pasted on standard input, or received by a loopback listener), checks `state`,
/// exchanges the code and stores the grant.
pub(super) async fn login(
    config: Config,
    listen: Option<SocketAddr>,
    switch_account: bool,
) -> Result<(), CliError> {
    let (client_id, client_secret, redirect_uri) = login_client(&config)?;
    let mut client = connect_migrated(&config).await?;

    // Listen before printing the URL, so the redirect can never arrive before we are ready.
    let listener = match listen {
        Some(addr) => Some(bind_redirect_listener(addr).await?),
        None => None,
    };
    let state = format!("{:032x}", rand::random::<u128>());
    let url = consent_url(&config, client_id, &redirect_uri, &state)?;
    println!("Open this URL in a browser, sign in to Keap and allow access:\n\n  {url}\n");
    let answer = redirected(listener, listen).await?;
    let code = code_from_redirect(&answer, &state)?;
    let text = exchange_code(&config, client_id, client_secret, &code, &redirect_uri).await?;
    let tokens = token::parse_token_response(&text)
        .map_err(|e| CliError::Other(format!("the token endpoint's answer is {e}")))?;
    let imported = token::import(&mut client, &tokens, switch_account).await.map_err(import_failed)?;
    println!(
        "Authorised{}. The grant is stored; the daemon refreshes it from now on.",
        imported.account.as_deref().map(|a| format!(" for Keap app {a}")).unwrap_or_default()
    );
    report_account(&imported, switch_account);
    Ok(())
}

/// The OAuth client `auth login` needs, and the redirect URL registered for it; an API key, or
/// no `redirect_uri`, is an error that says what to set.
fn login_client(config: &Config) -> Result<(&String, &Secret, String), CliError> {
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
    Ok((client_id, client_secret, redirect_uri))
}

/// Keap's consent page for this client, carrying `state`.
fn consent_url(
    config: &Config,
    client_id: &str,
    redirect_uri: &str,
    state: &str,
) -> Result<reqwest::Url, CliError> {
    reqwest::Url::parse_with_params(
        &config.keap.authorize_url,
        [
            ("client_id", client_id),
            ("redirect_uri", redirect_uri),
            ("response_type", "code"),
            ("scope", "full"),
            ("state", state),
        ],
    )
    .map_err(|e| CliError::Other(format!("keap.authorize_url is not a URL: {e}")))
}

/// Where the browser was sent after consent: received by the loopback `listener`, or pasted on
/// standard input.
async fn redirected(
    listener: Option<tokio::net::TcpListener>,
    listen: Option<SocketAddr>,
) -> Result<String, CliError> {
    Ok(match (listener, listen) {
        (Some(listener), Some(addr)) => {
            println!("Waiting for the redirect on http://{addr}/ …");
            receive_redirect(listener).await?
        }
        _ => {
            println!("Then paste the address the browser was sent to (or just its code) and press Enter:");
            let mut line = String::new();
            std::io::stdin()
                .read_line(&mut line)
                .map_err(|e| CliError::Other(format!("cannot read standard input: {e}")))?;
            line
        }
    })
}

/// The code exchanged at the token endpoint; Keap's answer, read up to the cap, when it is a
/// success. A redirect is never followed (the form holds the client secret and the code).
async fn exchange_code(
    config: &Config,
    client_id: &str,
    client_secret: &Secret,
    code: &str,
    redirect_uri: &str,
) -> Result<String, CliError> {
    let http = crate::keap::http_client(config.keap.request_timeout, config.keap.connect_timeout)
        .map_err(CliError::Other)?;
    let response = http
        .post(&config.keap.token_url)
        .form(&[
            ("client_id", client_id),
            ("client_secret", client_secret.expose()),
            ("code", code),
            ("grant_type", "authorization_code"),
            ("redirect_uri", redirect_uri),
        ])
        .send()
        .await
        .map_err(|e| {
            CliError::Other(format!("cannot reach the token endpoint: {}", crate::keap::describe_reqwest(&e)))
        })?;
    let status = response.status();
    if status.is_redirection() {
        // Not followed: the form holds the client secret and the code (ARCHITECTURE.md,
        // invariant 16).
        return Err(CliError::Other(format!(
            "the token endpoint answered {status}: {}",
            crate::keap::redirect_refused(&response, "keap.token_url (KEAP_TOKEN_URL)")
        )));
    }
    let text = match crate::keap::read_reply(response).await {
        Ok(text) => text,
        Err(e) => {
            return Err(CliError::Other(format!(
                "the token endpoint answered {status}, but {e}; run `keap-sync auth login` again"
            )))
        }
    };
    if !status.is_success() {
        let body: ErrorBody = serde_json::from_str(&text).unwrap_or_default();
        return Err(CliError::Other(format!(
            "Keap refused the code ({status}: {}); codes are single-use and expire quickly: run `keap-sync auth login` again",
            body.summary().unwrap_or_default()
        )));
    }
    Ok(text)
}

/// The authorization code from what the user pasted: the redirected URL (whose `state`
/// must match ours — a mismatch means the redirect is not from this login), its query
/// string, or the bare code.
fn code_from_redirect(answer: &str, expected_state: &str) -> Result<String, CliError> {
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
async fn bind_redirect_listener(addr: SocketAddr) -> Result<tokio::net::TcpListener, CliError> {
    if !addr.ip().is_loopback() {
        return Err(CliError::Other(format!(
            "--listen {addr}: only loopback addresses are allowed (forward the redirect to it)"
        )));
    }
    tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| CliError::Other(format!("cannot listen on {addr}: {e}")))
}

/// Serves HTTP on `listener` (hyper, one task per connection) until a request carries the
/// redirect (`code=` or `error=` in its query), and returns its target (`/path?query`). Other
/// requests (a browser's favicon) get a 404. Each connection must send its request head within
/// [`REDIRECT_READ_TIMEOUT`]. The redirect's page is answered with `connection: close`, and its
/// target is handed over only once that answer is written, so returning (which aborts every
/// other connection task) never cuts the browser's page short.
async fn receive_redirect(listener: tokio::net::TcpListener) -> Result<String, CliError> {
    let (found_tx, mut found) = mpsc::channel::<String>(1);
    let mut connections = tokio::task::JoinSet::new();
    loop {
        let (stream, _) = tokio::select! {
            target = found.recv() => {
                return target.ok_or_else(|| CliError::Other("the redirect receiver stopped".into()));
            }
            accepted = listener.accept() => {
                accepted.map_err(|e| CliError::Other(format!("accept failed: {e}")))?
            }
        };
        let found_tx = found_tx.clone();
        connections.spawn(async move {
            // The redirect target seen on this connection: written by the service (at most
            // once per request), read after the connection is done. A std Mutex: never held
            // across an await.
            let seen = Arc::new(Mutex::new(None::<String>));
            let service_seen = Arc::clone(&seen);
            let service = hyper::service::service_fn(move |req: Request<Incoming>| {
                let seen = Arc::clone(&service_seen);
                async move { Ok::<_, Infallible>(answer_redirect(&req, &seen)) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(REDIRECT_READ_TIMEOUT)
                .serve_connection(TokioIo::new(stream), service)
                .await;
            let target = seen.lock().unwrap_or_else(std::sync::PoisonError::into_inner).take();
            if let Some(target) = target {
                let _ = found_tx.send(target).await;
            }
        });
    }
}

/// Keeps a request that carries `code=` or `error=` as the redirect and thanks the browser; any other
/// request (a favicon, say) gets a 404.
fn answer_redirect(req: &Request<Incoming>, seen: &Mutex<Option<String>>) -> Response<Full<Bytes>> {
    let target = req.uri().path_and_query().map(|pq| pq.as_str().to_owned()).unwrap_or_default();
    if !target.contains("code=") && !target.contains("error=") {
        let mut not_found = Response::new(Full::new(Bytes::new()));
        *not_found.status_mut() = StatusCode::NOT_FOUND;
        return not_found;
    }
    *seen.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = Some(target);
    let mut page = Response::new(Full::new(Bytes::from_static(
        b"keap-sync received the authorisation; you can close this window.",
    )));
    page.headers_mut().insert(hyper::header::CONNECTION, hyper::header::HeaderValue::from_static("close"));
    page
}

/// `auth status`: what is in use and how the grant stands; never a secret.
pub(super) async fn status(config: Config) -> Result<(), CliError> {
    match config.credential()? {
        Credential::ApiKey(_) => {
            println!("credential: API key (X-Keap-API-Key); no token refresh needed");
            return Ok(());
        }
        Credential::OAuth { client_id, .. } => println!("credential: OAuth client {client_id}"),
    }
    let client = connect_migrated(&config).await?;
    let row = client
        .query_opt(
            "select state, state_detail,
                    to_char(expires_at at time zone 'UTC', 'YYYY-MM-DD HH24:MI:SS \"UTC\"'),
                    extract(epoch from expires_at - now())::float8,
                    extract(epoch from now() - refresh_token_issued_at)::float8,
                    to_char(refreshed_at at time zone 'UTC', 'YYYY-MM-DD HH24:MI:SS \"UTC\"'),
                    to_char(granted_at at time zone 'UTC', 'YYYY-MM-DD HH24:MI:SS \"UTC\"'),
                    scope, account, previous_account,
                    to_char(account_switched_at at time zone 'UTC', 'YYYY-MM-DD HH24:MI:SS \"UTC\"')
               from keap_sync.oauth_token where id = 1",
            &[],
        )
        .await
        .map_err(DbError::from)?;
    let Some(row) = row else {
        println!("state: re-authorisation needed (no grant stored)");
        println!("fix: {REAUTHORIZE_HINT}");
        return Ok(());
    };
    let state = token::GrantState::from_db(row.get(0))?;
    let detail: Option<String> = row.get(1);
    let expires_at: String = row.get(2);
    let expires_in: f64 = row.get(3);
    let age: f64 = row.get(4);
    let refreshed: Option<String> = row.get(5);
    let granted: String = row.get(6);
    let scope: Option<String> = row.get(7);
    let account: Option<String> = row.get(8);
    let previous_account: Option<String> = row.get(9);
    let switched_at: Option<String> = row.get(10);
    match account {
        Some(a) => println!("account: {a} (the Keap app this grant, and the contact map, belong to)"),
        None => println!("account: unknown (the grant's scope names no Keap app)"),
    }
    if let Some(at) = switched_at {
        println!(
            "switched: at {at}, from {} (`auth … --switch-account`)",
            previous_account.as_deref().unwrap_or("an unrecorded app")
        );
    }
    match state {
        token::GrantState::Ok => println!("state: ok"),
        token::GrantState::ReauthorizationNeeded => {
            println!("state: re-authorisation needed");
            if let Some(d) = detail {
                println!("reason: {d}");
            }
            println!("fix: {REAUTHORIZE_HINT}");
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

#[cfg(test)]
#[allow(clippy::disallowed_methods, reason = "a test owns the servers it spawns; they end with it")]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[test]
    fn the_code_comes_from_a_url_a_query_or_alone_and_state_must_match() {
        let url = "https://app.example/cb?code=abc&state=s1";
        assert_eq!(code_from_redirect(url, "s1").unwrap(), "abc");
        assert_eq!(code_from_redirect("code=abc&state=s1", "s1").unwrap(), "abc");
        assert_eq!(code_from_redirect("  abc \n", "s1").unwrap(), "abc");
        assert!(code_from_redirect(url, "other").unwrap_err().to_string().contains("state"));
        let denied = "https://app.example/cb?error=access_denied&state=s1";
        assert!(code_from_redirect(denied, "s1").unwrap_err().to_string().contains("access_denied"));
    }

    async fn get(addr: SocketAddr, target: &str) -> String {
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        s.write_all(format!("GET {target} HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n").as_bytes())
            .await
            .unwrap();
        let mut reply = String::new();
        s.read_to_string(&mut reply).await.unwrap();
        reply
    }

    #[tokio::test]
    async fn the_receiver_skips_other_requests_and_survives_a_silent_connection() {
        let listener = bind_redirect_listener("127.0.0.1:0".parse().unwrap()).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let receiver = tokio::spawn(receive_redirect(listener));
        // A connection that never sends anything must not block the real redirect.
        let _silent = tokio::net::TcpStream::connect(addr).await.unwrap();
        assert!(get(addr, "/favicon.ico").await.starts_with("HTTP/1.1 404"));
        let reply = get(addr, "/callback?code=c0de&state=xyz").await;
        assert!(reply.starts_with("HTTP/1.1 200"), "{reply}");
        let target = tokio::time::timeout(Duration::from_secs(10), receiver).await.unwrap().unwrap().unwrap();
        assert_eq!(target, "/callback?code=c0de&state=xyz");
    }

    #[tokio::test]
    async fn only_loopback_may_receive_the_redirect() {
        let err = bind_redirect_listener("0.0.0.0:0".parse().unwrap()).await.unwrap_err();
        assert!(err.to_string().contains("loopback"), "{err}");
    }
}
