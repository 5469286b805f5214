//! A stateful fake of Keap's REST v1 contact, tag and email-address API and OAuth token endpoint, served over real
//! HTTP/1.1 on 127.0.0.1 for the integration tests, the benchmarks and the demo.
//!
//! It is an independent witness, on purpose: its wire types (module `wire`, re-exported here as
//! [`ContactWrite`], [`Contact`], [`TokenGrant`], …) are its own, written from Keap's published
//! v1 OpenAPI schemas, and it uses nothing of the daemon's (not `keap_sync`'s `keap::model`, nor any other
//! module: this crate's only link to keap-sync is the harness in `app`). A property the client misnames is therefore refused here, as Keap would refuse
//! it, instead of being misnamed on both sides while the tests pass.
//!
//! It follows the Keap facts summarised in `docs/keap-api.md` and, wherever a behaviour is
//! unverified, plays the strictest variant, so a client that survives the fake survives Keap:
//! - refresh tokens are single use with no grace period (a reused one answers 400
//!   `invalid_grant`); the access token issued with a spent refresh token stays valid until its
//!   own expiry; the refresh grant accepts client credentials only as HTTP Basic;
//! - a token request, once read, is carried out even if the client hangs up before the answer
//!   (its refresh token is spent and the new pair is never seen by the client);
//! - `PUT /v1/contacts` answers 200 for both create and update (the only declared status) and
//!   needs `duplicate_option`; when several contacts share the email the lowest id wins;
//! - 429s carry no `Retry-After`; requests refused with 429 do not use up quota;
//! - unmodelled JSON properties (also inside array items), enum values not spelled exactly as
//!   the spec does, non-JSON write bodies and `Authorization: Bearer <api key>` are rejected;
//!   `update_mask` takes repeated parameters only (no comma lists);
//! - every v1 contact property is stored and checked (module `rules`: lengths, email shape, a
//!   region only with a country code, alpha-3 country codes, `zip_code` or `postal_code`,
//!   dates, ids, custom fields against the model and their type), each refusal a v1 400;
//! - array properties (`email_addresses`, `phone_numbers`, `addresses`, `custom_fields`) are
//!   replaced whole when written: a slot left out is gone;
//! - `custom_fields`, `job_title` and `lead_source_id` are answered only when asked for in
//!   `optional_properties`; list items carry no `tag_ids` or `opt_in_reason`;
//! - the tag catalogue's `name` filter matches by substring (clients must filter exactly), the
//!   tag-apply answer is an object keyed by tag id (`SUCCESS`, `DUPLICATE`,
//!   `TAG_ID_NOT_FOUND`), more than 100 ids per call is refused; an opt-out
//!   (`PUT /v1/emailAddresses/{email}`) of an address no contact has answers 404;
//! - FullContact answers carry properties the daemon does not model, so its parser must
//!   ignore unknown fields as it has to with Keap.
//!
//! The server never listens beyond loopback: its credentials are fixed and guessable.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet, VecDeque};
use std::fmt;
use std::io;
use std::net::{Ipv4Addr, SocketAddr, TcpListener as StdListener};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use http_body_util::{BodyExt, Full, LengthLimitError, Limited};
use hyper::body::{Bytes, Incoming};
use hyper::header::{HeaderMap, HeaderName, HeaderValue, AUTHORIZATION, CONTENT_TYPE};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use rand::distr::Alphanumeric;
use rand::Rng;
use serde_json::{json, Map, Value};
use tokio::sync::watch;
use tokio::task::JoinHandle;

mod other_host;
mod rules;
mod wire;

pub use other_host::{Arrival, OtherHost};
pub use wire::{Contact, ContactList, ContactWrite, DuplicateOption, EmailAddress, EmailField, TokenGrant};

use rules::{CustomField, Write};

/// The `scope` Keap returns with every grant: `full|<app>.infusionsoft.com` names the tenant.
pub const FAKE_SCOPE: &str = "full|fake123.infusionsoft.com";
/// The Keap app (account) of [`FAKE_SCOPE`]: grants are for it unless a test asks for another
/// with [`FakeKeap::issue_grant_for`] or [`FakeKeap::issue_code_for`].
pub const FAKE_ACCOUNT: &str = "fake123.infusionsoft.com";
/// Largest request body read; anything bigger answers 413 instead of growing memory.
const MAX_BODY: usize = 1 << 20;
/// First contact id handed out, so ids never look like small row numbers by accident.
const FIRST_ID: i64 = 1001;
/// First tag id, and first custom field id: distinct ranges, so a mix-up shows.
const FIRST_TAG_ID: i64 = 101;
const FIRST_FIELD_ID: i64 = 11;
const DAY_MS: u64 = 86_400_000;
/// Property names `update_mask` accepts on `PATCH /v1/contacts/{id}` (`docs/keap-api.md`).
const UPDATE_MASK_VALUES: &str = "addresses anniversary birthday company contact_type \
    custom_fields email_addresses family_name fax_numbers given_name job_title lead_source_id \
    middle_name notes opt_in_reason origin owner_id phone_numbers preferred_locale \
    preferred_name prefix social_accounts source_type spouse_name suffix time_zone website";
/// Keap v1's answer to a body it cannot read as a contact.
const BAD_INPUT: &str = "Input could not be converted to a valid request";
const REDACTED: &str = "<redacted>";

/// How the fake starts: credentials, limits and speed. Limits left `None` are not enforced,
/// but the throttle/quota headers still report Keap's documented defaults (1,500/min and
/// 150,000/day for OAuth, 240/min and 30,000/day for API keys) so header readers see real values.
#[derive(Clone)]
pub struct FakeOptions {
    /// Lifetime of every access token minted from now on (Keap: 24 h).
    pub access_token_lifetime: Duration,
    /// OAuth client id the token endpoint accepts.
    pub client_id: String,
    /// OAuth client secret the token endpoint accepts.
    pub client_secret: String,
    /// Spike limit: requests per rolling second per credential.
    pub per_second_limit: Option<u32>,
    /// Throttle: requests per rolling 60 s per credential.
    pub per_minute_limit: Option<u32>,
    /// Quota: requests per UTC day per credential.
    pub daily_quota: Option<u64>,
    /// Added before every `/crm/rest` answer, to model a distant server.
    pub latency: Duration,
}

impl Default for FakeOptions {
    fn default() -> Self {
        FakeOptions {
            access_token_lifetime: Duration::from_secs(86_400),
            client_id: "fake-client-id".into(),
            client_secret: "fake-client-secret".into(),
            per_second_limit: None,
            per_minute_limit: None,
            daily_quota: None,
            latency: Duration::ZERO,
        }
    }
}

/// Hand-written so a debug print of the options never shows the client secret.
impl fmt::Debug for FakeOptions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FakeOptions")
            .field("access_token_lifetime", &self.access_token_lifetime)
            .field("client_id", &self.client_id)
            .field("client_secret", &REDACTED)
            .field("per_second_limit", &self.per_second_limit)
            .field("per_minute_limit", &self.per_minute_limit)
            .field("daily_quota", &self.daily_quota)
            .field("latency", &self.latency)
            .finish()
    }
}

/// Which kind of credential a request presented, so tests can assert how the client
/// authenticated without the log ever holding a secret.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthKind {
    /// No credential header (or an `Authorization` scheme other than Bearer/Basic).
    None,
    /// `Authorization: Bearer …`.
    Bearer,
    /// `X-Keap-API-Key: …` (and no `Authorization` header).
    ApiKey,
    /// `Authorization: Basic …` (the token endpoint's client authentication).
    Basic,
}

/// One request as the fake received it. Holds no credential: `/token` bodies and queries are
/// stored as `<redacted>`, headers are reduced to [`AuthKind`], so `Debug` is safe to print.
#[derive(Debug, Clone)]
pub struct RecordedRequest {
    /// HTTP method, e.g. `PUT`.
    pub method: String,
    /// Path without the query string.
    pub path: String,
    /// Raw query string ("" when none).
    pub query: String,
    /// Status answered; 0 when no answer was sent (dropped connection, cut by `set_down`).
    pub status: u16,
    /// Request body as text (lossy UTF-8); `<redacted>` for `/token`.
    pub body: String,
    /// When the request (head and body) had been received.
    pub at: Instant,
    /// Which credential header was presented (never its value).
    pub auth: AuthKind,
}

/// Which requests a [`FaultRule`] applies to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route {
    /// Every request, whatever the path.
    Any,
    /// Everything under `/crm/rest`.
    Contacts,
    /// `/token`.
    Token,
    /// `PUT /crm/rest/v1/contacts` only: the create-or-update by email.
    Upsert,
    /// `POST /crm/rest/v1/contacts/{id}/tags` only: applying tags.
    ApplyTags,
}

/// What a firing [`FaultRule`] does to the request.
#[derive(Debug, Clone, PartialEq)]
pub enum FaultAction {
    /// Answer this status and body without touching state (a gateway error).
    Status(u16, String),
    /// Wait, then go on with the remaining rules and normal processing.
    Delay(Duration),
    /// Close the connection without answering and without performing the request.
    Drop,
    /// Perform the request, then close the connection without answering: a lost reply.
    DropAfterCommit,
    /// Perform the request, then answer its JSON object with each top-level field of this
    /// object put in (a `null` removes the field), same status: a well-formed answer whose
    /// content the client must judge, e.g. a token answer Keap rotated the pair for but with a
    /// field the client refuses.
    EditAnswer(Value),
    /// Answer this 3xx status with `Location: <the string>` and an empty body, without
    /// touching state: a moved endpoint, or a hijacked one sending credentials elsewhere
    /// (point it at an [`OtherHost`] to see what would follow).
    Redirect(String, u16),
}

/// A fault to inject. Rules are checked in insertion order before a request is processed
/// (after the configured latency); `Delay` rules add up, the first other rule that fires decides.
#[derive(Debug, Clone, PartialEq)]
pub struct FaultRule {
    /// Requests the rule applies to.
    pub route: Route,
    /// What it does when it fires.
    pub action: FaultAction,
    /// How many more times the rule may fire; `None` = forever. Only firings count.
    pub times: Option<u32>,
    /// Chance that the rule fires on a matching request, 0..=1.
    pub probability: f64,
}

impl FaultRule {
    /// A rule that fires on every matching request, forever.
    pub fn new(route: Route, action: FaultAction) -> Self {
        let (times, probability) = (None, 1.0);
        FaultRule { route, action, times, probability }
    }
    /// Limits the rule to its next `n` firings.
    pub fn times(self, n: u32) -> Self {
        FaultRule { times: Some(n), ..self }
    }
    /// Makes the rule fire on a matching request with probability `p` only.
    pub fn probability(self, p: f64) -> Self {
        FaultRule { probability: p, ..self }
    }
}

/// Handle to a running fake Keap server. Clones share one server; it stops when the last
/// clone is dropped or when [`FakeKeap::shutdown`] is called on any clone.
#[derive(Clone)]
pub struct FakeKeap {
    inner: Arc<Inner>,
}

struct Inner {
    state: Arc<Mutex<State>>,
    addr: SocketAddr,
    rt: tokio::runtime::Handle,
    /// Bumped to cut every open connection (down, shutdown); dropping it does the same.
    cut: watch::Sender<u64>,
    control: Arc<Mutex<Control>>,
}

#[derive(Default)]
struct Control {
    stopped: bool,
    down: bool,
    /// A duplicate of the listening socket, kept to shut the socket down synchronously.
    listener: Option<StdListener>,
    accept: Option<JoinHandle<()>>,
    /// Duplicates of the open connections' sockets, by connection number, for the same reason.
    conns: HashMap<u64, std::net::TcpStream>,
    next_conn: u64,
}

/// Registers a connection's socket for `take_down` and unregisters it when the connection
/// task ends (or is dropped), so the duplicate never keeps a finished socket open.
struct ConnGuard {
    control: Arc<Mutex<Control>>,
    id: u64,
}

impl ConnGuard {
    fn new(control: &Arc<Mutex<Control>>, stream: &tokio::net::TcpStream) -> ConnGuard {
        let mut ctl = lock(control);
        let id = ctl.next_conn;
        ctl.next_conn += 1;
        if let Some(dup) = dup_stream(stream) {
            ctl.conns.insert(id, dup);
        }
        ConnGuard { control: Arc::clone(control), id }
    }
}

impl Drop for ConnGuard {
    fn drop(&mut self) {
        lock(&self.control).conns.remove(&self.id);
    }
}

#[cfg(unix)]
fn dup_stream(stream: &tokio::net::TcpStream) -> Option<std::net::TcpStream> {
    use std::os::fd::AsFd;
    let fd = stream.as_fd().try_clone_to_owned().ok()?;
    Some(std::net::TcpStream::from(fd))
}

#[cfg(not(unix))]
fn dup_stream(_: &tokio::net::TcpStream) -> Option<std::net::TcpStream> {
    None
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Refresh {
    Live,
    Spent,
    Revoked,
}

/// Rolling windows and daily count of one credential.
#[derive(Default)]
struct Bucket {
    second: VecDeque<Instant>,
    minute: VecDeque<Instant>,
    day: u64,
    day_used: u64,
}

/// A credential that passed authentication; limits are counted per credential.
enum Cred {
    OAuth,
    Key(String),
}

#[derive(Default)]
struct State {
    opts: FakeOptions,
    api_keys: HashSet<String>,
    /// Access token -> expiry (`None`: the lifetime overflowed `Instant`, i.e. never).
    access: HashMap<String, Option<Instant>>,
    refresh: HashMap<String, Refresh>,
    /// Refresh token or authorization code -> the `scope` of the grant it leads to, when not
    /// [`FAKE_SCOPE`]: a refresh answers for the same Keap app as the grant it continues.
    scopes: HashMap<String, String>,
    /// Every access and refresh token ever minted, for leak checks.
    issued: Vec<String>,
    /// Authorization code -> (redirect_uri, used).
    codes: HashMap<String, (String, bool)>,
    contacts: Contacts,
    next_id: i64,
    /// The contact model's custom fields.
    model: Vec<CustomField>,
    /// Tag id -> name.
    tags: BTreeMap<i64, String>,
    next_tag_id: i64,
    /// Contact id -> applied tag id -> when (ms since the epoch).
    applied: HashMap<i64, BTreeMap<i64, u64>>,
    /// Lower-cased email address -> (opted in, reason of the last change).
    email_opt: HashMap<String, (bool, String)>,
    requests: Vec<RecordedRequest>,
    faults: Vec<FaultRule>,
    buckets: HashMap<String, Bucket>,
    refresh_count: usize,
    spent_reuse: usize,
    throttled: usize,
}

/// Locks, recovering from poisoning: a panicking test thread must not take the server down.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl FakeKeap {
    /// Starts a fake on a random free port of 127.0.0.1.
    pub async fn start(opts: FakeOptions) -> io::Result<FakeKeap> {
        Self::start_on(SocketAddr::from((Ipv4Addr::LOCALHOST, 0)), opts).await
    }

    /// Starts a fake on `addr` (port 0 = random), which must be a loopback address.
    pub async fn start_on(addr: SocketAddr, opts: FakeOptions) -> io::Result<FakeKeap> {
        if !addr.ip().is_loopback() {
            let msg = "the fake Keap server only listens on loopback";
            return Err(io::Error::new(io::ErrorKind::InvalidInput, msg));
        }
        let listener = StdListener::bind(addr)?;
        let state = State { opts, next_id: FIRST_ID, ..State::default() };
        let inner = Inner {
            state: Arc::new(Mutex::new(state)),
            addr: listener.local_addr()?,
            rt: tokio::runtime::Handle::try_current().map_err(io::Error::other)?,
            cut: watch::channel(0).0,
            control: Arc::default(),
        };
        inner.listen(&mut lock(&inner.control), listener)?;
        Ok(FakeKeap { inner: Arc::new(inner) })
    }

    /// The bound address (stable across `set_down`).
    pub fn addr(&self) -> SocketAddr {
        self.inner.addr
    }

    /// REST base URL, like `https://api.infusionsoft.com/crm/rest`; the client appends `/v1/…`.
    pub fn api_url(&self) -> String {
        format!("http://{}/crm/rest", self.inner.addr)
    }

    /// Token endpoint URL, like `https://api.infusionsoft.com/token`.
    pub fn token_url(&self) -> String {
        format!("http://{}/token", self.inner.addr)
    }

    /// Where Keap's consent page would be, for code that builds the authorize link. The fake
    /// serves no page there (404): tests get codes from [`FakeKeap::issue_code`] instead.
    pub fn authorize_url(&self) -> String {
        format!("http://{}/app/oauth/authorize", self.inner.addr)
    }

    /// Accepts `key` from now on as `X-Keap-API-Key: <key>` (a PAT/SAK).
    pub fn add_api_key(&self, key: &str) {
        self.state().api_keys.insert(key.to_owned());
    }

    /// Mints a fresh access + refresh pair, as if a user had just authorised the app.
    pub fn issue_grant(&self) -> TokenGrant {
        self.state().mint()
    }

    /// Mints a grant as [`FakeKeap::issue_grant`] does, but as if the user had signed in to the
    /// Keap app `account` (e.g. `other456.infusionsoft.com`): its `scope`, and that of every
    /// refresh of it, is `full|<account>`. The fake keeps one contact store for every app.
    pub fn issue_grant_for(&self, account: &str) -> TokenGrant {
        self.state().mint_for(&format!("full|{account}"))
    }

    /// Mints a single-use authorization code bound to `redirect_uri` for the code grant.
    pub fn issue_code(&self, redirect_uri: &str) -> String {
        let code = random_token("fake-code-");
        let entry = (redirect_uri.to_owned(), false);
        self.state().codes.insert(code.clone(), entry);
        code
    }

    /// Like [`FakeKeap::issue_code`], for a user who signs in to the Keap app `account`: the
    /// grant the code is exchanged for names that app in its `scope`.
    pub fn issue_code_for(&self, redirect_uri: &str, account: &str) -> String {
        let code = self.issue_code(redirect_uri);
        self.state().scopes.insert(code.clone(), format!("full|{account}"));
        code
    }

    /// The user removed the app: every access token answers 401, every refresh token and
    /// unused code answers `invalid_grant`. API keys are unaffected.
    pub fn revoke_all_grants(&self) {
        let mut st = self.state();
        st.access.clear();
        st.codes.clear();
        for s in st.refresh.values_mut().filter(|s| **s == Refresh::Live) {
            *s = Refresh::Revoked;
        }
    }

    /// Every access token issued so far answers 401 from now on (refresh tokens still work).
    pub fn expire_access_tokens(&self) {
        let now = Some(Instant::now());
        self.state().access.values_mut().for_each(|e| *e = now);
    }

    /// Lifetime of access tokens minted from now on.
    pub fn set_access_token_lifetime(&self, d: Duration) {
        self.state().opts.access_token_lifetime = d;
    }

    /// Delay added before every `/crm/rest` answer.
    pub fn set_latency(&self, d: Duration) {
        self.state().opts.latency = d;
    }

    /// Changes the enforced per-second and per-minute limits (`None` = not enforced).
    pub fn set_limits(&self, per_second: Option<u32>, per_minute: Option<u32>) {
        let mut st = self.state();
        st.opts.per_second_limit = per_second;
        st.opts.per_minute_limit = per_minute;
    }

    /// `true`: the listening socket is shut at once (new connections are refused) and every
    /// open connection is cut. `false`: listens again on the same port. Synchronous, so the
    /// outage is in force when the call returns.
    pub fn set_down(&self, down: bool) {
        let inner = &self.inner;
        let mut ctl = lock(&inner.control);
        if ctl.stopped || ctl.down == down {
            return;
        }
        ctl.down = down;
        if down {
            take_down(&mut ctl);
            inner.cut.send_modify(|g| *g += 1);
            return;
        }
        let bound = StdListener::bind(inner.addr).and_then(|l| inner.listen(&mut ctl, l));
        if bound.is_err() {
            // The port is still held (or was taken meanwhile): keep trying in the background.
            let (state, control) = (Arc::clone(&inner.state), Arc::clone(&inner.control));
            let task = rebind(inner.addr, state, control, inner.cut.subscribe());
            ctl.accept = Some(inner.rt.spawn(task));
        }
    }

    /// Adds a fault rule after the existing ones.
    pub fn inject(&self, rule: FaultRule) {
        self.state().faults.push(rule);
    }

    /// Removes every fault rule.
    pub fn clear_faults(&self) {
        self.state().faults.clear();
    }

    /// All contacts, by increasing id.
    pub fn contacts(&self) -> Vec<Contact> {
        self.state().contacts.values().cloned().collect()
    }

    /// The contact with this id, if any.
    pub fn contact(&self, id: i64) -> Option<Contact> {
        self.state().contacts.get(&id).cloned()
    }

    /// Contacts having `email` (case-insensitive) in any of EMAIL1..3, by increasing id.
    pub fn contacts_with_email(&self, email: &str) -> Vec<Contact> {
        let st = self.state();
        st.contacts.with_email(email).cloned().collect()
    }

    /// Creates a contact as if it had existed before the test: no auth, not logged and not
    /// validated, so tests can seed data Keap accepted in the past.
    pub fn seed_contact(&self, w: ContactWrite) -> Contact {
        let Ok(Value::Object(w)) = serde_json::to_value(&w) else {
            unreachable!("a ContactWrite is an object")
        };
        self.state().insert_new(&w)
    }

    /// Seeds a contact from a `CreateOrPatchContact` body, checked as a `POST` would be
    /// (panics with Keap's message if it would be refused). Not logged.
    pub fn seed_contact_json(&self, body: Value) -> Contact {
        let mut st = self.state();
        let w = rules::parse_write(body.to_string().as_bytes(), Write::Create, &st.model)
            .unwrap_or_else(|e| panic!("Keap would refuse this contact: {e}"));
        let c = st.create(&w).unwrap_or_else(|r| panic!("Keap would refuse this contact: {}", r.body));
        st.after_write(c.id, &w);
        c
    }

    /// The contact as `GET /v1/contacts/{id}` answers it with every optional property asked
    /// for (`custom_fields`, `job_title`, `lead_source_id`), and its `tag_ids`.
    pub fn contact_json(&self, id: i64) -> Option<Value> {
        let st = self.state();
        let all = ["custom_fields", "job_title", "lead_source_id"].map(String::from);
        st.contacts.get(&id).map(|c| st.full_json(c, &all, false))
    }

    /// Edits any stored property of a contact as a person would in Keap's web app (no request
    /// recorded, not validated). Returns false if there is no such contact.
    pub fn edit_contact_json(&self, id: i64, edit: impl FnOnce(&mut Map<String, Value>)) -> bool {
        let mut st = self.state();
        let Some(c) = st.contacts.get(&id) else { return false };
        let Ok(Value::Object(mut m)) = serde_json::to_value(c) else { return false };
        edit(&mut m);
        m.insert("id".into(), json!(id));
        match serde_json::from_value::<Contact>(Value::Object(m)) {
            Ok(mut edited) => {
                edited.email_addresses.sort_by_key(|e| slot(e.field));
                edited.last_updated = Some(rfc3339_ms(unix_ms()));
                st.contacts.edit(id, |c| *c = edited);
                true
            }
            Err(e) => panic!("not a contact after the edit: {e}"),
        }
    }

    /// Adds a custom field to the contact model (as an admin would in Keap); returns its id.
    /// `field_name` is the label without spaces or punctuation, as Keap derives it.
    pub fn add_custom_field(&self, label: &str, field_type: &str) -> i64 {
        let mut st = self.state();
        let id = st.model.iter().map(|f| f.id + 1).max().unwrap_or(FIRST_FIELD_ID);
        let field_name = label.chars().filter(char::is_ascii_alphanumeric).collect();
        st.model.push(CustomField { id, label: label.into(), field_name, field_type: field_type.into() });
        id
    }

    /// The id of the custom field labelled `label`.
    pub fn custom_field_id(&self, label: &str) -> Option<i64> {
        self.state().model.iter().find(|f| f.label == label).map(|f| f.id)
    }

    /// Creates a tag in the catalogue (as a person would); returns its id.
    pub fn create_tag(&self, name: &str) -> i64 {
        self.state().add_tag(name)
    }

    /// Creates a tag with a given id (a test that configures tags by id).
    pub fn create_tag_with_id(&self, id: i64, name: &str) {
        let mut st = self.state();
        st.tags.insert(id, name.to_owned());
        st.next_tag_id = st.next_tag_id.max(id + 1);
    }

    /// The lowest tag id with exactly this name.
    pub fn tag_id(&self, name: &str) -> Option<i64> {
        self.state().tags.iter().find(|(_, n)| *n == name).map(|(id, _)| *id)
    }

    /// The catalogue, by id.
    pub fn tags(&self) -> Vec<(i64, String)> {
        self.state().tags.iter().map(|(id, n)| (*id, n.clone())).collect()
    }

    /// Applies a tag to a contact as a person would (not logged).
    pub fn apply_tag(&self, contact_id: i64, tag_id: i64) {
        self.state().applied.entry(contact_id).or_default().insert(tag_id, unix_ms());
    }

    /// The tags applied to a contact.
    pub fn contact_tags(&self, contact_id: i64) -> std::collections::BTreeSet<i64> {
        self.state().applied.get(&contact_id).map(|t| t.keys().copied().collect()).unwrap_or_default()
    }

    /// (opted in, reason) of the last opt-in or opt-out of this address, if any.
    pub fn email_opt_status(&self, email: &str) -> Option<(bool, String)> {
        self.state().email_opt.get(&email.to_lowercase()).cloned()
    }

    /// Edits a stored contact as a person would in Keap's web app (no request is recorded).
    /// Returns false if there is no such contact.
    pub fn edit_contact(&self, id: i64, edit: impl FnOnce(&mut Contact)) -> bool {
        let mut state = self.state();
        let edited = state.contacts.edit(id, |c| {
            edit(c);
            c.email_addresses.sort_by_key(|e| slot(e.field));
        });
        edited.is_some()
    }

    /// Every secret this fake ever handed out or knows: all access and refresh tokens minted,
    /// authorization codes, API keys and the client secret. Tests grep logs for these.
    pub fn issued_secrets(&self) -> Vec<String> {
        let st = self.state();
        let mut all = st.issued.clone();
        all.extend(st.codes.keys().cloned());
        all.extend(st.api_keys.iter().cloned());
        all.push(st.opts.client_secret.clone());
        all
    }

    /// Deletes a contact as someone working in Keap's UI would (no auth, not logged). Returns
    /// whether it existed.
    pub fn delete_contact(&self, id: i64) -> bool {
        let mut st = self.state();
        st.applied.remove(&id);
        st.contacts.remove(&id).is_some()
    }

    /// Every request received, in order of arrival.
    pub fn requests(&self) -> Vec<RecordedRequest> {
        self.state().requests.clone()
    }

    /// Number of recorded requests matching `f`. `f` runs under the fake's lock, so it must
    /// not call back into the `FakeKeap`.
    pub fn count(&self, f: impl Fn(&RecordedRequest) -> bool) -> usize {
        self.state().requests.iter().filter(|r| f(r)).count()
    }

    /// Successful refresh-token grants.
    pub fn refresh_count(&self) -> usize {
        self.state().refresh_count
    }

    /// The access and refresh token of the pair minted last (by `issue_grant`, a code exchange
    /// or a refresh), so a test can check that the client stored the newest pair.
    pub fn last_issued_pair(&self) -> Option<(String, String)> {
        let st = self.state();
        match st.issued.as_slice() {
            [.., access, refresh] => Some((access.clone(), refresh.clone())),
            _ => None,
        }
    }

    /// Whether `refresh_token` can still be spent (issued, not yet used, not revoked).
    pub fn refresh_token_is_live(&self, refresh_token: &str) -> bool {
        self.state().refresh.get(refresh_token) == Some(&Refresh::Live)
    }

    /// Times an already used refresh token was presented (the rotation bug this fake catches).
    pub fn spent_refresh_reuse_count(&self) -> usize {
        self.state().spent_reuse
    }

    /// Connections open now (a killed client's close them once the fake has read what they sent).
    pub fn open_connections(&self) -> usize {
        lock(&self.inner.control).conns.len()
    }

    /// 429 answers given.
    pub fn throttled_count(&self) -> usize {
        self.state().throttled
    }

    /// Stops the server for every clone: listener closed, connections cut, tasks ended.
    pub async fn shutdown(self) {
        self.inner.stop();
        tokio::task::yield_now().await;
    }

    fn state(&self) -> MutexGuard<'_, State> {
        lock(&self.inner.state)
    }
}

impl Inner {
    /// Serves `listener`, keeping a duplicate of it so `set_down` can shut it synchronously.
    fn listen(&self, ctl: &mut Control, listener: StdListener) -> io::Result<()> {
        let (dup, listener) = {
            let _runtime = self.rt.enter();
            to_tokio(listener)?
        };
        ctl.listener = Some(dup);
        let (state, control) = (Arc::clone(&self.state), Arc::clone(&self.control));
        let task = accept_loop(listener, state, control, self.cut.subscribe());
        ctl.accept = Some(self.rt.spawn(task));
        Ok(())
    }

    fn stop(&self) {
        let mut ctl = lock(&self.control);
        ctl.stopped = true;
        take_down(&mut ctl);
        self.cut.send_modify(|g| *g += 1);
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        self.stop();
    }
}

type Listeners = (StdListener, tokio::net::TcpListener);

fn to_tokio(listener: StdListener) -> io::Result<Listeners> {
    listener.set_nonblocking(true)?;
    let dup = listener.try_clone()?;
    Ok((dup, tokio::net::TcpListener::from_std(listener)?))
}

/// Closes the listening socket and every open connection now, and ends the accept loop.
fn take_down(ctl: &mut Control) {
    if let Some(listener) = ctl.listener.take() {
        shutdown_listener(listener);
    }
    for (_, conn) in ctl.conns.drain() {
        let _ = conn.shutdown(std::net::Shutdown::Both);
    }
    if let Some(task) = ctl.accept.take() {
        task.abort();
    }
}

/// `shutdown(2)` on a listening socket makes Linux stop listening at once (new SYNs are
/// refused) even while the accept task still owns a descriptor; aborting that task closes it
/// only at its next poll, too late for a test that connects right after `set_down(true)`.
/// std only exposes `shutdown` on streams, hence the (safe) descriptor conversion.
fn shutdown_listener(listener: StdListener) {
    #[cfg(unix)]
    {
        let stream = std::net::TcpStream::from(std::os::fd::OwnedFd::from(listener));
        let _ = stream.shutdown(std::net::Shutdown::Both);
    }
    #[cfg(not(unix))]
    drop(listener);
}

/// Retries binding the fixed port after `set_down(false)` found it busy, then serves it.
async fn rebind(
    addr: SocketAddr,
    state: Arc<Mutex<State>>,
    control: Arc<Mutex<Control>>,
    cut: watch::Receiver<u64>,
) {
    for _ in 0..500 {
        tokio::time::sleep(Duration::from_millis(20)).await;
        let Ok((dup, listener)) = StdListener::bind(addr).and_then(to_tokio) else {
            continue;
        };
        {
            let mut ctl = lock(&control);
            if ctl.stopped || ctl.down {
                return;
            }
            ctl.listener = Some(dup);
        }
        return accept_loop(listener, state, control, cut).await;
    }
}

async fn accept_loop(
    listener: tokio::net::TcpListener,
    state: Arc<Mutex<State>>,
    control: Arc<Mutex<Control>>,
    mut cut: watch::Receiver<u64>,
) {
    loop {
        let stream = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                // The socket was shut down under us: we are going down.
                Err(e) if e.kind() == io::ErrorKind::InvalidInput => return,
                // Out of descriptors and the like: back off instead of spinning.
                Err(_) => {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                }
            },
            _ = cut.changed() => return,
        };
        let _ = stream.set_nodelay(true);
        let state = Arc::clone(&state);
        let mut conn_cut = cut.clone();
        let guard = ConnGuard::new(&control, &stream);
        tokio::spawn(async move {
            let _guard = guard;
            let svc = service_fn(move |req| handle(Arc::clone(&state), req));
            // No header-read timer: idle keep-alive connections stay open until the client
            // drops them, so long tests never race a server-side idle close.
            let conn = http1::Builder::new().serve_connection(TokioIo::new(stream), svc);
            // A cut (down, shutdown) drops the connection future, which closes the socket;
            // `take_down` has already shut it, so the peer sees the close at once.
            tokio::select! {
                _ = conn => {}
                _ = conn_cut.changed() => {}
            }
        });
    }
}

/// The service's error: hyper closes the connection without writing a response.
#[derive(Debug)]
struct DropConnection;

impl fmt::Display for DropConnection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("connection dropped by fault injection")
    }
}

impl std::error::Error for DropConnection {}

/// Which part of the fake a path belongs to.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    Rest,
    Token,
    Other,
}

impl Kind {
    fn of(path: &str) -> Kind {
        match path {
            "/token" => Kind::Token,
            p if p == "/crm/rest" || p.starts_with("/crm/rest/") => Kind::Rest,
            _ => Kind::Other,
        }
    }
    fn matches(self, route: Route, req: &Req) -> bool {
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
struct Req {
    method: Method,
    path: String,
    query: String,
    headers: HeaderMap,
    body: Bytes,
}

/// An answer before it becomes a hyper response; `content_type` "" sends none.
struct Reply {
    status: u16,
    body: String,
    content_type: &'static str,
    headers: Vec<(String, String)>,
}

type Headers = Vec<(String, String)>;

fn reply(status: u16, body: String, content_type: &'static str) -> Reply {
    Reply { status, body, content_type, headers: Vec::new() }
}

fn json_reply(status: u16, v: &Value) -> Reply {
    reply(status, v.to_string(), "application/json")
}

/// Keap v1's error shape.
fn msg(status: u16, text: &str) -> Reply {
    json_reply(status, &json!({ "message": text }))
}

/// The gateway / v2 error shape (also that of Keap's 429).
fn v2_error(status: u16, code: Value, text: &str, status_text: &str) -> Reply {
    let body = json!({"code": code, "message": text, "status": status_text, "details": null});
    json_reply(status, &body)
}

/// The token endpoint's OAuth error shape.
fn oauth(status: u16, error: &str, description: &str) -> Reply {
    json_reply(status, &json!({ "error": error, "error_description": description }))
}

impl Reply {
    fn with_headers(mut self, mut headers: Headers) -> Reply {
        self.headers.append(&mut headers);
        self
    }

    fn into_response(self) -> Response<Full<Bytes>> {
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

type HttpResult = Result<Response<Full<Bytes>>, DropConnection>;

/// Entry point of every request: read, record, then serve (latency, faults, dispatch).
async fn handle(state: Arc<Mutex<State>>, req: Request<Incoming>) -> HttpResult {
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
    let result = result.map(Reply::into_response);
    if let (Ok(resp), Some(r)) = (&result, lock(&state).requests.get_mut(idx)) {
        r.status = resp.status().as_u16();
    }
    result
}

async fn serve(state: &Mutex<State>, req: &Req, kind: Kind) -> Result<Reply, DropConnection> {
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

fn header<'a>(h: &'a HeaderMap, name: &str) -> Option<&'a str> {
    h.get(name).and_then(|v| v.to_str().ok())
}

/// Whether the media type of `Content-Type` is `want` (parameters like charset ignored).
fn content_type_is(h: &HeaderMap, want: &str) -> bool {
    let ct = header(h, CONTENT_TYPE.as_str()).unwrap_or("");
    ct.split(';').next().is_some_and(|t| t.trim().eq_ignore_ascii_case(want))
}

fn auth_kind(h: &HeaderMap) -> AuthKind {
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
fn auth_param<'a>(h: &'a HeaderMap, scheme: &str) -> Option<&'a str> {
    let (s, rest) = header(h, AUTHORIZATION.as_str())?.split_once(' ')?;
    s.eq_ignore_ascii_case(scheme).then(|| rest.trim())
}

fn basic_credentials(h: &HeaderMap) -> Option<(String, String)> {
    let raw = base64::engine::general_purpose::STANDARD.decode(auth_param(h, "basic")?);
    let text = String::from_utf8(raw.ok()?).ok()?;
    let (id, secret) = text.split_once(':')?;
    Some((id.to_owned(), secret.to_owned()))
}

fn random_token(prefix: &str) -> String {
    let chars = rand::rng().sample_iter(&Alphanumeric).take(40);
    prefix.chars().chain(chars.map(char::from)).collect()
}

/// The first value of `key` in decoded query/form pairs, if not empty.
fn field<'a>(pairs: &'a [(String, String)], key: &str) -> Option<&'a str> {
    let found = pairs.iter().find(|(k, _)| k == key);
    found.map(|(_, v)| v.as_str()).filter(|v| !v.is_empty())
}

impl State {
    /// The next fault rule at or after `*from` that fires for this request, using one firing.
    fn next_fault(&mut self, kind: Kind, req: &Req, from: &mut usize) -> Option<FaultAction> {
        while let Some(rule) = self.faults.get_mut(*from) {
            *from += 1;
            let p = rule.probability;
            let lucky = p >= 1.0 || (p > 0.0 && rand::random::<f64>() < p);
            if kind.matches(rule.route, req) && rule.times != Some(0) && lucky {
                if let Some(n) = rule.times.as_mut() {
                    *n -= 1;
                }
                return Some(rule.action.clone());
            }
        }
        None
    }

    fn dispatch(&mut self, req: &Req, kind: Kind) -> Reply {
        match kind {
            Kind::Rest => self.rest(req),
            Kind::Token => self.token(req),
            Kind::Other => msg(404, "Not Found"),
        }
    }

    fn mint(&mut self) -> TokenGrant {
        self.mint_for(FAKE_SCOPE)
    }

    fn mint_for(&mut self, scope: &str) -> TokenGrant {
        let lifetime = self.opts.access_token_lifetime;
        let (access, refresh) = (random_token("fake-at-"), random_token("fake-rt-"));
        let expiry = Instant::now().checked_add(lifetime);
        self.access.insert(access.clone(), expiry);
        self.refresh.insert(refresh.clone(), Refresh::Live);
        self.issued.push(access.clone());
        self.issued.push(refresh.clone());
        if scope != FAKE_SCOPE {
            self.scopes.insert(refresh.clone(), scope.to_owned());
        }
        TokenGrant {
            access_token: access,
            token_type: "bearer".into(),
            // At least a second, and small enough for any client's signed 64-bit integer.
            expires_in: lifetime.as_secs().clamp(1, i64::MAX.unsigned_abs()),
            refresh_token: refresh,
            scope: scope.to_owned(),
        }
    }

    fn client_ok(&self, (id, secret): &(String, String)) -> bool {
        *id == self.opts.client_id && *secret == self.opts.client_secret
    }

    /// `POST /token`: form-encoded refresh and authorization-code grants.
    fn token(&mut self, req: &Req) -> Reply {
        if req.method != Method::POST {
            return oauth(405, "invalid_request", "Method not allowed");
        }
        // A JSON (or any non-form) body carries no readable field, as at Keap.
        let form = if content_type_is(&req.headers, "application/x-www-form-urlencoded") {
            let Some(form) = std::str::from_utf8(&req.body).ok().and_then(parse_pairs) else {
                return oauth(400, "invalid_request", "Malformed form body");
            };
            form
        } else {
            Vec::new()
        };
        let get = |k: &str| field(&form, k);
        let basic = basic_credentials(&req.headers);
        let invalid_client = || oauth(401, "invalid_client", "Invalid client credentials");
        match get("grant_type") {
            None => oauth(400, "invalid_request", "response_type or grant_type is required"),
            Some("refresh_token") => {
                // Strict: client credentials only as HTTP Basic for this grant (`docs/keap-api.md`).
                if !basic.is_some_and(|c| self.client_ok(&c)) {
                    return invalid_client();
                }
                let Some(rt) = get("refresh_token") else {
                    return oauth(400, "invalid_request", "refresh_token is required");
                };
                match self.refresh.get_mut(rt) {
                    Some(s @ Refresh::Live) => *s = Refresh::Spent,
                    Some(Refresh::Spent) => {
                        self.spent_reuse += 1;
                        return oauth(400, "invalid_grant", "Invalid refresh token");
                    }
                    _ => return oauth(400, "invalid_grant", "Invalid refresh token"),
                }
                self.refresh_count += 1;
                let scope = self.scopes.get(rt).cloned();
                self.token_reply(scope)
            }
            Some("authorization_code") => {
                // The PHP SDK sends the client credentials in the body here; Basic works too.
                let body_creds = || Some((get("client_id")?.into(), get("client_secret")?.into()));
                if !basic.or_else(body_creds).is_some_and(|c| self.client_ok(&c)) {
                    return invalid_client();
                }
                let (code, redirect) = (get("code").unwrap_or(""), get("redirect_uri"));
                match self.codes.get_mut(code) {
                    Some((uri, used)) if !*used && Some(uri.as_str()) == redirect => *used = true,
                    _ => return oauth(400, "invalid_grant", "Invalid authorization code"),
                }
                let scope = self.scopes.get(code).cloned();
                self.token_reply(scope)
            }
            Some(_) => oauth(400, "unsupported_grant_type", "grant_type is not supported"),
        }
    }

    /// A new grant for `scope` (`None`: [`FAKE_SCOPE`]).
    fn token_reply(&mut self, scope: Option<String>) -> Reply {
        let grant = self.mint_for(scope.as_deref().unwrap_or(FAKE_SCOPE));
        let body = serde_json::to_value(grant).unwrap_or(Value::Null);
        let no_store = vec![("cache-control".into(), "no-store".into())];
        json_reply(200, &body).with_headers(no_store)
    }

    /// Bearer token or API key; anything else is 401. Bearer failures answer the v1 shape,
    /// API-key and missing-credential failures the gateway (v2) shape: the 401 body is not
    /// captured anywhere (`docs/keap-api.md`), so clients must go by the status.
    fn authenticate(&self, h: &HeaderMap, now: Instant) -> Result<Cred, Reply> {
        if h.contains_key(AUTHORIZATION) {
            let expiry = auth_param(h, "bearer").and_then(|t| self.access.get(t));
            // Strict: an API key sent as Bearer is not accepted (`docs/keap-api.md`).
            return match expiry {
                Some(e) if e.is_none_or(|e| now < e) => Ok(Cred::OAuth),
                _ => Err(msg(401, "Invalid Access Token")),
            };
        }
        let unauthorized = |text| v2_error(401, json!(401), text, "Unauthorized");
        match header(h, "x-keap-api-key") {
            Some(k) if self.api_keys.contains(k) => Ok(Cred::Key(k.to_owned())),
            Some(_) => Err(unauthorized("Invalid API Key")),
            None => Err(unauthorized("Missing credentials")),
        }
    }

    /// Counts the request against its credential's windows. Returns whether it is admitted and
    /// the throttle/quota headers Keap sends (`docs/keap-api.md`).
    fn admit(&mut self, cred: &Cred, now: Instant) -> (bool, Headers) {
        let (key, default_minute, default_day) = match cred {
            Cred::OAuth => ("oauth".to_owned(), 1_500, 150_000),
            Cred::Key(k) => (format!("key:{k}"), 240, 30_000),
        };
        let o = &self.opts;
        let (per_second, per_minute, daily) = (o.per_second_limit, o.per_minute_limit, o.daily_quota);
        let b = self.buckets.entry(key).or_default();
        for (window, span) in [(&mut b.second, 1), (&mut b.minute, 60)] {
            let span = Duration::from_secs(span);
            while window.front().is_some_and(|t| now.duration_since(*t) >= span) {
                window.pop_front();
            }
        }
        let today = unix_ms() / DAY_MS;
        if b.day != today {
            (b.day, b.day_used) = (today, 0);
        }
        let over = per_second.is_some_and(|l| b.second.len() >= l as usize)
            || per_minute.is_some_and(|l| b.minute.len() >= l as usize)
            || daily.is_some_and(|l| b.day_used >= l);
        if !over {
            b.second.push_back(now);
            b.minute.push_back(now);
            b.day_used += 1;
        }
        let minute_limit = per_minute.map_or(default_minute, u64::from);
        let minute_used = b.minute.len() as u64;
        let day_limit = daily.unwrap_or(default_day);
        let headers = [
            ("product-throttle-limit", minute_limit.to_string()),
            ("product-throttle-time-unit", "minute".into()),
            ("product-throttle-interval", "1".into()),
            ("product-throttle-available", minute_limit.saturating_sub(minute_used).to_string()),
            ("product-throttle-used", minute_used.to_string()),
            ("product-quota-limit", day_limit.to_string()),
            ("product-quota-time-unit", "day".into()),
            ("product-quota-interval", "1".into()),
            ("product-quota-available", day_limit.saturating_sub(b.day_used).to_string()),
            ("product-quota-used", b.day_used.to_string()),
            ("product-quota-expiry-time", ((today + 1) * DAY_MS).to_string()),
            ("tenant-id", "fake123.infusionsoft.com".into()),
        ];
        (!over, headers.into_iter().map(|(n, v)| (format!("x-keap-{n}"), v)).collect())
    }

    /// Everything under `/crm/rest`: auth, rate limits, then the contact endpoints.
    fn rest(&mut self, req: &Req) -> Reply {
        let now = Instant::now();
        let cred = match self.authenticate(&req.headers, now) {
            Ok(cred) => cred,
            Err(answer) => return answer,
        };
        let (admitted, headers) = self.admit(&cred, now);
        if !admitted {
            self.throttled += 1;
            // Strictest: no Retry-After (`docs/keap-api.md`).
            let answer = v2_error(429, json!("429"), "Quota Exceeded", "Request Throttled");
            return answer.with_headers(headers);
        }
        self.contacts_api(req).with_headers(headers)
    }

    /// Routes below `/crm/rest/v1`: contacts, their tags, the model, the tag catalogue, email
    /// addresses.
    fn contacts_api(&mut self, req: &Req) -> Reply {
        let writes = matches!(req.method, Method::PUT | Method::POST | Method::PATCH);
        if writes && !content_type_is(&req.headers, "application/json") {
            return msg(415, "Content-Type must be application/json");
        }
        let Some(query) = parse_pairs(&req.query) else {
            return msg(400, "Malformed query string");
        };
        let body = &req.body[..];
        let Some(rest) = req.path.strip_prefix("/crm/rest/v1/") else {
            return msg(404, "Not Found");
        };
        let parts: Vec<&str> = rest.split('/').collect();
        let result = match (&req.method, parts.as_slice()) {
            (&Method::GET, ["contacts", "model"]) => Ok(json_reply(200, &self.model_json())),
            (m, ["contacts", id, "tags", rest @ ..]) => match id.parse::<i64>() {
                Ok(id) => self.contact_tags_api(m, id, rest, body, &query),
                Err(_) => Err(msg(400, "Invalid contact id")),
            },
            (m, ["tags"]) => self.tags_api(m, body, &query),
            (&Method::PUT, ["emailAddresses", email]) => match url_decode(email) {
                Some(email) => self.opt(&email, body),
                None => Err(msg(400, "Invalid email address")),
            },
            (m, ["contacts"]) => match *m {
                Method::GET => self.list(&query),
                Method::PUT => self.upsert(body),
                Method::POST => self.create_from(body),
                _ => Err(msg(405, "Method Not Allowed")),
            },
            (m, ["contacts", id]) => match id.parse::<i64>() {
                Ok(id) => match *m {
                    Method::GET => match self.contacts.get(&id) {
                        Some(c) => Ok(json_reply(200, &self.full_json(c, &optional(&query), false))),
                        None => Err(not_found(id)),
                    },
                    Method::PATCH => self.patch(id, body, &query),
                    Method::DELETE => match self.contacts.remove(&id) {
                        Some(_) => {
                            self.applied.remove(&id);
                            Ok(reply(204, String::new(), ""))
                        }
                        None => Err(not_found(id)),
                    },
                    _ => Err(msg(405, "Method Not Allowed")),
                },
                Err(_) => Err(msg(400, "Invalid contact id")),
            },
            _ => Err(msg(404, "Not Found")),
        };
        result.unwrap_or_else(|e| e)
    }

    /// `GET /v1/contacts`: exact, case-insensitive `email` filter over EMAIL1..3, paged. Items
    /// are RestPartialContacts: no `tag_ids`, `opt_in_reason` or `origin`.
    fn list(&self, query: &[(String, String)]) -> Result<Reply, Reply> {
        let number = |k: &str, default: usize| field(query, k).map_or(Ok(default), str::parse);
        let (Ok(limit), Ok(offset)) = (number("limit", 1000), number("offset", 0)) else {
            return Err(msg(400, "limit and offset must be non-negative integers"));
        };
        let matching: Vec<&Contact> = match field(query, "email") {
            Some(email) => self.contacts.with_email(email).collect(),
            None => self.contacts.values().collect(),
        };
        let optional = optional(query);
        let page: Vec<Value> = matching
            .iter()
            .skip(offset)
            .take(limit.min(1000))
            .map(|c| self.full_json(c, &optional, true))
            .collect();
        let count = i64::try_from(matching.len()).unwrap_or(i64::MAX);
        Ok(json_reply(200, &json!({"contacts": page, "count": count, "next": null, "previous": null})))
    }

    /// `PUT /v1/contacts`: update the duplicate found by `duplicate_option`, else create.
    fn upsert(&mut self, body: &[u8]) -> Result<Reply, Reply> {
        let w = rules::parse_write(body, Write::Upsert, &self.model).map_err(|e| msg(400, &e))?;
        let id = match self.find_duplicate(&w) {
            Some(id) => {
                self.contacts.edit(id, |c| apply(c, &w, None));
                id
            }
            None => self.create(&w)?.id,
        };
        self.after_write(id, &w);
        Ok(json_reply(200, &self.full_json(&self.contacts[&id], &[], false)))
    }

    /// `POST /v1/contacts`: always a new contact.
    fn create_from(&mut self, body: &[u8]) -> Result<Reply, Reply> {
        let w = rules::parse_write(body, Write::Create, &self.model).map_err(|e| msg(400, &e))?;
        let c = self.create(&w)?;
        self.after_write(c.id, &w);
        Ok(json_reply(201, &self.full_json(&c, &[], false)))
    }

    /// Lowest-id contact sharing one of the request's emails (EMAIL1 tried first) and, for
    /// `EmailAndName`, the same given and family name (case-insensitive).
    fn find_duplicate(&self, w: &Map<String, Value>) -> Option<i64> {
        let by_name = w.get("duplicate_option").and_then(Value::as_str) == Some("EmailAndName");
        let norm = |s: Option<&str>| s.unwrap_or("").trim().to_lowercase();
        let wanted = |k: &str| w.get(k).and_then(Value::as_str);
        let same_name = |c: &Contact| {
            norm(c.given_name.as_deref()) == norm(wanted("given_name"))
                && norm(c.family_name.as_deref()) == norm(wanted("family_name"))
        };
        let mut emails: Vec<(String, String)> = w
            .get("email_addresses")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .filter_map(|e| {
                Some((e.get("field")?.as_str()?.to_owned(), e.get("email")?.as_str()?.to_owned()))
            })
            .filter(|(_, e)| !e.is_empty())
            .collect();
        emails.sort();
        emails.iter().find_map(|(_, email)| {
            self.contacts.with_email(email).find(|c| !by_name || same_name(c)).map(|c| c.id)
        })
    }

    fn patch(&mut self, id: i64, body: &[u8], query: &[(String, String)]) -> Result<Reply, Reply> {
        let mask: Vec<String> =
            query.iter().filter(|(k, _)| k == "update_mask").map(|(_, v)| v.clone()).collect();
        let known = |m: &&String| UPDATE_MASK_VALUES.split_whitespace().any(|v| v == *m);
        if let Some(bad) = mask.iter().find(|m| !known(m)) {
            return Err(msg(400, &format!("Invalid update_mask value: {bad}")));
        }
        if !self.contacts.contains_key(&id) {
            return Err(not_found(id));
        }
        let w = rules::parse_write(body, Write::Patch, &self.model).map_err(|e| msg(400, &e))?;
        self.contacts.edit(id, |c| apply(c, &w, (!mask.is_empty()).then_some(mask.as_slice())));
        if mask.is_empty() || mask.iter().any(|m| m == "opt_in_reason") {
            self.after_write(id, &w);
        }
        Ok(json_reply(200, &self.full_json(&self.contacts[&id], &[], false)))
    }

    /// Validated create: a new contact needs at least one email address or phone number.
    fn create(&mut self, w: &Map<String, Value>) -> Result<Contact, Reply> {
        let has = |prop: &str| {
            w.get(prop)
                .and_then(Value::as_array)
                .is_some_and(|items| items.iter().any(|i| !rules::removes_slot(prop, i)))
        };
        if !has("email_addresses") && !has("phone_numbers") {
            return Err(msg(400, "At least one email address or phone number is required"));
        }
        Ok(self.insert_new(w))
    }

    fn insert_new(&mut self, w: &Map<String, Value>) -> Contact {
        let id = self.next_id;
        self.next_id += 1;
        let now = Some(rfc3339_ms(unix_ms()));
        let mut c = Contact { id, date_created: now, ..Contact::default() };
        apply(&mut c, w, None);
        self.contacts.insert(c.clone());
        c
    }

    /// Sending `opt_in_reason` marks EMAIL1 marketable (Keap does so from most statuses,
    /// `docs/keap-api.md`; the fake from every one).
    fn after_write(&mut self, id: i64, w: &Map<String, Value>) {
        let reason = w.get("opt_in_reason").and_then(Value::as_str).filter(|r| !r.is_empty());
        let email = self.contacts.get(&id).and_then(|c| c.email1().map(str::to_lowercase));
        if let (Some(reason), Some(email)) = (reason, email) {
            self.email_opt.insert(email, (true, reason.to_owned()));
        }
    }

    /// A FullContact (`list`: a RestPartialContact): the stored properties, `custom_fields`,
    /// `job_title` and `lead_source_id` only when asked for in `optional_properties`, plus
    /// properties the fake does not keep, so a client that fails on unknown fields fails here
    /// as it would against Keap.
    fn full_json(&self, c: &Contact, optional: &[String], list: bool) -> Value {
        let mut v = serde_json::to_value(c).unwrap_or_else(|_| json!({}));
        let Value::Object(m) = &mut v else { return v };
        for hidden in ["custom_fields", "job_title", "lead_source_id"] {
            if !optional.iter().any(|o| o == hidden) {
                m.remove(hidden);
            }
        }
        let opted_in =
            c.email1().and_then(|e| self.email_opt.get(&e.to_lowercase())).is_some_and(|(o, _)| *o);
        let status = if opted_in { "UnconfirmedMarketable" } else { "UnengagedMarketable" };
        m.insert("email_status".into(), json!(status));
        m.insert("email_opted_in".into(), json!(opted_in));
        m.insert("ScoreValue".into(), json!("0"));
        m.entry("phone_numbers").or_insert(json!([]));
        if list {
            m.remove("opt_in_reason");
        } else {
            let tags: Vec<i64> =
                self.applied.get(&c.id).map(|t| t.keys().copied().collect()).unwrap_or_default();
            m.insert("tag_ids".into(), json!(tags));
        }
        v
    }

    /// `GET /v1/contacts/model`.
    fn model_json(&self) -> Value {
        let fields: Vec<Value> = self
            .model
            .iter()
            .map(|f| {
                json!({"id": f.id, "label": f.label, "field_name": f.field_name, "field_type": f.field_type,
                       "options": [], "record_type": "CONTACT", "default_value": null})
            })
            .collect();
        json!({"custom_fields": fields, "optional_properties": ["custom_fields", "job_title", "lead_source_id"]})
    }

    /// `/v1/contacts/{id}/tags[/{tagId}]`: list, apply (`{"tagIds": […]}`), remove (`?ids=1,2`
    /// or one by path). More than 100 ids in one call is refused, as the PHP SDK refuses it.
    fn contact_tags_api(
        &mut self,
        method: &Method,
        id: i64,
        rest: &[&str],
        body: &[u8],
        query: &[(String, String)],
    ) -> Result<Reply, Reply> {
        if !self.contacts.contains_key(&id) {
            return Err(not_found(id));
        }
        match (method, rest) {
            (&Method::GET, []) => {
                let applied = self.applied.get(&id).cloned().unwrap_or_default();
                let tags: Vec<Value> = applied
                    .iter()
                    .map(|(t, at)| {
                        let name = self.tags.get(t).cloned().unwrap_or_default();
                        json!({"date_applied": rfc3339_ms(*at), "tag": {"id": t, "name": name, "category": null}})
                    })
                    .collect();
                Ok(json_reply(
                    200,
                    &json!({"tags": tags, "count": applied.len(), "next": null, "previous": null}),
                ))
            }
            (&Method::POST, []) => {
                let Ok(Value::Object(b)) = serde_json::from_slice::<Value>(body) else {
                    return Err(msg(400, BAD_INPUT));
                };
                if let Some(bad) = b.keys().find(|k| *k != "tagIds") {
                    return Err(msg(400, &format!("Unrecognized field \"{bad}\"")));
                }
                let ids: Option<Vec<i64>> = b
                    .get("tagIds")
                    .and_then(Value::as_array)
                    .map(|a| a.iter().filter_map(Value::as_i64).collect());
                let Some(ids) = ids.filter(|ids| !ids.is_empty()) else {
                    return Err(msg(400, "tagIds is required: a list of tag ids"));
                };
                if ids.len() > 100 {
                    return Err(msg(400, "At most 100 tags per request"));
                }
                let now = unix_ms();
                let mut answer = Map::new();
                for t in ids {
                    let outcome = if !self.tags.contains_key(&t) {
                        "TAG_ID_NOT_FOUND"
                    } else if self.applied.entry(id).or_default().insert(t, now).is_some() {
                        "DUPLICATE"
                    } else {
                        "SUCCESS"
                    };
                    answer.insert(t.to_string(), json!(outcome));
                }
                Ok(json_reply(200, &Value::Object(answer)))
            }
            (&Method::DELETE, []) => {
                let list = field(query, "ids").unwrap_or("");
                let ids: Result<Vec<i64>, _> = list.split(',').map(|s| s.trim().parse::<i64>()).collect();
                match ids {
                    Ok(ids) if ids.len() <= 100 => {
                        let applied = self.applied.entry(id).or_default();
                        for t in ids {
                            applied.remove(&t);
                        }
                        Ok(reply(204, String::new(), ""))
                    }
                    Ok(_) => Err(msg(400, "At most 100 tags per request")),
                    Err(_) => Err(msg(400, "ids must be a comma-separated list of tag ids")),
                }
            }
            (&Method::DELETE, [tag]) => match tag.parse::<i64>() {
                Ok(t) => {
                    self.applied.entry(id).or_default().remove(&t);
                    Ok(reply(204, String::new(), ""))
                }
                Err(_) => Err(msg(400, "Invalid tag id")),
            },
            _ => Err(msg(405, "Method Not Allowed")),
        }
    }

    /// The tag catalogue: `GET /v1/tags?name=` matches every tag whose name *contains* the text
    /// (the broadest reading; clients must filter exactly), `POST /v1/tags` creates one (a name
    /// already taken makes a second tag, as nothing says Keap refuses it).
    fn tags_api(&mut self, method: &Method, body: &[u8], query: &[(String, String)]) -> Result<Reply, Reply> {
        match *method {
            Method::GET => {
                let name = field(query, "name").map(str::to_lowercase);
                let found: Vec<Value> = self
                    .tags
                    .iter()
                    .filter(|(_, n)| name.as_deref().is_none_or(|want| n.to_lowercase().contains(want)))
                    .map(|(id, n)| json!({"id": id, "name": n, "description": null, "category": null}))
                    .collect();
                Ok(json_reply(
                    200,
                    &json!({"tags": found, "count": found.len(), "next": null, "previous": null}),
                ))
            }
            Method::POST => {
                let Ok(Value::Object(b)) = serde_json::from_slice::<Value>(body) else {
                    return Err(msg(400, BAD_INPUT));
                };
                if let Some(bad) =
                    b.keys().find(|k| !["name", "description", "category"].contains(&k.as_str()))
                {
                    return Err(msg(400, &format!("Unrecognized field \"{bad}\"")));
                }
                match b.get("name").and_then(Value::as_str).map(str::trim) {
                    Some(n) if !n.is_empty() && n.chars().count() <= 100 => {
                        let id = self.add_tag(n);
                        Ok(json_reply(
                            201,
                            &json!({"id": id, "name": n, "description": b.get("description"), "category": null}),
                        ))
                    }
                    _ => Err(msg(400, "name is required (at most 100 characters)")),
                }
            }
            _ => Err(msg(405, "Method Not Allowed")),
        }
    }

    fn add_tag(&mut self, name: &str) -> i64 {
        let id = self.next_tag_id.max(FIRST_TAG_ID);
        self.next_tag_id = id + 1;
        self.tags.insert(id, name.to_owned());
        id
    }

    /// `PUT /v1/emailAddresses/{email}`: body exactly `{"opted_in": bool, "reason": string}`.
    /// An address no contact has answers 404 (strict: the spec declares no such case).
    fn opt(&mut self, email: &str, body: &[u8]) -> Result<Reply, Reply> {
        let Ok(Value::Object(b)) = serde_json::from_slice::<Value>(body) else {
            return Err(msg(400, BAD_INPUT));
        };
        if let Some(bad) = b.keys().find(|k| *k != "opted_in" && *k != "reason") {
            return Err(msg(400, &format!("Unrecognized field \"{bad}\"")));
        }
        let (Some(opted_in), Some(reason)) =
            (b.get("opted_in").and_then(Value::as_bool), b.get("reason").and_then(Value::as_str))
        else {
            return Err(msg(400, "opted_in and reason are required"));
        };
        if self.contacts.with_email(email).next().is_none() {
            return Err(msg(404, &format!("Email address {email} not found")));
        }
        self.email_opt.insert(email.to_lowercase(), (opted_in, reason.to_owned()));
        let status = if opted_in { "Unconfirmed" } else { "Opt-Out" };
        Ok(json_reply(200, &json!({"email": email, "opted_in": opted_in, "status": status})))
    }
}

/// The `optional_properties` a GET asks for (comma-delimited).
fn optional(query: &[(String, String)]) -> Vec<String> {
    let list = field(query, "optional_properties").unwrap_or("");
    list.split(',').map(|s| s.trim().to_owned()).filter(|s| !s.is_empty()).collect()
}

fn not_found(id: i64) -> Reply {
    msg(404, &format!("Contact {id} not found"))
}

/// The stored contacts by id, with an index of their email addresses (ASCII case folded, as
/// the lookups compare them). Keap finds a contact by email through an index; a fake that
/// scanned every contact would make a 20,000-user first sync cost O(n) per delivery on the
/// fake's side and a benchmark would measure the fake. Every change to a contact goes through
/// [`Contacts::edit`], which re-indexes it.
#[derive(Debug, Default)]
struct Contacts {
    by_id: BTreeMap<i64, Contact>,
    by_email: HashMap<String, BTreeSet<i64>>,
}

impl Contacts {
    fn emails(c: &Contact) -> impl Iterator<Item = String> + '_ {
        c.email_addresses.iter().filter_map(|e| e.email.as_deref()).map(str::to_ascii_lowercase)
    }

    fn index_emails(&mut self, c: &Contact) {
        for email in Self::emails(c) {
            self.by_email.entry(email).or_default().insert(c.id);
        }
    }

    fn unindex_emails(&mut self, c: &Contact) {
        for email in Self::emails(c) {
            if let Some(ids) = self.by_email.get_mut(&email) {
                ids.remove(&c.id);
                if ids.is_empty() {
                    self.by_email.remove(&email);
                }
            }
        }
    }

    fn get(&self, id: &i64) -> Option<&Contact> {
        self.by_id.get(id)
    }

    fn contains_key(&self, id: &i64) -> bool {
        self.by_id.contains_key(id)
    }

    fn values(&self) -> impl Iterator<Item = &Contact> {
        self.by_id.values()
    }

    fn insert(&mut self, c: Contact) {
        if let Some(old) = self.by_id.remove(&c.id) {
            self.unindex_emails(&old);
        }
        self.index_emails(&c);
        self.by_id.insert(c.id, c);
    }

    fn remove(&mut self, id: &i64) -> Option<Contact> {
        let c = self.by_id.remove(id)?;
        self.unindex_emails(&c);
        Some(c)
    }

    /// Changes contact `id` in place and re-indexes its emails; `None` if there is none.
    fn edit<R>(&mut self, id: i64, f: impl FnOnce(&mut Contact) -> R) -> Option<R> {
        let mut c = self.by_id.remove(&id)?;
        self.unindex_emails(&c);
        let r = f(&mut c);
        self.insert(c);
        Some(r)
    }

    /// Contacts having `email` (ASCII case-insensitive) in any of EMAIL1..3, by increasing id.
    fn with_email(&self, email: &str) -> impl Iterator<Item = &Contact> {
        let ids = self.by_email.get(&email.to_ascii_lowercase());
        ids.into_iter().flatten().filter_map(|id| self.by_id.get(id))
    }
}

impl std::ops::Index<&i64> for Contacts {
    type Output = Contact;

    fn index(&self, id: &i64) -> &Contact {
        &self.by_id[id]
    }
}

fn slot(f: EmailField) -> u8 {
    match f {
        EmailField::Email1 => 1,
        EmailField::Email2 => 2,
        EmailField::Email3 => 3,
    }
}

/// Applies a validated write (only the properties in `mask` when given). An array property is
/// **replaced whole** when written, the strictest reading of Keap's documentation (v2 says so,
/// v1 says nothing; `docs/keap-api.md`): slots the request leaves out are gone, so a client that
/// sends only EMAIL1 wipes EMAIL2 and EMAIL3, and a test sees it. An item whose main part is
/// empty (an email without address, a phone without number) removes its slot; `null` clears a
/// scalar.
fn apply(c: &mut Contact, w: &Map<String, Value>, mask: Option<&[String]>) {
    let allowed = |name: &str| mask.is_none_or(|m| m.iter().any(|x| x == name));
    for (k, v) in w {
        if k == "duplicate_option" || !allowed(k) {
            continue;
        }
        match k.as_str() {
            "given_name" => c.given_name = v.as_str().map(str::to_owned),
            "family_name" => c.family_name = v.as_str().map(str::to_owned),
            "email_addresses" => {
                let items = v.as_array().into_iter().flatten();
                let kept = items.filter(|i| !rules::removes_slot(k, i));
                c.email_addresses = kept.filter_map(|i| serde_json::from_value(i.clone()).ok()).collect();
                c.email_addresses.sort_by_key(|e| slot(e.field));
            }
            prop if rules::ARRAYS.contains(&prop) => {
                let mut kept: Vec<Value> = v
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter(|i| !rules::removes_slot(prop, i))
                    .cloned()
                    .collect();
                kept.sort_by_key(|i| rules::slot_of(prop, i).to_string());
                if kept.is_empty() {
                    c.extra.remove(prop);
                } else {
                    c.extra.insert(prop.to_owned(), Value::Array(kept));
                }
            }
            prop if v.is_null() => {
                c.extra.remove(prop);
            }
            prop => {
                c.extra.insert(prop.to_owned(), v.clone());
            }
        }
    }
    c.last_updated = Some(rfc3339_ms(unix_ms()));
}

/// A plain `local@domain.tld` check: ASCII only, no spaces, dotted domain with an alphabetic
/// TLD of two or more letters. Stricter than RFC 5322, like most CRM validators.
fn email_is_valid(e: &str) -> bool {
    let Some((local, domain)) = e.split_once('@') else {
        return false;
    };
    let local_char = |c: char| c.is_ascii_alphanumeric() || "!#$%&'*+/=?^_`{|}~.-".contains(c);
    let local_ok = !local.is_empty()
        && !local.starts_with('.')
        && !local.ends_with('.')
        && !local.contains("..")
        && local.chars().all(local_char);
    let label_ok = |l: &&str| {
        let chars_ok = l.chars().all(|c| c.is_ascii_alphanumeric() || c == '-');
        !l.is_empty() && !l.starts_with('-') && !l.ends_with('-') && chars_ok
    };
    let labels: Vec<&str> = domain.split('.').collect();
    let tld_ok = labels.last().is_some_and(|t| t.len() >= 2 && t.chars().all(|c| c.is_ascii_alphabetic()));
    local_ok && labels.len() >= 2 && labels.iter().all(label_ok) && tld_ok
}

/// Splits `a=1&b=2` (query or form body) into decoded pairs; `None` on bad percent-encoding.
fn parse_pairs(s: &str) -> Option<Vec<(String, String)>> {
    let pairs = s.split('&').filter(|p| !p.is_empty());
    pairs
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            Some((url_decode(k)?, url_decode(v)?))
        })
        .collect()
}

fn url_decode(s: &str) -> Option<String> {
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

fn unix_ms() -> u64 {
    let since_epoch = SystemTime::now().duration_since(UNIX_EPOCH);
    since_epoch.map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// `2024-08-14T12:34:56.789Z`, the timestamp style of Keap's v1 examples.
fn rfc3339_ms(ms: u64) -> String {
    let (days, rem) = (i64::try_from(ms / DAY_MS).unwrap_or(0), ms % DAY_MS);
    // Howard Hinnant's days-to-civil algorithm.
    let z = days + 719_468;
    let (era, doe) = (z.div_euclid(146_097), z.rem_euclid(146_097));
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    let (h, m, s, milli) = (rem / 3_600_000, rem / 60_000 % 60, rem / 1000 % 60, rem % 1000);
    format!("{year:04}-{month:02}-{day:02}T{h:02}:{m:02}:{s:02}.{milli:03}Z")
}

#[cfg(test)]
mod tests {
    use super::*;
    use reqwest::{RequestBuilder, Response as HttpResponse};
    use serde::Deserialize;
    use std::collections::BTreeSet;

    /// The fake's error answers, read leniently: v1 `{"message"}`, the gateway's
    /// `{"code","message","status","details"}` and the token endpoint's
    /// `{"error","error_description"}`. Only the fields the tests look at.
    #[derive(Debug, Default, Deserialize)]
    struct ErrorReply {
        message: Option<String>,
        code: Option<Value>,
        error: Option<String>,
        error_description: Option<String>,
    }

    /// A started fake, a plain-HTTP client (no proxy from the environment) and a live token.
    struct Kit {
        fake: FakeKeap,
        http: reqwest::Client,
        token: String,
    }

    impl Kit {
        async fn new(opts: FakeOptions) -> Kit {
            let fake = FakeKeap::start(opts).await.expect("start");
            let token = fake.issue_grant().access_token;
            Kit { fake, http: client(), token }
        }
        fn url(&self, rest: &str) -> String {
            format!("{}/v1/contacts{rest}", self.fake.api_url())
        }
        fn get(&self, rest: &str) -> RequestBuilder {
            self.http.get(self.url(rest)).bearer_auth(&self.token)
        }
        fn put(&self, body: &Value) -> RequestBuilder {
            self.http.put(self.url("")).bearer_auth(&self.token).json(body)
        }
        fn refresh(&self, rt: &str, secret: &str) -> RequestBuilder {
            let form = [("grant_type", "refresh_token"), ("refresh_token", rt)];
            let req = self.http.post(self.fake.token_url()).form(&form);
            req.basic_auth("fake-client-id", Some(secret))
        }
    }

    fn client() -> reqwest::Client {
        // reqwest is built without a rustls provider; same as `crate::install_crypto_provider`.
        let _ = rustls::crypto::ring::default_provider().install_default();
        reqwest::Client::builder().no_proxy().build().expect("client")
    }

    async fn send(req: RequestBuilder) -> HttpResponse {
        req.send().await.expect("send")
    }

    async fn status(req: RequestBuilder) -> u16 {
        send(req).await.status().as_u16()
    }

    async fn error(req: RequestBuilder) -> ErrorReply {
        send(req).await.json().await.expect("error body")
    }

    async fn contact(req: RequestBuilder) -> Contact {
        send(req).await.json().await.expect("contact")
    }

    fn upsert(email: &str, given: &str) -> Value {
        let emails = json!([{"email": email, "field": "EMAIL1"}]);
        json!({"given_name": given, "email_addresses": emails, "duplicate_option": "Email"})
    }

    #[test]
    fn handle_is_send_sync_and_clone() {
        fn check<T: Send + Sync + Clone>() {}
        check::<FakeKeap>();
    }

    #[tokio::test]
    async fn upsert_creates_then_updates_the_same_contact() {
        let k = Kit::new(FakeOptions::default()).await;
        let created = contact(k.put(&upsert("Ada@Example.com", "Ada"))).await;
        assert!(created.id >= FIRST_ID);
        let updated = contact(k.put(&upsert("ada@example.COM", "Ada L."))).await;
        assert_eq!(updated.id, created.id);
        assert_eq!(updated.given_name.as_deref(), Some("Ada L."));
        assert_eq!(updated.email1(), Some("ada@example.COM"));
        assert_eq!(k.fake.contacts().len(), 1);
        // EmailAndName with another name finds no duplicate: a second contact.
        let mut other = upsert("ada@example.com", "Bob");
        other["duplicate_option"] = json!("EmailAndName");
        assert_ne!(contact(k.put(&other)).await.id, created.id);
        assert_eq!(k.fake.contacts_with_email("ADA@example.com").len(), 2);
        // POST always creates, with 201.
        let body = json!({"email_addresses": [{"email": "ada@example.com", "field": "EMAIL1"}]});
        let post = k.http.post(k.url("")).bearer_auth(&k.token).json(&body);
        assert_eq!(status(post).await, 201);
        assert_eq!(k.fake.contacts().len(), 3);
    }

    #[tokio::test]
    async fn get_list_and_delete() {
        let k = Kit::new(FakeOptions::default()).await;
        let email = EmailAddress { email: Some("x@y.io".into()), field: EmailField::Email2 };
        let w = ContactWrite { email_addresses: Some(vec![email]), ..ContactWrite::default() };
        let seeded = k.fake.seed_contact(w);
        assert!(k.fake.requests().is_empty(), "seeding is not logged");
        let list: ContactList = send(k.get("").query(&[("email", "X@Y.IO")])).await.json().await.unwrap();
        assert_eq!((list.count, list.contacts[0].id), (1, seeded.id));
        let one = format!("/{}", seeded.id);
        assert_eq!(status(k.get(&one)).await, 200);
        assert_eq!(status(k.http.delete(k.url(&one)).bearer_auth(&k.token)).await, 204);
        assert_eq!(status(k.get(&one)).await, 404);
        assert_eq!(status(k.get("/abc")).await, 400);
    }

    #[tokio::test]
    async fn patch_honours_update_mask() {
        let k = Kit::new(FakeOptions::default()).await;
        let id = contact(k.put(&upsert("p@q.io", "Old"))).await.id;
        let patch = |mask: &[&str]| {
            let query: Vec<(&str, &str)> = mask.iter().map(|m| ("update_mask", *m)).collect();
            let body = json!({"given_name": "New", "family_name": "Fam"});
            k.http.patch(k.url(&format!("/{id}"))).bearer_auth(&k.token).query(&query).json(&body)
        };
        assert_eq!(status(patch(&["family_name"])).await, 200);
        let after = k.fake.contact(id).unwrap();
        assert_eq!((after.given_name.as_deref(), after.family_name.as_deref()), (Some("Old"), Some("Fam")));
        assert_eq!(status(patch(&["family_name", "given_name"])).await, 200);
        assert_eq!(k.fake.contact(id).unwrap().given_name.as_deref(), Some("New"));
        assert_eq!(status(patch(&["given_name,family_name"])).await, 400);
        let missing = k.http.patch(k.url("/999999")).bearer_auth(&k.token).json(&json!({}));
        assert_eq!(status(missing).await, 404);
    }

    #[tokio::test]
    async fn a_refresh_the_client_gave_up_on_still_rotates_the_pair() {
        let k = Kit::new(FakeOptions::default()).await;
        let grant = k.fake.issue_grant();
        k.fake.inject(FaultRule::new(Route::Token, FaultAction::Delay(Duration::from_millis(300))));
        let gave_up =
            k.refresh(&grant.refresh_token, "fake-client-secret").timeout(Duration::from_millis(50));
        assert!(gave_up.send().await.is_err(), "the client hung up before the answer");
        // Strict: the token endpoint finishes the request anyway (looked at every 20 ms, 5 s at most).
        for _ in 0..250 {
            if k.fake.refresh_count() == 1 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(k.fake.refresh_count(), 1, "the refresh token was spent");
        assert!(!k.fake.refresh_token_is_live(&grant.refresh_token));
        let (_, newest) = k.fake.last_issued_pair().expect("a pair");
        assert!(newest != grant.refresh_token && k.fake.refresh_token_is_live(&newest));
    }

    #[tokio::test]
    async fn calls_without_valid_credentials_get_401() {
        let k = Kit::new(FakeOptions::default()).await;
        let resp = send(k.http.get(k.url(""))).await;
        assert_eq!(resp.status(), 401);
        assert!(resp.headers().get("x-keap-product-throttle-limit").is_none());
        assert_eq!(resp.json::<ErrorReply>().await.unwrap().code, Some(json!(401)));
        let err = error(k.http.get(k.url("")).bearer_auth("nope")).await;
        assert_eq!(err.message.as_deref(), Some("Invalid Access Token"));
        assert_eq!(status(k.http.get(k.url("")).bearer_auth("k1")).await, 401);
        k.fake.add_api_key("k1");
        let resp = send(k.http.get(k.url("")).header("X-Keap-API-Key", "k1")).await;
        assert_eq!(resp.status(), 200);
        assert_eq!(resp.headers()["x-keap-product-throttle-limit"], "240");
        let auths: Vec<AuthKind> = k.fake.requests().iter().map(|r| r.auth).collect();
        assert_eq!(auths, [AuthKind::None, AuthKind::Bearer, AuthKind::Bearer, AuthKind::ApiKey]);
    }

    #[tokio::test]
    async fn refresh_tokens_rotate_and_are_single_use() {
        let k = Kit::new(FakeOptions::default()).await;
        let grant = k.fake.issue_grant();
        let next: TokenGrant =
            send(k.refresh(&grant.refresh_token, "fake-client-secret")).await.json().await.unwrap();
        assert_ne!(next.refresh_token, grant.refresh_token);
        assert_eq!((next.token_type.as_str(), next.expires_in), ("bearer", 86_400));
        assert_eq!(next.scope, FAKE_SCOPE);
        let reuse = send(k.refresh(&grant.refresh_token, "fake-client-secret")).await;
        assert_eq!(reuse.status(), 400);
        assert_eq!(reuse.json::<ErrorReply>().await.unwrap().error.as_deref(), Some("invalid_grant"));
        assert_eq!((k.fake.refresh_count(), k.fake.spent_refresh_reuse_count()), (1, 1));
        // The old access token lives until its own expiry; the new one works too.
        for t in [&grant.access_token, &next.access_token] {
            assert_eq!(status(k.http.get(k.url("")).bearer_auth(t)).await, 200);
        }
        let err = error(k.refresh(&next.refresh_token, "wrong")).await;
        assert_eq!(err.error.as_deref(), Some("invalid_client"));
        let json_body = json!({"grant_type": "refresh_token", "refresh_token": next.refresh_token});
        let as_json =
            k.http.post(k.fake.token_url()).basic_auth("fake-client-id", Some("fake-client-secret"));
        let err = error(as_json.json(&json_body)).await;
        assert_eq!(err.error_description.as_deref(), Some("response_type or grant_type is required"));

        k.fake.revoke_all_grants();
        assert_eq!(status(k.refresh(&next.refresh_token, "fake-client-secret")).await, 400);
        assert_eq!(status(k.http.get(k.url("")).bearer_auth(&next.access_token)).await, 401);
        assert_eq!(k.fake.spent_refresh_reuse_count(), 1, "revoked is not reuse");
        let log = format!("{:?}", k.fake.requests());
        assert!(
            log.contains(REDACTED)
                && !log.contains(&grant.refresh_token)
                && !log.contains(&next.access_token)
        );
    }

    #[tokio::test]
    async fn authorization_code_grant_is_single_use_and_checks_redirect() {
        let k = Kit::new(FakeOptions::default()).await;
        let code = k.fake.issue_code("https://app.example/cb");
        let exchange = |redirect: &str| {
            let form = [
                ("grant_type", "authorization_code"),
                ("code", &code),
                ("client_id", "fake-client-id"),
                ("client_secret", "fake-client-secret"),
                ("redirect_uri", redirect),
            ];
            k.http.post(k.fake.token_url()).form(&form)
        };
        assert_eq!(status(exchange("https://evil.example/cb")).await, 400);
        let grant: TokenGrant = send(exchange("https://app.example/cb")).await.json().await.unwrap();
        assert_eq!(status(k.http.get(k.url("")).bearer_auth(&grant.access_token)).await, 200);
        let err = error(exchange("https://app.example/cb")).await;
        assert_eq!(err.error.as_deref(), Some("invalid_grant"));
    }

    #[tokio::test]
    async fn a_grant_for_another_app_keeps_naming_it_through_refreshes_and_codes() {
        let k = Kit::new(FakeOptions::default()).await;
        let other = "other456.infusionsoft.com";
        let grant = k.fake.issue_grant_for(other);
        assert_eq!(grant.scope, format!("full|{other}"));
        let next: TokenGrant =
            send(k.refresh(&grant.refresh_token, "fake-client-secret")).await.json().await.unwrap();
        assert_eq!(next.scope, format!("full|{other}"), "a refresh answers for the same app");
        let default: TokenGrant = send(k.refresh(&k.fake.issue_grant().refresh_token, "fake-client-secret"))
            .await
            .json()
            .await
            .unwrap();
        assert_eq!(default.scope, FAKE_SCOPE);
        assert_eq!(FAKE_SCOPE.split_once('|').map(|(_, a)| a), Some(FAKE_ACCOUNT));

        let code = k.fake.issue_code_for("https://app.example/cb", other);
        let form = [
            ("grant_type", "authorization_code"),
            ("code", code.as_str()),
            ("client_id", "fake-client-id"),
            ("client_secret", "fake-client-secret"),
            ("redirect_uri", "https://app.example/cb"),
        ];
        let exchanged: TokenGrant =
            send(k.http.post(k.fake.token_url()).form(&form)).await.json().await.unwrap();
        assert_eq!(exchanged.scope, format!("full|{other}"));
    }

    #[tokio::test]
    async fn expired_access_tokens_get_401() {
        let k = Kit::new(FakeOptions::default()).await;
        k.fake.expire_access_tokens();
        assert_eq!(status(k.get("")).await, 401);
        k.fake.set_access_token_lifetime(Duration::from_millis(300));
        let grant = k.fake.issue_grant();
        assert_eq!(grant.expires_in, 1, "expires_in is at least one second");
        assert_eq!(status(k.http.get(k.url("")).bearer_auth(&grant.access_token)).await, 200);
        // The lifetime passes: the token turns 401 on its own (looked at every 20 ms, 5 s at most).
        let deadline = Instant::now() + Duration::from_secs(5);
        while status(k.http.get(k.url("")).bearer_auth(&grant.access_token)).await != 401 {
            assert!(Instant::now() < deadline, "a 300 ms token still accepted after 5 s");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    #[tokio::test]
    async fn over_the_limit_answers_429_with_keap_headers() {
        let k = Kit::new(FakeOptions { per_second_limit: Some(2), ..FakeOptions::default() }).await;
        assert_eq!(status(k.get("")).await, 200);
        assert_eq!(status(k.get("")).await, 200);
        let resp = send(k.get("")).await;
        assert_eq!(resp.status(), 429);
        let h = resp.headers();
        assert!(h.get("retry-after").is_none());
        for (name, want) in [
            ("throttle-limit", "1500"),
            ("throttle-used", "2"),
            ("throttle-available", "1498"),
            ("throttle-time-unit", "minute"),
            ("throttle-interval", "1"),
            ("quota-used", "2"),
            ("quota-limit", "150000"),
        ] {
            assert_eq!(h[format!("x-keap-product-{name}").as_str()], want, "{name}");
        }
        let expiry: u64 = h["x-keap-product-quota-expiry-time"].to_str().unwrap().parse().unwrap();
        assert_eq!(expiry % DAY_MS, 0);
        assert!(expiry > unix_ms() && expiry <= unix_ms() + DAY_MS);
        let body: Value = resp.json().await.unwrap();
        assert_eq!(
            body,
            json!({"code":"429","message":"Quota Exceeded","status":"Request Throttled","details":null})
        );
        assert_eq!((k.fake.throttled_count(), k.fake.count(|r| r.status == 429)), (1, 1));
        k.fake.set_limits(None, Some(2));
        assert_eq!(status(k.get("")).await, 429, "the minute window still holds two requests");
    }

    #[tokio::test]
    async fn drop_closes_the_connection_and_other_faults() {
        let k = Kit::new(FakeOptions::default()).await;
        k.fake.inject(FaultRule::new(Route::Contacts, FaultAction::Drop).times(1));
        assert!(k.put(&upsert("d@e.io", "D")).send().await.is_err(), "no answer");
        assert!(k.fake.contacts().is_empty(), "not performed");
        assert_eq!(k.fake.requests()[0].status, 0);
        k.fake.inject(FaultRule::new(Route::Contacts, FaultAction::DropAfterCommit).times(1));
        assert!(k.put(&upsert("d@e.io", "D")).send().await.is_err());
        assert_eq!(k.fake.contacts().len(), 1, "a lost reply still commits");
        k.fake.inject(FaultRule::new(Route::Any, FaultAction::Status(503, "busy".into())).times(1));
        k.fake.inject(FaultRule::new(Route::Token, FaultAction::Status(500, "{}".into())));
        k.fake.inject(FaultRule::new(Route::Contacts, FaultAction::Drop).probability(0.0));
        assert_eq!(status(k.put(&upsert("d@e.io", "D"))).await, 503);
        assert_eq!(status(k.put(&upsert("d@e.io", "D"))).await, 200);
        assert_eq!(status(k.refresh("x", "y")).await, 500);
        k.fake.clear_faults();
        k.fake.inject(FaultRule::new(Route::Contacts, FaultAction::Delay(Duration::from_millis(50))));
        let t0 = Instant::now();
        assert_eq!(status(k.get("")).await, 200);
        assert!(t0.elapsed() >= Duration::from_millis(50));
    }

    #[tokio::test]
    async fn set_down_refuses_connections_until_back_up_on_the_same_port() {
        let k = Kit::new(FakeOptions::default()).await;
        let addr = k.fake.addr();
        assert_eq!(status(k.get("")).await, 200);
        k.fake.set_down(true);
        let refused = tokio::net::TcpStream::connect(addr).await.err().map(|e| e.kind());
        assert_eq!(refused, Some(io::ErrorKind::ConnectionRefused));
        assert!(k.get("").send().await.is_err(), "the keep-alive connection was cut too");
        k.fake.set_down(false);
        assert_eq!(k.fake.addr(), addr);
        assert_eq!(status(k.get("")).await, 200);
        assert_eq!(status(client().get(k.url("")).bearer_auth(&k.token)).await, 200);
    }

    #[tokio::test]
    async fn shutdown_stops_the_server() {
        let k = Kit::new(FakeOptions::default()).await;
        let addr = k.fake.addr();
        k.fake.shutdown().await;
        assert!(tokio::net::TcpStream::connect(addr).await.is_err());
    }

    #[tokio::test]
    async fn invalid_bodies_get_400_with_a_v1_message() {
        let k = Kit::new(FakeOptions::default()).await;
        let (long_name, long_email) = ("x".repeat(41), format!("{}@b.io", "x".repeat(72)));
        let item = |field: &str| json!({"email_addresses": [{"email": "a@b.io", "field": field}], "duplicate_option": "Email"});
        let cases = [
            (upsert("not-an-email", "A"), "Email address is invalid"),
            (upsert("a@b", "A"), "Email address is invalid"),
            (upsert("a@b.io", &long_name), "given_name must be at most 40 characters"),
            (upsert(&long_email, "A"), "Email address is too long (at most 75 characters)"),
            (
                json!({"email_addresses": [{"email": "a@b.io"}], "duplicate_option": "Email"}),
                "Email field must be one of EMAIL1, EMAIL2, EMAIL3",
            ),
            (item("EMAIL4"), "Email field must be one of EMAIL1, EMAIL2, EMAIL3"),
            (
                json!({"email_addresses": [{"email": "a@b.io", "field": "EMAIL1"}]}),
                "duplicate_option is required",
            ),
            (json!({"given_name": "A", "duplicate_option": "Email"}), "At least one email"),
            (json!({"given_name": "A", "nickname": "B", "duplicate_option": "Email"}), "Unrecognized field"),
            (
                json!({"given_name": "A", "duplicate_option": "EmailAndNameAndCompany"}),
                "duplicate_option must be",
            ),
            (
                json!({"phone_numbers": [{"number": "1", "field": "PHONE1", "kind": "x"}], "duplicate_option": "Email"}),
                "Unrecognized field \"kind\" in phone_numbers",
            ),
            (json!([1, 2]), BAD_INPUT),
        ];
        for (body, want) in cases {
            let resp = send(k.put(&body)).await;
            assert_eq!(resp.status(), 400, "{body}");
            assert!(resp.headers().contains_key("x-keap-product-quota-limit"));
            let text = resp.json::<ErrorReply>().await.unwrap().message.unwrap_or_default();
            assert!(text.starts_with(want), "{body}: {text}");
        }
        let broken = k.http.put(k.url("")).bearer_auth(&k.token).header("content-type", "application/json");
        assert_eq!(status(broken.body("{oops")).await, 400);
        assert_eq!(status(k.http.put(k.url("")).bearer_auth(&k.token).body("{}")).await, 415);
        let v2 = format!("{}/v2/contacts", k.fake.api_url());
        assert_eq!(status(k.http.get(v2).bearer_auth(&k.token)).await, 404);
        assert!(k.fake.contacts().is_empty());
    }

    #[tokio::test]
    async fn the_whole_contact_tags_model_and_opt_out() {
        let k = Kit::new(FakeOptions::default()).await;
        let seats = k.fake.add_custom_field("Seats", "WholeNumber");
        let body = json!({"duplicate_option": "Email", "given_name": "A", "job_title": "CTO", "owner_id": 9,
            "email_addresses": [{"email": "a@b.io", "field": "EMAIL1"}],
            "phone_numbers": [{"number": "1", "field": "PHONE1", "type": "Work"}, {"number": "2", "field": "PHONE2"}],
            "addresses": [{"field": "BILLING", "locality": "Paris", "country_code": "FRA"}],
            "custom_fields": [{"id": seats, "content": 3}], "opt_in_reason": "Asked"});
        let c = contact(k.put(&body)).await;
        // Optional properties only when asked for.
        let plain: Value = send(k.get(&format!("/{}", c.id))).await.json().await.unwrap();
        assert!(plain.get("job_title").is_none() && plain.get("custom_fields").is_none());
        assert_eq!(plain["owner_id"], 9);
        assert_eq!(plain["email_opted_in"], true);
        let asked: Value = send(k.get(&format!("/{}?optional_properties=job_title,custom_fields", c.id)))
            .await
            .json()
            .await
            .unwrap();
        assert_eq!(
            (asked["job_title"].clone(), asked["custom_fields"][0]["content"].clone()),
            (json!("CTO"), json!(3))
        );
        // Arrays are replaced: a PATCH of PHONE1 alone removes PHONE2; a mask without
        // phone_numbers keeps both.
        let patch =
            |q: &str, b: Value| k.http.patch(k.url(&format!("/{}{q}", c.id))).bearer_auth(&k.token).json(&b);
        let kept =
            send(patch("?update_mask=given_name", json!({"given_name": "B", "phone_numbers": []}))).await;
        assert_eq!(kept.status(), 200);
        assert_eq!(k.fake.contact_json(c.id).unwrap()["phone_numbers"].as_array().unwrap().len(), 2);
        assert_eq!(
            status(patch("", json!({"phone_numbers": [{"number": "3", "field": "PHONE1"}]}))).await,
            200
        );
        assert_eq!(
            k.fake.contact_json(c.id).unwrap()["phone_numbers"],
            json!([{"number": "3", "field": "PHONE1"}])
        );
        // The model.
        let model: Value = send(k.get("/model")).await.json().await.unwrap();
        assert_eq!(model["custom_fields"][0]["field_type"], "WholeNumber");
        // Tags: a contains-filter catalogue, apply with per-id answers, remove by a %2C list.
        let tags_url = format!("{}/v1/tags", k.fake.api_url());
        let created: Value = send(k.http.post(&tags_url).bearer_auth(&k.token).json(&json!({"name": "VIP"})))
            .await
            .json()
            .await
            .unwrap();
        let vip = created["id"].as_i64().unwrap();
        let other = k.fake.create_tag("VIP customer");
        let found: Value = send(k.http.get(format!("{tags_url}?name=VIP")).bearer_auth(&k.token))
            .await
            .json()
            .await
            .unwrap();
        assert_eq!(found["tags"].as_array().unwrap().len(), 2, "Keap's filter is not exact: {found}");
        let tags_of = format!("{}/{}/tags", k.url(""), c.id);
        let apply = |ids: Value| k.http.post(&tags_of).bearer_auth(&k.token).json(&json!({"tagIds": ids}));
        let answer: Value = send(apply(json!([vip, 999]))).await.json().await.unwrap();
        assert_eq!(answer, json!({vip.to_string(): "SUCCESS", "999": "TAG_ID_NOT_FOUND"}));
        let again: Value = send(apply(json!([vip, other]))).await.json().await.unwrap();
        assert_eq!(again[vip.to_string()], "DUPLICATE");
        assert_eq!(k.fake.contact_tags(c.id), BTreeSet::from([vip, other]));
        let remove = k.http.delete(format!("{tags_of}?ids={vip}%2C{other}")).bearer_auth(&k.token);
        assert_eq!(status(remove).await, 204);
        assert!(k.fake.contact_tags(c.id).is_empty());
        // Opt-out: exactly {opted_in, reason}; an unknown address is 404.
        let opt = |email: &str, b: Value| {
            let url = format!("{}/v1/emailAddresses/{email}", k.fake.api_url());
            k.http.put(url).bearer_auth(&k.token).json(&b)
        };
        assert_eq!(status(opt("a%40b.io", json!({"opted_in": false}))).await, 400);
        assert_eq!(status(opt("x%40b.io", json!({"opted_in": false, "reason": "r"}))).await, 404);
        assert_eq!(status(opt("a%40b.io", json!({"opted_in": false, "reason": "Gone"}))).await, 200);
        assert_eq!(k.fake.email_opt_status("A@b.io"), Some((false, "Gone".into())));
    }

    #[test]
    fn helpers() {
        assert_eq!(rfc3339_ms(1_723_680_000_123), "2024-08-15T00:00:00.123Z");
        assert_eq!(rfc3339_ms(951_782_400_000), "2000-02-29T00:00:00.000Z");
        assert_eq!(url_decode("a%20b+c%7C"), Some("a b c|".into()));
        for bad in ["%zz", "%+5", "%4", "%FF"] {
            assert_eq!(url_decode(bad), None, "{bad}");
        }
        assert!(email_is_valid("first.last+tag@sub.example.co"));
        for bad in ["", "a", "@b.io", "a@b", "a@.io", "a b@c.io", "a@b.c", "a..b@c.io", "é@c.io", "a@b.i1"] {
            assert!(!email_is_valid(bad), "{bad}");
        }
        assert!(format!("{:?}", FakeOptions::default()).contains(REDACTED));
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        let remote = FakeKeap::start_on("10.0.0.1:0".parse().unwrap(), FakeOptions::default());
        assert!(rt.block_on(remote).is_err(), "never listens beyond loopback");
    }
}
