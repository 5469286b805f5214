//! What every HTTP exchange with Keap and its token endpoint has in common, so the contact
//! client, the token refresh and `auth login`'s code exchange cannot differ on it
//! (ARCHITECTURE.md, invariant 16):
//!
//! - redirects are never followed (the client is built with `redirect::Policy::none()` in
//!   [`super::http_client`]); a 3xx answer is reported by [`redirect_refused`], which names the
//!   status's target by its origin only, never its path or query (where a token could sit);
//! - a reply body is read by [`read_reply`], in chunks, and no further than [`MAX_REPLY_BYTES`].

use std::fmt;

use super::client::describe_reqwest;

/// The most of a reply body that is ever read. Keap's answers to the calls keap-sync makes are
/// a contact or a token pair, a few KiB at most; anything near this is not such an answer, and
/// reading on would only grow memory for whoever sends it.
pub(crate) const MAX_REPLY_BYTES: usize = 1 << 20;

/// Why a reply body could not be read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum ReplyError {
    /// The body is longer than [`MAX_REPLY_BYTES`]; what came after the cap was not read.
    TooLarge,
    /// The connection failed or timed out in the middle of the body.
    CutOff(String),
}

impl fmt::Display for ReplyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ReplyError::TooLarge => write!(f, "the reply is larger than 1 MiB, so it was not read"),
            ReplyError::CutOff(why) => write!(f, "the reply was cut off ({why})"),
        }
    }
}

/// Reads the body of `response` as text, chunk by chunk, and stops with
/// [`ReplyError::TooLarge`] as soon as it would exceed [`MAX_REPLY_BYTES`] (or at once, when
/// `Content-Length` already says so). The connection of a body left unread is closed, not
/// reused.
pub(crate) async fn read_reply(mut response: reqwest::Response) -> Result<String, ReplyError> {
    if response.content_length().is_some_and(|n| n > MAX_REPLY_BYTES as u64) {
        return Err(ReplyError::TooLarge);
    }
    let mut body = Vec::new();
    while let Some(chunk) = response.chunk().await.map_err(|e| ReplyError::CutOff(describe_reqwest(&e)))? {
        if body.len() + chunk.len() > MAX_REPLY_BYTES {
            return Err(ReplyError::TooLarge);
        }
        body.extend_from_slice(&chunk);
    }
    Ok(String::from_utf8(body).unwrap_or_else(|e| String::from_utf8_lossy(e.as_bytes()).into_owned()))
}

/// One line for a 3xx answer that was not followed: where it pointed (scheme, host and port
/// only) and what to do if the endpoint really moved, which is to correct `key`.
///
/// Following it could hand the credential to another host: reqwest drops `Authorization` on a
/// cross-host hop but not `X-Keap-API-Key`, and a 307/308 resends the body, which for the token
/// endpoint holds the refresh token or the client secret.
pub(crate) fn redirect_refused(response: &reqwest::Response, key: &str) -> String {
    let location = response.headers().get(reqwest::header::LOCATION).map(|v| v.to_str());
    let target = match location {
        None => "a redirect without a Location".to_owned(),
        Some(Err(_)) => "a redirect to an unreadable Location".to_owned(),
        Some(Ok(text)) => match response.url().join(text) {
            Err(_) => "a redirect to an unreadable Location".to_owned(),
            Ok(url) if matches!(url.scheme(), "http" | "https") => {
                format!("a redirect to {}", url.origin().ascii_serialization())
            }
            Ok(url) => format!("a redirect to a {}: address", url.scheme()),
        },
    };
    format!(
        "{target}, not followed (no credential is ever sent after a redirect); \
         if the endpoint has moved, correct {key}"
    )
}

#[cfg(test)]
#[allow(clippy::disallowed_methods, reason = "a test owns the servers it spawns; they end with it")]
mod tests {
    use super::*;
    use std::time::Duration;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// Serves `answers` to successive connections on loopback, one raw HTTP/1.1 response each;
    /// returns the base URL and how many connections arrived.
    async fn serve(answers: Vec<Vec<u8>>) -> (String, tokio::task::JoinHandle<usize>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        let task = tokio::spawn(async move {
            let mut served = 0;
            for answer in answers {
                let Ok((mut stream, _)) = listener.accept().await else { break };
                served += 1;
                let mut head = [0u8; 4096];
                let _ = stream.read(&mut head).await;
                let _ = stream.write_all(&answer).await;
                let _ = stream.shutdown().await;
            }
            served
        });
        (base, task)
    }

    fn client() -> reqwest::Client {
        super::super::http_client(Duration::from_secs(5), Duration::from_secs(5)).unwrap()
    }

    /// A 200 with `len` bytes of body, announced by `Content-Length` or sent in 64 KiB chunks.
    fn sized(len: usize, chunked: bool) -> Vec<u8> {
        let body = vec![b'x'; len];
        if !chunked {
            let mut out =
                format!("HTTP/1.1 200 OK\r\ncontent-length: {len}\r\nconnection: close\r\n\r\n").into_bytes();
            out.extend_from_slice(&body);
            return out;
        }
        let mut out = b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\nconnection: close\r\n\r\n".to_vec();
        for part in body.chunks(64 * 1024) {
            out.extend_from_slice(format!("{:x}\r\n", part.len()).as_bytes());
            out.extend_from_slice(part);
            out.extend_from_slice(b"\r\n");
        }
        out.extend_from_slice(b"0\r\n\r\n");
        out
    }

    #[tokio::test]
    async fn bodies_are_read_up_to_the_cap_and_no_further() {
        let answers = vec![
            sized(MAX_REPLY_BYTES, false),
            sized(MAX_REPLY_BYTES + 1, false),
            sized(MAX_REPLY_BYTES, true),
            sized(2 * MAX_REPLY_BYTES, true),
        ];
        let (base, server) = serve(answers).await;
        let http = client();
        let mut results = Vec::new();
        for _ in 0..4 {
            let response = http.get(&base).send().await.unwrap();
            results.push(read_reply(response).await.map(|text| text.len()));
        }
        assert_eq!(
            results,
            vec![
                Ok(MAX_REPLY_BYTES),
                Err(ReplyError::TooLarge),
                Ok(MAX_REPLY_BYTES),
                Err(ReplyError::TooLarge)
            ]
        );
        assert_eq!(server.await.unwrap(), 4);
        assert_eq!(ReplyError::TooLarge.to_string(), "the reply is larger than 1 MiB, so it was not read");
    }

    #[tokio::test]
    async fn a_redirect_is_reported_by_its_origin_and_not_followed() {
        // The second answer would be the redirect's target if it were followed.
        let (elsewhere, elsewhere_server) = serve(vec![sized(2, false)]).await;
        let location = format!("{elsewhere}/steal?refresh_token=rt-secret");
        let moved =
            format!("HTTP/1.1 307 Temporary Redirect\r\nlocation: {location}\r\nconnection: close\r\n\r\n");
        let (base, server) =
            serve(vec![moved.into_bytes(), b"HTTP/1.1 302 Found\r\nconnection: close\r\n\r\n".to_vec()])
                .await;
        let http = client();

        let response =
            http.post(format!("{base}/token")).body("refresh_token=rt-secret").send().await.unwrap();
        assert_eq!(response.status(), 307);
        let message = redirect_refused(&response, "keap.token_url");
        assert!(message.starts_with(&format!("a redirect to {elsewhere}, not followed")), "{message}");
        assert!(message.ends_with("correct keap.token_url"), "{message}");
        assert!(!message.contains("secret") && !message.contains("steal"), "{message}");

        let response = http.get(format!("{base}/x")).send().await.unwrap();
        assert_eq!(response.status(), 302);
        assert!(redirect_refused(&response, "k").starts_with("a redirect without a Location"));

        assert_eq!(server.await.unwrap(), 2);
        elsewhere_server.abort();
        assert_eq!(elsewhere_server.await.ok(), None, "nothing reached the redirect's target");
    }
}
