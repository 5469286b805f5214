//! The HTTP layer: a request read and recorded, latency and faults applied, dispatched by path;
//! the reply shapes of v1, the gateway and the token endpoint; header and query helpers.

use std::sync::{Arc, Mutex};
use std::time::Instant;

use base64::Engine as _;
use http_body_util::{BodyExt, Full, LengthLimitError, Limited};
use hyper::body::{Bytes, Incoming};
use hyper::header::{HeaderMap, HeaderName, HeaderValue, AUTHORIZATION, CONTENT_TYPE};
use hyper::{Method, Request, Response, StatusCode};
use rand::distr::Alphanumeric;
use rand::Rng;
use serde_json::{json, Value};

use super::server::DropConnection;
use super::{lock, AuthKind, FaultAction, RecordedRequest, Route, State, MAX_BODY, REDACTED};

/// Which part of the fake a path belongs to.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(super) enum Kind {
    Rest,
    Token,
    Other,
}

impl Kind {
    pub(super) fn of(path: &str) -> Kind {
        match path {
            "/token" => Kind::Token,
            p if p == "/crm/rest" || p.starts_with("/crm/rest/") => Kind::Rest,
            _ => Kind::Other,
        }
    }
    pub(super) fn matches(self, route: Route, req: &Req) -> bool {
        match route {
            Route::Any => true,
            Route::Contacts => self == Kind::Rest,
            Route::Token => self == Kind::Token,
            Route::Upsert => req.method == Method::PUT && req.path == "/crm/rest/v1/contacts",
            Route::ApplyTags => {
                req.method == Method::POST
                    && req.path.starts_with("/crm/rest/v1/contacts/")
                    && req.path.ends_with("/tags")
            }
        }
    }
}

/// The parts of a request the handlers look at, body fully read.
pub(super) struct Req {
    pub(super) method: Method,
    pub(super) path: String,
    pub(super) query: String,
    pub(super) headers: HeaderMap,
    pub(super) body: Bytes,
}

/// An answer before it becomes a hyper response; `content_type` "" sends none.
pub(super) struct Reply {
    pub(super) status: u16,
    pub(super) body: String,
    pub(super) content_type: &'static str,
    pub(super) headers: Vec<(String, String)>,
}

pub(super) type Headers = Vec<(String, String)>;

pub(super) fn reply(status: u16, body: String, content_type: &'static str) -> Reply {
    Reply { status, body, content_type, headers: Vec::new() }
}

pub(super) fn json_reply(status: u16, v: &Value) -> Reply {
    reply(status, v.to_string(), "application/json")
}

/// Keap v1's error shape.
pub(super) fn msg(status: u16, text: &str) -> Reply {
    json_reply(status, &json!({ "message": text }))
}

/// The gateway / v2 error shape (also that of Keap's 429).
pub(super) fn v2_error(status: u16, code: Value, text: &str, status_text: &str) -> Reply {
    let body = json!({"code": code, "message": text, "status": status_text, "details": null});
    json_reply(status, &body)
}

/// The token endpoint's OAuth error shape.
pub(super) fn oauth(status: u16, error: &str, description: &str) -> Reply {
    json_reply(status, &json!({ "error": error, "error_description": description }))
}

impl Reply {
    pub(super) fn with_headers(mut self, mut headers: Headers) -> Reply {
        self.headers.append(&mut headers);
        self
    }

    pub(super) fn into_response(self) -> Response<Full<Bytes>> {
        let mut resp = Response::new(Full::new(Bytes::from(self.body)));
        let status = StatusCode::from_u16(self.status);
        *resp.status_mut() = status.unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        let h = resp.headers_mut();
        if !self.content_type.is_empty() {
            h.insert(CONTENT_TYPE, HeaderValue::from_static(self.content_type));
        }
        for (name, value) in self.headers {
            if let (Ok(n), Ok(v)) = (HeaderName::try_from(name), HeaderValue::try_from(value)) {
                h.insert(n, v);
            }
        }
        resp
    }
}

pub(super) type HttpResult = Result<Response<Full<Bytes>>, DropConnection>;

/// Entry point of every request: read, record, then serve (latency, faults, dispatch).
pub(super) async fn handle(state: Arc<Mutex<State>>, req: Request<Incoming>) -> HttpResult {
    let (parts, body) = req.into_parts();
    let (body, too_large) = match Limited::new(body, MAX_BODY).collect().await {
        Ok(b) => (b.to_bytes(), false),
        Err(e) if e.is::<LengthLimitError>() => (Bytes::new(), true),
        Err(_) => return Err(DropConnection), // the client went away mid-body
    };
    let (path, query) = (parts.uri.path(), parts.uri.query().unwrap_or(""));
    let kind = Kind::of(path);
    let secret = kind == Kind::Token;
    let redact = |s: String| {
        if secret && !s.is_empty() {
            REDACTED.into()
        } else {
            s
        }
    };
    let record = RecordedRequest {
        method: parts.method.to_string(),
        path: path.to_owned(),
        query: redact(query.to_owned()),
        status: 0,
        body: redact(String::from_utf8_lossy(&body).into_owned()),
        at: Instant::now(),
        auth: auth_kind(&parts.headers),
    };
    let idx = {
        let mut st = lock(&state);
        st.requests.push(record);
        st.requests.len() - 1
    };
    let req = Req {
        method: parts.method,
        path: path.to_owned(),
        query: query.to_owned(),
        headers: parts.headers,
        body,
    };
    let result = if too_large {
        Ok(msg(413, "Request body too large"))
    } else if kind == Kind::Token {
        // Strict: the token endpoint finishes what it read even if the client hangs up
        // meanwhile (a dropped connection drops this future, not the spawned one), so a
        // client that gives up on a refresh has still spent its refresh token.
        let state = Arc::clone(&state);
        tokio::spawn(async move { serve(&state, &req, kind).await }).await.unwrap_or(Err(DropConnection))
    } else {
        serve(&state, &req, kind).await
    };
    if kind == Kind::Rest {
        super::hooks::kick_after_request(&state);
    }
    let result = result.map(Reply::into_response);
    if let (Ok(resp), Some(r)) = (&result, lock(&state).requests.get_mut(idx)) {
        r.status = resp.status().as_u16();
    }
    result
}

pub(super) async fn serve(state: &Mutex<State>, req: &Req, kind: Kind) -> Result<Reply, DropConnection> {
    let latency = lock(state).opts.latency;
    if kind == Kind::Rest && !latency.is_zero() {
        tokio::time::sleep(latency).await;
    }
    let (mut next_rule, mut drop_after, mut edit) = (0, false, None);
    loop {
        let action = lock(state).next_fault(kind, req, &mut next_rule);
        match action {
            None => break,
            Some(FaultAction::Delay(d)) => tokio::time::sleep(d).await,
            Some(FaultAction::Status(status, body)) => {
                let json = body.trim_start().starts_with(['{', '[']);
                let ctype = if json { "application/json" } else { "text/plain" };
                return Ok(reply(status, body, ctype));
            }
            Some(FaultAction::Redirect(location, status)) => {
                let to = vec![("location".to_owned(), location)];
                return Ok(reply(status, String::new(), "").with_headers(to));
            }
            Some(FaultAction::Drop) => return Err(DropConnection),
            Some(FaultAction::DropAfterCommit) => {
                drop_after = true;
                break;
            }
            Some(FaultAction::EditAnswer(fields)) => {
                edit = Some(fields);
                break;
            }
        }
    }
    let mut answer = lock(state).dispatch(req, kind);
    if let Some(key) = super::hooks::handshake_due(req, &answer) {
        let headers = std::mem::take(&mut answer.headers);
        answer = super::hooks::handshake(state, &key).await.with_headers(headers);
    }
    if drop_after {
        return Err(DropConnection);
    }
    if let Some(Value::Object(fields)) = edit {
        if let Ok(Value::Object(mut body)) = serde_json::from_str::<Value>(&answer.body) {
            for (k, v) in fields {
                if v.is_null() {
                    body.remove(&k);
                } else {
                    body.insert(k, v);
                }
            }
            answer.body = Value::Object(body).to_string();
        }
    }
    Ok(answer)
}

pub(super) fn header<'a>(h: &'a HeaderMap, name: &str) -> Option<&'a str> {
    h.get(name).and_then(|v| v.to_str().ok())
}

/// Whether the media type of `Content-Type` is `want` (parameters like charset ignored).
pub(super) fn content_type_is(h: &HeaderMap, want: &str) -> bool {
    let ct = header(h, CONTENT_TYPE.as_str()).unwrap_or("");
    ct.split(';').next().is_some_and(|t| t.trim().eq_ignore_ascii_case(want))
}

pub(super) fn auth_kind(h: &HeaderMap) -> AuthKind {
    let Some(v) = h.get(AUTHORIZATION) else {
        let key = h.contains_key("x-keap-api-key");
        return if key { AuthKind::ApiKey } else { AuthKind::None };
    };
    let scheme = v.to_str().unwrap_or("").split(' ').next().unwrap_or("");
    if scheme.eq_ignore_ascii_case("bearer") {
        AuthKind::Bearer
    } else if scheme.eq_ignore_ascii_case("basic") {
        AuthKind::Basic
    } else {
        AuthKind::None
    }
}

/// The credential of an `Authorization: <scheme> <credential>` header.
pub(super) fn auth_param<'a>(h: &'a HeaderMap, scheme: &str) -> Option<&'a str> {
    let (s, rest) = header(h, AUTHORIZATION.as_str())?.split_once(' ')?;
    s.eq_ignore_ascii_case(scheme).then(|| rest.trim())
}

pub(super) fn basic_credentials(h: &HeaderMap) -> Option<(String, String)> {
    let raw = base64::engine::general_purpose::STANDARD.decode(auth_param(h, "basic")?);
    let text = String::from_utf8(raw.ok()?).ok()?;
    let (id, secret) = text.split_once(':')?;
    Some((id.to_owned(), secret.to_owned()))
}

pub(super) fn random_token(prefix: &str) -> String {
    let chars = rand::rng().sample_iter(&Alphanumeric).take(40);
    prefix.chars().chain(chars.map(char::from)).collect()
}

/// The first value of `key` in decoded query/form pairs, if not empty.
pub(super) fn field<'a>(pairs: &'a [(String, String)], key: &str) -> Option<&'a str> {
    let found = pairs.iter().find(|(k, _)| k == key);
    found.map(|(_, v)| v.as_str()).filter(|v| !v.is_empty())
}

impl State {
    /// The next fault rule at or after `*from` that fires for this request, using one firing.
    pub(super) fn next_fault(&mut self, kind: Kind, req: &Req, from: &mut usize) -> Option<FaultAction> {
        while let Some(rule) = self.faults.get_mut(*from) {
            *from += 1;
            let p = rule.probability;
            let lucky = p >= 1.0 || (p > 0.0 && rand::random::<f64>() < p);
            if kind.matches(rule.route, req) && rule.skip > 0 {
                rule.skip -= 1;
                continue;
            }
            if kind.matches(rule.route, req) && rule.times != Some(0) && lucky {
                if let Some(n) = rule.times.as_mut() {
                    *n -= 1;
                }
                return Some(rule.action.clone());
            }
        }
        None
    }

    pub(super) fn dispatch(&mut self, req: &Req, kind: Kind) -> Reply {
        match kind {
            Kind::Rest => self.rest(req),
            Kind::Token => self.token(req),
            Kind::Other => msg(404, "Not Found"),
        }
    }
}

/// Splits `a=1&b=2` (query or form body) into decoded pairs; `None` on bad percent-encoding.
pub(super) fn parse_pairs(s: &str) -> Option<Vec<(String, String)>> {
    let pairs = s.split('&').filter(|p| !p.is_empty());
    pairs
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            Some((url_decode(k)?, url_decode(v)?))
        })
        .collect()
}

pub(super) fn url_decode(s: &str) -> Option<String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while let Some(&b) = bytes.get(i) {
        match b {
            b'+' => out.push(b' '),
            b'%' => {
                let hex = bytes.get(i + 1..i + 3).filter(|h| h.iter().all(u8::is_ascii_hexdigit))?;
                out.push(u8::from_str_radix(std::str::from_utf8(hex).ok()?, 16).ok()?);
                i += 2;
            }
            _ => out.push(b),
        }
        i += 1;
    }
    String::from_utf8(out).ok()
}
