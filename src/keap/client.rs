//! The Keap REST v1 contact client.
//!
//! Three calls are all the daemon needs: upsert by email (`PUT /v1/contacts` with
//! `duplicate_option=Email`), update by id (`PATCH /v1/contacts/{id}` with an `update_mask`
//! naming only the fields we own, so Keap's other fields are never touched) and delete by id.
//! Every call waits for the shared rate limiter first and has a timeout.
//!
//! Errors carry a [`ErrorKind`] so the delivery loop can decide without parsing text: retry
//! later, refresh the token, re-link, or park the change for a human. Keap's error bodies come
//! in several shapes (`docs/keap-api.md`, "Error bodies"); all of them are reduced to one message.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use reqwest::StatusCode;

use serde_json::{Map, Value};

use super::model::{ByEmail, Contact, ContactList, ErrorBody, ObjectModel, RestHook, Tag, TagPage};
use super::route::{self, Route};
use super::TagsApplied;
use crate::metrics::Metrics;
use crate::ratelimit::Limiter;
use crate::secret::Secret;

/// How a request is authenticated.
#[derive(Debug, Clone)]
pub(crate) enum Auth {
    /// OAuth access token: `Authorization: Bearer …`.
    Bearer(Secret),
    /// Personal Access Token / Service Account Key: `X-Keap-API-Key: …`.
    ApiKey(Secret),
}

/// What the caller should do about a failed call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ErrorKind {
    /// Network trouble, timeout, 5xx, a redirect (never followed), or a reply that is unreadable
    /// or over the size cap: try again later.
    Transient,
    /// 429: everyone should slow down, then try again.
    Throttled,
    /// 401: the credential was refused; refresh it (OAuth) or fix it (API key).
    Unauthorized,
    /// 403: the credential is known but lacks the right (a key or app without access to
    /// contacts). Not the change's fault, so it is never parked: deliveries pause and probe.
    Forbidden,
    /// 404 on a contact id: the contact is gone in Keap; re-link by email.
    NotFound,
    /// Any other 4xx: this payload will never be accepted as it is.
    Rejected,
}

impl ErrorKind {
    /// Retrying the same request later may succeed.
    pub(crate) fn is_retryable(self) -> bool {
        matches!(self, ErrorKind::Transient | ErrorKind::Throttled)
    }
}

/// A failed Keap call. `Display` is one line for logs and the failure list; no credential is
/// ever part of it (bodies are Keap's answers, which hold contact data, not tokens).
#[derive(Debug, Clone)]
pub(crate) struct KeapError {
    pub kind: ErrorKind,
    /// HTTP status, if an answer arrived.
    pub status: Option<u16>,
    /// `PUT /v1/contacts` etc.
    pub request: String,
    pub message: String,
    /// The raw answer body (trimmed to 2,000 bytes), for the failure record.
    pub body: Option<String>,
    /// For a 429: how long every sender now pauses.
    pub retry_after: Option<Duration>,
}

impl fmt::Display for KeapError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.status {
            Some(status) => write!(f, "Keap answered {status} to {}: {}", self.request, self.message),
            None => write!(f, "{} failed: {}", self.request, self.message),
        }
    }
}

impl std::error::Error for KeapError {}

/// Client for Keap's REST v1 contacts API.
#[derive(Clone)]
pub(crate) struct KeapClient {
    http: reqwest::Client,
    api_url: String,
    limiter: Arc<Limiter>,
    metrics: Arc<Metrics>,
    request_timeout: Duration,
    connect_timeout: Duration,
}

impl KeapClient {
    /// `api_url` is the REST base, e.g. `https://api.infusionsoft.com/crm/rest`.
    pub(crate) fn new(
        api_url: &str,
        request_timeout: Duration,
        connect_timeout: Duration,
        limiter: Arc<Limiter>,
        metrics: Arc<Metrics>,
    ) -> Result<Self, String> {
        Ok(KeapClient {
            http: http_client(request_timeout, connect_timeout)?,
            api_url: api_url.trim_end_matches('/').to_owned(),
            limiter,
            metrics,
            request_timeout,
            connect_timeout,
        })
    }

    /// Creates the contact, or updates the one that already has this email
    /// (`PUT /v1/contacts`, `duplicate_option` in the body). Safe to repeat: a retry after a
    /// lost reply finds the contact the first attempt created.
    pub(crate) async fn upsert_contact(
        &self,
        auth: &Auth,
        body: &Map<String, Value>,
        deadline: Instant,
    ) -> Result<Contact, KeapError> {
        let req = Request { route: Route::upsert_contact(), deadline };
        self.call(auth, req, Some(body)).await
    }

    /// Updates only the properties named in `mask` on contact `id` (`PATCH /v1/contacts/{id}`).
    pub(crate) async fn update_contact(
        &self,
        auth: &Auth,
        id: i64,
        body: &Map<String, Value>,
        mask: &[&'static str],
        deadline: Instant,
    ) -> Result<Contact, KeapError> {
        let req = Request { route: Route::update_contact(id, mask), deadline };
        self.call(auth, req, Some(body)).await
    }

    /// The contacts Keap lists for `email` (`GET /v1/contacts?email=…`), sorted by slot
    /// ([`ByEmail`]): the lowest-id contact whose EMAIL1 is the address, and those that hold it
    /// only in another slot. Keap may match any slot, or partially (undocumented), so the
    /// answer is checked here rather than trusted. A read before a first write, so a contact
    /// that already exists is linked and updated property by property, never overwritten
    /// whole. `optional` names properties Keap returns only when asked (`custom_fields`).
    pub(crate) async fn find_by_email(
        &self,
        auth: &Auth,
        email: &str,
        optional: &[&str],
        deadline: Instant,
    ) -> Result<ByEmail, KeapError> {
        let req = Request { route: Route::find_by_email(email, optional), deadline };
        let name = req.name();
        let text = self.send(auth, req, None::<&()>).await?;
        let list: ContactList =
            serde_json::from_str(&text).map_err(|e| unreadable(name.clone(), &e, &text))?;
        let mut contacts = Vec::with_capacity(list.contacts.len());
        for c in list.contacts {
            contacts.push(Contact::from_json(c).map_err(|e| bad_reply(name.clone(), &e))?);
        }
        Ok(ByEmail::of(email, contacts))
    }

    /// Contact `id` as Keap holds it (`GET /v1/contacts/{id}`), to learn the slots of its array
    /// properties before one is written (an array is replaced whole), and its tags.
    pub(crate) async fn get_contact(
        &self,
        auth: &Auth,
        id: i64,
        optional: &[&str],
        deadline: Instant,
    ) -> Result<Contact, KeapError> {
        let req = Request { route: Route::get_contact(id, optional), deadline };
        self.call(auth, req, None::<&()>).await
    }

    /// Deletes contact `id`; a contact that is already gone counts as deleted.
    pub(crate) async fn delete_contact(
        &self,
        auth: &Auth,
        id: i64,
        deadline: Instant,
    ) -> Result<(), KeapError> {
        let req = Request { route: Route::delete_contact(id), deadline };
        match self.send(auth, req, None::<&()>).await {
            Ok(_) => Ok(()),
            Err(e) if e.kind == ErrorKind::NotFound => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// One page of the v2 listing ([`Route::list_contacts`]), read into v1 shape.
    pub(crate) async fn list_contacts(
        &self,
        auth: &Auth,
        route: Route,
        deadline: Instant,
    ) -> Result<super::v2::Page, KeapError> {
        let req = Request { route, deadline };
        let name = req.name();
        let text = self.send(auth, req, None::<&()>).await?;
        super::v2::read_page(&text).map_err(|e| bad_reply(name, &e))
    }

    /// Keap's contact model (`GET /v1/contacts/model`): the custom fields.
    pub(crate) async fn contact_model(
        &self,
        auth: &Auth,
        deadline: Instant,
    ) -> Result<ObjectModel, KeapError> {
        let req = Request { route: Route::contact_model(), deadline };
        let name = req.name();
        let text = self.send(auth, req, None::<&()>).await?;
        serde_json::from_str(&text).map_err(|e| unreadable(name, &e, &text))
    }

    /// The id of the tag named exactly `name`, the lowest if several (`GET /v1/tags?name=…`;
    /// Keap's filter may match more than the exact name, so the answer is filtered here).
    pub(crate) async fn find_tag(
        &self,
        auth: &Auth,
        name: &str,
        deadline: Instant,
    ) -> Result<Option<i64>, KeapError> {
        let req = Request { route: Route::find_tag(name), deadline };
        let what = req.name();
        let text = self.send(auth, req, None::<&()>).await?;
        let page: TagPage = serde_json::from_str(&text).map_err(|e| unreadable(what, &e, &text))?;
        let exact = page.tags.iter().filter(|t| t.name.as_deref() == Some(name)).map(|t| t.id).min();
        Ok(exact)
    }

    /// One page of the tag catalogue ([`Route::list_tags`]), categories included.
    pub(crate) async fn list_tags(
        &self,
        auth: &Auth,
        limit: usize,
        offset: usize,
        deadline: Instant,
    ) -> Result<TagPage, KeapError> {
        let req = Request { route: Route::list_tags(limit, offset), deadline };
        let what = req.name();
        let text = self.send(auth, req, None::<&()>).await?;
        serde_json::from_str(&text).map_err(|e| unreadable(what, &e, &text))
    }

    /// Creates a tag (`POST /v1/tags`) and returns its id.
    pub(crate) async fn create_tag(
        &self,
        auth: &Auth,
        name: &str,
        deadline: Instant,
    ) -> Result<i64, KeapError> {
        let req = Request { route: Route::create_tag(), deadline };
        let what = req.name();
        let text = self.send(auth, req, Some(&route::new_tag(name))).await?;
        let tag: Tag = serde_json::from_str(&text).map_err(|e| unreadable(what, &e, &text))?;
        Ok(tag.id)
    }

    /// Applies tags to a contact in one call (`POST /v1/contacts/{id}/tags`) and reads Keap's
    /// answer tag by tag ([`TagsApplied::read`]).
    pub(crate) async fn apply_tags(
        &self,
        auth: &Auth,
        contact: i64,
        ids: &[i64],
        deadline: Instant,
    ) -> Result<TagsApplied, KeapError> {
        let req = Request { route: Route::apply_tags(contact), deadline };
        let text = self.send(auth, req, Some(&route::tag_ids(ids))).await?;
        Ok(TagsApplied::read(ids, &text))
    }

    /// Removes tags from a contact in one call (`DELETE /v1/contacts/{id}/tags?ids=1,2`); a
    /// contact already gone counts as done.
    pub(crate) async fn remove_tags(
        &self,
        auth: &Auth,
        contact: i64,
        ids: &[i64],
        deadline: Instant,
    ) -> Result<(), KeapError> {
        let req = Request { route: Route::remove_tags(contact, ids), deadline };
        match self.send(auth, req, None::<&()>).await {
            Ok(_) => Ok(()),
            Err(e) if e.kind == ErrorKind::NotFound => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// Opts an email address out of marketing (`PUT /v1/emailAddresses/{email}`).
    pub(crate) async fn opt_out(
        &self,
        auth: &Auth,
        email: &str,
        reason: &str,
        deadline: Instant,
    ) -> Result<(), KeapError> {
        let req = Request { route: Route::opt_out(Some(email)), deadline };
        self.send(auth, req, Some(&route::opt_out(reason))).await.map(|_| ())
    }

    /// Every hook subscription of the app (`GET /v1/hooks`), ours and others'.
    pub(crate) async fn list_hooks(
        &self,
        auth: &Auth,
        deadline: Instant,
    ) -> Result<Vec<RestHook>, KeapError> {
        self.read_json(auth, Route::list_hooks(), None, deadline).await
    }

    /// The event keys a hook may subscribe to (`GET /v1/hooks/event_keys`).
    pub(crate) async fn hook_event_keys(
        &self,
        auth: &Auth,
        deadline: Instant,
    ) -> Result<Vec<String>, KeapError> {
        self.read_json(auth, Route::hook_event_keys(), None, deadline).await
    }

    /// Subscribes `hook_url` to `event_key` (`POST /v1/hooks`); Keap runs the handshake before
    /// it answers, so the hook comes back Verified when the receiver echoed it.
    pub(crate) async fn create_hook(
        &self,
        auth: &Auth,
        event_key: &str,
        hook_url: &str,
        deadline: Instant,
    ) -> Result<RestHook, KeapError> {
        let body = route::new_hook(event_key, hook_url);
        self.read_json(auth, Route::create_hook(), Some(&body), deadline).await
    }

    /// Runs the handshake of hook `key` again (`POST /v1/hooks/{key}/verify`).
    pub(crate) async fn verify_hook(
        &self,
        auth: &Auth,
        key: &str,
        deadline: Instant,
    ) -> Result<RestHook, KeapError> {
        // No body is defined, but Keap wants a POST's content type to be JSON.
        let empty = Value::Object(Map::new());
        self.read_json(auth, Route::verify_hook(key), Some(&empty), deadline).await
    }

    /// Deletes hook `key` (`DELETE /v1/hooks/{key}`); one already gone counts as deleted.
    pub(crate) async fn delete_hook(
        &self,
        auth: &Auth,
        key: &str,
        deadline: Instant,
    ) -> Result<(), KeapError> {
        let req = Request { route: Route::delete_hook(key), deadline };
        match self.send(auth, req, None::<&()>).await {
            Ok(_) => Ok(()),
            Err(e) if e.kind == ErrorKind::NotFound => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// Sends `route` (with `body`) and reads the answer as `T`.
    async fn read_json<T: serde::de::DeserializeOwned>(
        &self,
        auth: &Auth,
        route: Route,
        body: Option<&Value>,
        deadline: Instant,
    ) -> Result<T, KeapError> {
        let req = Request { route, deadline };
        let name = req.name();
        let text = self.send(auth, req, body).await?;
        serde_json::from_str(&text).map_err(|e| unreadable(name, &e, &text))
    }

    /// Sends a request whose answer is a contact and reads it; an answer that is not one is an error
    /// naming the request.
    async fn call<B: serde::Serialize>(
        &self,
        auth: &Auth,
        req: Request,
        body: Option<&B>,
    ) -> Result<Contact, KeapError> {
        let name = req.name();
        let text = self.send(auth, req, body).await?;
        let json: Value = serde_json::from_str(&text).map_err(|e| unreadable(name.clone(), &e, &text))?;
        Contact::from_json(json).map_err(|e| bad_reply(name, &e))
    }

    /// One call: admitted by the limiter, sent with the credential, its answer read and
    /// classified. `Ok` holds the body of a 2xx.
    async fn send<B: serde::Serialize>(
        &self,
        auth: &Auth,
        req: Request,
        body: Option<&B>,
    ) -> Result<String, KeapError> {
        let request = req.name();
        let permit = self.admit(&req).await.ok_or_else(|| {
            transient(&request, "not sent: the claim's lease would run out before the call could finish")
        })?;
        let route = &req.route;
        let mut builder = self
            .http
            .request(route.method.clone(), format!("{}{}", self.api_url, route.path))
            .query(&route.query);
        builder = authorize(builder, auth, &request)?;
        if let Some(body) = body {
            builder = builder.json(body);
        }
        let started = std::time::Instant::now();
        let sent = builder.send().await;
        // The call has reached Keap, or never will: its per-minute slot ages from now
        // (ARCHITECTURE.md, invariant 15).
        drop(permit);
        let method = route.method_name();
        let response = sent.map_err(|e| {
            self.metrics.keap_call(method, 0, started.elapsed().as_secs_f64());
            transient(&request, &describe_reqwest(&e))
        })?;
        self.metrics.keap_call(method, response.status().as_u16(), started.elapsed().as_secs_f64());
        self.answer(response, request).await
    }

    /// Waits for the limiter, only as long as the call could still finish before the claim's
    /// deadline (a quota pause can last hours): `None` gives the claim back rather than risk a
    /// second delivery of the same user.
    async fn admit(&self, req: &Request) -> Option<crate::ratelimit::Permit<'_>> {
        let call = self.request_timeout + self.connect_timeout;
        let latest_start = req.deadline.checked_sub(call)?;
        let permit = tokio::time::timeout_at(latest_start, self.limiter.until_ready()).await.ok()?;
        (Instant::now() + call <= req.deadline).then_some(permit)
    }

    /// Reads Keap's answer: tells the limiter about its headers (a 429 pauses every sender),
    /// refuses a redirect, reads the body up to the cap, and classifies a failure.
    async fn answer(&self, response: reqwest::Response, request: String) -> Result<String, KeapError> {
        let status = response.status();
        self.limiter.observe(status.as_u16(), response.headers());
        let retry_after = (status == StatusCode::TOO_MANY_REQUESTS).then(|| {
            self.metrics.throttled();
            self.limiter.throttled(response.headers())
        });
        if status.is_redirection() {
            // Not followed (ARCHITECTURE.md, invariant 16). Transient, not a rejection: a
            // redirect says where the API is, nothing about this payload, so parking would put
            // every change aside for a person to replay one by one. Retried with the usual
            // backoff (capped at `delivery.retry_max_secs`), it cannot loop or hammer, and it
            // goes through once the endpoint answers again or `keap.api_url` is corrected.
            let message = super::redirect_refused(&response, "keap.api_url (KEAP_API_URL)");
            return Err(KeapError { status: Some(status.as_u16()), ..transient(&request, &message) });
        }
        // Capped (invariant 16); an answer we cannot read is retried like a lost one.
        let text = super::read_reply(response).await.map_err(|e| KeapError {
            status: Some(status.as_u16()),
            ..transient(&request, &e.to_string())
        })?;
        if status.is_success() {
            return Ok(text);
        }
        Err(KeapError { retry_after, ..classify(status, request, &text) })
    }
}

/// A call that failed before Keap answered, or whose answer could not be read: retried later.
fn transient(request: &str, message: &str) -> KeapError {
    KeapError {
        kind: ErrorKind::Transient,
        status: None,
        request: request.to_owned(),
        message: message.to_owned(),
        body: None,
        retry_after: None,
    }
}

/// Adds the credential's header. An API key is marked sensitive like the bearer header, so
/// no `Debug` of the request shows it.
fn authorize(
    builder: reqwest::RequestBuilder,
    auth: &Auth,
    request: &str,
) -> Result<reqwest::RequestBuilder, KeapError> {
    Ok(match auth {
        Auth::Bearer(token) => builder.bearer_auth(token.expose()),
        Auth::ApiKey(key) => {
            let mut value = reqwest::header::HeaderValue::from_str(key.expose()).map_err(|_| KeapError {
                kind: ErrorKind::Unauthorized,
                ..transient(request, "the API key contains characters not allowed in an HTTP header")
            })?;
            value.set_sensitive(true);
            builder.header("X-Keap-API-Key", value)
        }
    })
}

/// A 2xx whose JSON lacks what the API promises: transient, like [`unreadable`].
fn bad_reply(request: String, why: &str) -> KeapError {
    KeapError {
        kind: ErrorKind::Transient,
        status: None,
        request,
        message: format!("Keap's answer is not what its API promises: {why}"),
        body: None,
        retry_after: None,
    }
}

/// A 2xx whose body is not what the API promises: transient (a proxy's page, a cut reply).
fn unreadable(request: String, e: &serde_json::Error, text: &str) -> KeapError {
    KeapError {
        kind: ErrorKind::Transient,
        status: None,
        request,
        message: format!("unreadable answer from Keap ({e})"),
        body: Some(truncate(text)),
        retry_after: None,
    }
}

/// One call to make: where, and by when it must be done.
struct Request {
    route: Route,
    deadline: Instant,
}

impl Request {
    /// `PATCH /v1/contacts/7`, for messages.
    fn name(&self) -> String {
        self.route.name()
    }
}

/// Builds the HTTP client every Keap call uses (contacts, the token refresh, `auth login`'s code
/// exchange): rustls with the platform's trust store, timeouts on connect and on the whole
/// request, and no redirect ever followed, so no credential is carried to wherever a 3xx
/// points (ARCHITECTURE.md, invariant 16); callers report a 3xx with
/// [`super::redirect_refused`].
pub(crate) fn http_client(
    request_timeout: Duration,
    connect_timeout: Duration,
) -> Result<reqwest::Client, String> {
    crate::tls::http()
        .timeout(request_timeout)
        .connect_timeout(connect_timeout)
        .user_agent(concat!("keap-sync/", env!("CARGO_PKG_VERSION")))
        .pool_idle_timeout(Duration::from_secs(60))
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .map_err(|e| format!("cannot build the HTTP client: {e}"))
}

/// The error a non-2xx answer is: 401, 403 and 404 their own kinds, 429 throttled, other 4xx
/// rejected, 408, 425 and the rest transient; the message is Keap's own when its body has one.
fn classify(status: StatusCode, request: String, text: &str) -> KeapError {
    let parsed: Option<ErrorBody> = serde_json::from_str(text).ok();
    let message =
        parsed.as_ref().and_then(ErrorBody::summary).unwrap_or_else(|| match status.canonical_reason() {
            Some(reason) if text.trim().is_empty() => reason.to_owned(),
            _ => truncate(text.trim()),
        });
    let kind = match status.as_u16() {
        401 => ErrorKind::Unauthorized,
        403 => ErrorKind::Forbidden,
        404 => ErrorKind::NotFound,
        408 | 425 => ErrorKind::Transient,
        429 => ErrorKind::Throttled,
        400..=499 => ErrorKind::Rejected,
        _ => ErrorKind::Transient,
    };
    KeapError {
        kind,
        status: Some(status.as_u16()),
        request,
        message,
        body: Some(truncate(text)),
        retry_after: None,
    }
}

/// One line for a failed request: what kind of failure, then its innermost cause.
pub(crate) fn describe_reqwest(e: &reqwest::Error) -> String {
    // reqwest's Display includes the URL, which never holds a credential here (ids only);
    // add the innermost cause, which is where "connection refused" and friends live.
    let mut message = if e.is_timeout() {
        "timed out".to_owned()
    } else if e.is_connect() {
        "could not connect".to_owned()
    } else {
        "request failed".to_owned()
    };
    let mut source = std::error::Error::source(e);
    let mut last = None;
    while let Some(s) = source {
        last = Some(s.to_string());
        source = s.source();
    }
    if let Some(last) = last {
        message.push_str(": ");
        message.push_str(&last);
    }
    message
}

/// `text` cut to at most 2,000 bytes on a character boundary, so an error never carries a whole page.
fn truncate(text: &str) -> String {
    const MAX: usize = 2_000;
    if text.len() <= MAX {
        return text.to_owned();
    }
    let mut end = MAX;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &text[..end])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_are_classified() {
        let k =
            |s: u16, body: &str| classify(StatusCode::from_u16(s).unwrap(), "PUT /v1/contacts".into(), body);
        assert_eq!(k(400, r#"{"message":"Email address is invalid"}"#).kind, ErrorKind::Rejected);
        assert_eq!(k(400, r#"{"message":"Email address is invalid"}"#).message, "Email address is invalid");
        assert_eq!(k(401, "").kind, ErrorKind::Unauthorized);
        let forbidden = k(403, r#"{"code":403,"message":"Forbidden","status":"Forbidden"}"#);
        assert_eq!((forbidden.kind, forbidden.message.as_str()), (ErrorKind::Forbidden, "Forbidden"));
        assert!(!forbidden.kind.is_retryable());
        assert_eq!(k(404, r#"{"code":404,"message":"Record not found"}"#).kind, ErrorKind::NotFound);
        let throttled = k(
            429,
            r#"{"code":"429","message":"Quota Exceeded","status":"Request Throttled","details":null}"#,
        );
        assert_eq!(throttled.kind, ErrorKind::Throttled);
        assert_eq!(throttled.message, "Quota Exceeded");
        assert_eq!(k(500, "<html>oops</html>").kind, ErrorKind::Transient);
        assert_eq!(k(503, "").message, "Service Unavailable");
        assert!(k(502, "").kind.is_retryable());
        assert!(!k(400, "{}").kind.is_retryable());
    }

    #[test]
    fn display_is_one_line() {
        let e = classify(StatusCode::BAD_REQUEST, "PUT /v1/contacts".into(), r#"{"message":"bad"}"#);
        assert_eq!(e.to_string(), "Keap answered 400 to PUT /v1/contacts: bad");
    }

    #[test]
    fn long_bodies_are_cut_on_a_char_boundary() {
        let long = "é".repeat(3_000);
        let cut = truncate(&long);
        assert!(cut.len() <= 2_000 + '…'.len_utf8());
    }
}
