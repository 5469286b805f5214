//! The HTTP side of the hooks: one secret path, Keap's handshake, a capped body, one statement.
//!
//! Answers: the handshake (a POST carrying `X-Hook-Secret`) is answered 200 with the same
//! header; a delivery whose ids are queued, 200; a wrong path (or any other method), 404; a
//! body that is not a delivery, 400; one over [`MAX_BODY`], 413; the queue unreachable, 503
//! (Keap tries again later). Nothing the request holds is logged: not the path (the secret),
//! not the ids' contacts, only counts.

use std::collections::BTreeMap;
use std::io;
use std::sync::Arc;
use std::time::Duration;

use http_body_util::{BodyExt, Full, Limited};
use hyper::body::{Bytes, Incoming};
use hyper::header::{HeaderValue, CONTENT_LENGTH};
use hyper::{Method, Request, Response, StatusCode};
use serde_json::Value;
use tokio::sync::{Mutex, Notify};
use tokio_postgres::Client;

use super::queue::Named;
use crate::db::{self, DbError};
use crate::keap::stamp;
use crate::secret::Secret;

/// The largest body read: Keap sends at most 1,000 ids a delivery, which fit in a tenth of it.
pub(crate) const MAX_BODY: usize = 1 << 20;

/// The header of Keap's handshake, echoed back.
const HOOK_SECRET: &str = "x-hook-secret";

/// How long a request may take, head to answer; Keap waits 30 s, we answer well within one.
const REQUEST_DEADLINE: Duration = Duration::from_secs(10);

/// The receiver's state: the secret path, its own connection to the queue (made on first use,
/// made again after a failure) and the wake-up of the daemon's loop.
pub(crate) struct Receiver {
    path: Secret,
    pg: db::Target,
    conn: Mutex<Option<Client>>,
    /// Notified after every delivery queued: the daemon reads the contacts at its next idle turn.
    queued: Arc<Notify>,
}

impl Receiver {
    pub(crate) fn new(path: Secret, pg: db::Target, queued: Arc<Notify>) -> Receiver {
        Receiver { path, pg, conn: Mutex::new(None), queued }
    }

    /// Whether `path` is `/<secret>`, compared in time that does not depend on where it differs.
    fn is_ours(&self, path: &str) -> bool {
        let (want, got) = (self.path.expose().as_bytes(), path.as_bytes());
        got.len() == want.len() + 1
            && got[0] == b'/'
            && got[1..].iter().zip(want).fold(0u8, |acc, (a, b)| acc | (a ^ b)) == 0
    }

    /// Queues `named` on the receiver's connection, connecting first if need be.
    async fn queue(&self, named: &[Named]) -> Result<u64, DbError> {
        let mut conn = self.conn.lock().await;
        if conn.as_ref().is_none_or(Client::is_closed) {
            *conn = Some(db::connect(&self.pg).await?);
        }
        let Some(client) = conn.as_ref() else { unreachable!("connected above") };
        let pushed = super::queue::push(client, named).await;
        if pushed.is_err() {
            *conn = None;
        }
        pushed
    }
}

/// Serves the receiver on `listener` until the future is dropped (the daemon's stop).
pub(crate) async fn serve(listener: tokio::net::TcpListener, receiver: Arc<Receiver>) -> io::Result<()> {
    crate::http::serve(listener, "hook receiver", move |req| {
        let receiver = Arc::clone(&receiver);
        async move { answer(&receiver, req).await }
    })
    .await
}

/// One request's answer, within [`REQUEST_DEADLINE`].
async fn answer(receiver: &Receiver, req: Request<Incoming>) -> Response<Full<Bytes>> {
    match tokio::time::timeout(REQUEST_DEADLINE, respond(receiver, req)).await {
        Ok(response) => response,
        Err(_) => plain(StatusCode::REQUEST_TIMEOUT, "too slow\n"),
    }
}

async fn respond(receiver: &Receiver, req: Request<Incoming>) -> Response<Full<Bytes>> {
    if req.method() != Method::POST || !receiver.is_ours(req.uri().path()) {
        return plain(StatusCode::NOT_FOUND, "not found\n");
    }
    if let Some(secret) = req.headers().get(HOOK_SECRET).cloned() {
        tracing::info!("answered Keap's hook verification");
        let mut response = plain(StatusCode::OK, "");
        response.headers_mut().insert(HOOK_SECRET, secret);
        return response;
    }
    let declared = req.headers().get(CONTENT_LENGTH).and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
    if declared.is_some_and(|n| n > MAX_BODY as u64) {
        return plain(StatusCode::PAYLOAD_TOO_LARGE, "body too large\n");
    }
    let body = match Limited::new(req.into_body(), MAX_BODY).collect().await {
        Ok(body) => body.to_bytes(),
        Err(e) if e.downcast_ref::<http_body_util::LengthLimitError>().is_some() => {
            return plain(StatusCode::PAYLOAD_TOO_LARGE, "body too large\n");
        }
        Err(_) => return plain(StatusCode::BAD_REQUEST, "unreadable body\n"),
    };
    let ids = match contacts(&body) {
        Ok(ids) => ids,
        Err(why) => {
            tracing::info!(reason = why, "refused a hook delivery that is not one (400)");
            return plain(StatusCode::BAD_REQUEST, "not a hook delivery\n");
        }
    };
    if ids.is_empty() {
        return plain(StatusCode::OK, "");
    }
    match receiver.queue(&ids).await {
        Ok(_) => {
            tracing::debug!(contacts = ids.len(), "queued the contacts of a hook delivery");
            receiver.queued.notify_one();
            plain(StatusCode::OK, "")
        }
        Err(e) => {
            tracing::warn!(error = %e, contacts = ids.len(), "could not queue a hook delivery; Keap will try again (503)");
            plain(StatusCode::SERVICE_UNAVAILABLE, "try again later\n")
        }
    }
}

/// The contacts of a delivery (`{"event_key", "object_type", "object_keys": [{"id",
/// "timestamp"}, …]}`), each once, by id; none for a delivery about something else than
/// contacts. `Err` says why the body is not a delivery (no contact data in it).
fn contacts(body: &[u8]) -> Result<Vec<Named>, &'static str> {
    let v: Value = serde_json::from_slice(body).map_err(|_| "not JSON")?;
    let keys = v.get("object_keys").and_then(Value::as_array).ok_or("no object_keys array")?;
    let kind = v.get("object_type").and_then(Value::as_str).unwrap_or("contact");
    if !kind.eq_ignore_ascii_case("contact") {
        return Ok(Vec::new());
    }
    let mut named: BTreeMap<i64, Named> = BTreeMap::new();
    for key in keys {
        let id = match key.get("id") {
            Some(Value::Number(n)) => n.as_i64(),
            Some(Value::String(s)) => s.trim().parse().ok(),
            _ => None,
        };
        let id = id.filter(|id| *id > 0).ok_or("an object key without a usable id")?;
        let at = key.get("timestamp").and_then(Value::as_str).and_then(stamp::micros);
        named.entry(id).and_modify(|n| n.add(at)).or_insert(Named { id, first: at, last: at });
    }
    Ok(named.into_values().collect())
}

fn plain(status: StatusCode, body: &'static str) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from_static(body.as_bytes())));
    *response.status_mut() = status;
    response.headers_mut().insert("content-type", HeaderValue::from_static("text/plain; charset=utf-8"));
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    /// (id, earliest change, latest change) of a contact a delivery names.
    type Times = (i64, Option<i64>, Option<i64>);

    fn named(body: &[u8]) -> Result<Vec<Times>, &'static str> {
        contacts(body).map(|n| n.into_iter().map(|n| (n.id, n.first, n.last)).collect())
    }

    #[test]
    fn a_delivery_reads_as_its_contact_ids_each_once() {
        let body = br#"{"event_key":"contact.edit","object_type":"contact",
            "object_keys":[{"id":12,"timestamp":"x"},{"id":"7","apiUrl":""},{"id":12}]}"#;
        assert_eq!(named(body), Ok(vec![(7, None, None), (12, None, None)]));
        assert_eq!(named(br#"{"object_type":"invoice","object_keys":[{"id":1}]}"#), Ok(vec![]));
        assert!(named(b"nope").is_err());
        assert!(named(br#"{"event_key":"contact.edit"}"#).is_err());
        assert!(named(br#"{"object_keys":[{"id":"x"}]}"#).is_err());
    }

    #[test]
    fn each_contact_keeps_its_earliest_and_latest_change_and_no_stamp_wins_over_any() {
        let (t1, t2, t3) =
            ("2026-12-07T03:00:00.001Z", "2026-12-07T03:00:00.002Z", "2026-12-07T03:00:00.003Z");
        let us = |t: &str| stamp::micros(t);
        let body = format!(
            r#"{{"event_key":"contact.edit","object_type":"contact","object_keys":[
                {{"id":1,"timestamp":"{t2}"}},{{"id":1,"timestamp":"{t3}"}},{{"id":1,"timestamp":"{t1}"}},
                {{"id":2,"timestamp":"{t2}"}},{{"id":2,"timestamp":"not a time"}},
                {{"id":3,"timestamp":"{t1}"}},{{"id":3}},
                {{"id":4,"timestamp":"{t3}"}}]}}"#
        );
        assert_eq!(
            named(body.as_bytes()),
            Ok(vec![(1, us(t1), us(t3)), (2, None, None), (3, None, None), (4, us(t3), us(t3))])
        );
    }
}
