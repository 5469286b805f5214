//! A second, tiny HTTP server on loopback that stands for "some other host": the place a
//! redirect from the fake ([`super::FaultAction::Redirect`]) points to. It answers every
//! request `200 {}` and records what reached it, so a test can show that nothing did.
//!
//! It records only the kinds of what arrived (method, path, which credential headers were
//! present, whether the body held a refresh token), never a value, so printing its log can
//! leak nothing.

use std::convert::Infallible;
use std::io;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex, PoisonError};

use http_body_util::{BodyExt, Full, Limited};
use hyper::body::{Bytes, Incoming};
use hyper::header::{HeaderValue, AUTHORIZATION, CONTENT_TYPE};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use tokio::task::{JoinHandle, JoinSet};

/// Largest body looked at; the rest of a bigger one is not read.
const MAX_BODY: usize = 1 << 20;

/// One request that reached the [`OtherHost`]: kinds only, no values.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Arrival {
    /// HTTP method, e.g. `POST`.
    pub method: String,
    /// Path without the query string.
    pub path: String,
    /// An `Authorization` header was present (Bearer or Basic: a token or the client secret).
    pub authorization: bool,
    /// An `X-Keap-API-Key` header was present.
    pub api_key: bool,
    /// The body contained the text `refresh_token` (a refresh form, or a token answer).
    pub refresh_token_in_body: bool,
    /// The body contained the text `client_secret` (the code exchange's form).
    pub client_secret_in_body: bool,
}

/// The other host. Stops when dropped.
pub struct OtherHost {
    addr: SocketAddr,
    arrivals: Arc<Mutex<Vec<Arrival>>>,
    accept: JoinHandle<()>,
}

impl OtherHost {
    /// Listens on a random free port of 127.0.0.1.
    pub async fn start() -> io::Result<OtherHost> {
        let listener = tokio::net::TcpListener::bind(SocketAddr::from((Ipv4Addr::LOCALHOST, 0))).await?;
        let addr = listener.local_addr()?;
        let arrivals = Arc::new(Mutex::new(Vec::new()));
        let accept = tokio::spawn(serve(listener, Arc::clone(&arrivals)));
        Ok(OtherHost { addr, arrivals, accept })
    }

    /// `http://127.0.0.1:<port>`: what a client names as the redirect's origin.
    pub fn origin(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// An absolute URL on this host, for a `Location` header.
    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.origin())
    }

    /// Every request that reached this host, in order of arrival.
    pub fn arrivals(&self) -> Vec<Arrival> {
        self.arrivals.lock().unwrap_or_else(PoisonError::into_inner).clone()
    }
}

impl Drop for OtherHost {
    fn drop(&mut self) {
        // Dropping the accept task drops its JoinSet, which aborts every connection task.
        self.accept.abort();
    }
}

async fn serve(listener: tokio::net::TcpListener, arrivals: Arc<Mutex<Vec<Arrival>>>) {
    let mut connections = JoinSet::new();
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            // Out of descriptors and the like: back off instead of spinning.
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
            continue;
        };
        let arrivals = Arc::clone(&arrivals);
        connections.spawn(async move {
            let service = service_fn(move |req| record(Arc::clone(&arrivals), req));
            let _ = http1::Builder::new().serve_connection(TokioIo::new(stream), service).await;
        });
        // Reap finished connection tasks so the set does not grow without bound.
        while connections.try_join_next().is_some() {}
    }
}

async fn record(
    arrivals: Arc<Mutex<Vec<Arrival>>>,
    req: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let (parts, body) = req.into_parts();
    let body = Limited::new(body, MAX_BODY).collect().await.map(|b| b.to_bytes()).unwrap_or_default();
    let arrival = Arrival {
        method: parts.method.to_string(),
        path: parts.uri.path().to_owned(),
        authorization: parts.headers.contains_key(AUTHORIZATION),
        api_key: parts.headers.contains_key("x-keap-api-key"),
        refresh_token_in_body: contains(&body, b"refresh_token"),
        client_secret_in_body: contains(&body, b"client_secret"),
    };
    arrivals.lock().unwrap_or_else(PoisonError::into_inner).push(arrival);
    let mut answer = Response::new(Full::new(Bytes::from_static(b"{}")));
    answer.headers_mut().insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    Ok(answer)
}

fn contains(body: &[u8], text: &[u8]) -> bool {
    body.windows(text.len()).any(|w| w == text)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn it_records_kinds_not_values() {
        let other = OtherHost::start().await.unwrap();
        crate::install_crypto_provider();
        let http = reqwest::Client::builder().no_proxy().build().unwrap();
        let answer = http
            .post(other.url("/token"))
            .header("x-keap-api-key", "k-secret")
            .body("grant_type=refresh_token&refresh_token=rt-secret")
            .send()
            .await
            .unwrap();
        assert_eq!(answer.status(), 200);
        let arrivals = other.arrivals();
        assert_eq!(
            arrivals,
            vec![Arrival {
                method: "POST".into(),
                path: "/token".into(),
                authorization: false,
                api_key: true,
                refresh_token_in_body: true,
                client_secret_in_body: false,
            }]
        );
        let printed = format!("{arrivals:?}");
        assert!(!printed.contains("k-secret") && !printed.contains("rt-secret"), "{printed}");
    }
}
