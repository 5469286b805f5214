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
//! - refresh tokens are single use with no grace period (a reused, revoked or unknown one
//!   answers 400 `invalid_request` "Invalid Refresh Token", the newer gateway's answer;
//!   [`SpentRefreshError::InvalidGrant`] plays the older `invalid_grant`); the access token
//!   issued with a spent refresh token stays valid until its own expiry; the refresh grant
//!   accepts client credentials only as HTTP Basic;
//! - a token request, once read, is carried out even if the client hangs up before the answer
//!   (its refresh token is spent and the new pair is never seen by the client);
//! - `PUT /v1/contacts` answers 201 when it created the contact and 200 when it updated one
//!   (200 is the only declared status; 201 is what a create answers elsewhere) and needs
//!   `duplicate_option`; when several contacts share the email the lowest id wins;
//! - `GET /v1/contacts?email=` matches part of an address, in any of EMAIL1..3, case-insensitive
//!   ([`EmailFilter::Partial`]), so a client must pick the exact EMAIL1 match itself;
//! - Keap's documented limits of the credential are enforced where a test sets none (OAuth
//!   25/s, 1,500/min, 150,000/day; API key 10/s, 240/min, 30,000/day), and a tenant's
//!   per-minute limit of 5,000 (a 2024 capture; the 2026 docs say 10,000) across credentials,
//!   reported in the `x-keap-tenant-throttle-*` headers; 429s carry no `Retry-After`; requests
//!   refused with 429 do not use up quota;
//! - `opt_in_reason` makes an email marketable only from the statuses the v1 spec names
//!   (unengaged marketable or non-marketable, non-marketable, opted out by hand): one that
//!   unsubscribed through a list link or bounced stays as it is;
//! - unmodelled JSON properties (also inside array items), enum values not spelled exactly as
//!   the spec does, non-JSON write bodies and `Authorization: Bearer <api key>` are rejected;
//!   `update_mask` takes repeated parameters only (no comma lists);
//! - every v1 contact property is stored and checked (module `rules`: lengths, email shape, a
//!   region only with a country code, alpha-3 country codes, `zip_code` or `postal_code`,
//!   dates, ids, custom fields against the model and their type), each refusal a v1 400;
//! - array properties (`email_addresses`, `phone_numbers`, `addresses`, `custom_fields`) are
//!   replaced whole when written: a slot left out is gone;
//! - `custom_fields`, `job_title` and `lead_source_id` are answered only when asked for in
//!   `optional_properties`; list items carry no `tag_ids` or `opt_in_reason`, and by default
//!   neither does any other answer ([`FakeOptions::opt_in_reason_on_reads`]);
//! - the tag catalogue's `name` filter matches by substring (clients must filter exactly), the
//!   tag-apply answer is an object keyed by tag id (`SUCCESS`, `DUPLICATE`,
//!   `TAG_ID_NOT_FOUND`), more than 100 ids per call is refused; an opt-out
//!   (`PUT /v1/emailAddresses/{email}`) of an address no contact has answers 404;
//! - FullContact answers carry properties the daemon does not model, so its parser must
//!   ignore unknown fields as it has to with Keap.
//!
//! The server never listens beyond loopback: its credentials are fixed and guessable.
//!
//! The files: the server's sockets and connections (`server`), the test's handle on it
//! ([`FakeKeap`]'s methods, `control`), the HTTP layer (`http`: requests, replies, faults,
//! dispatch), the token endpoint and authentication (`oauth`), the rate limits (`limits`), the
//! contact endpoints and store (`contacts`), tags and email opt-outs (`tags`), REST hooks and
//! their deliveries (`hooks`), plus the wire
//! types (`wire`), Keap's property rules (`rules`) and the other host of a redirect
//! (`other_host`).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde_json::Value;

mod contacts;
mod control;
mod hooks;
mod http;
mod limits;
mod merges;
mod oauth;
mod other_host;
mod rules;
mod server;
mod tags;
mod v2;
mod wire;

pub use hooks::{HookAttempt, HookOptions, RestHook};
pub use other_host::{Arrival, OtherHost};
pub use wire::{Contact, ContactList, ContactWrite, DuplicateOption, EmailAddress, EmailField, TokenGrant};

use contacts::Contacts;
use limits::Bucket;
use oauth::Refresh;
use rules::{CustomField, Write};
use server::Inner;

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

/// How the fake starts: credentials, limits, speed and which reading of Keap's undocumented
/// behaviour it plays (the strictest by default). Limits left `None` are Keap's documented ones
/// for the credential (25/s, 1,500/min and 150,000/day for OAuth; 10/s, 240/min and 30,000/day
/// for API keys), enforced unless `documented_limits` is off; the headers report them either way.
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
    /// Enforce Keap's documented per-credential limits where the three above are `None`
    /// (default); off, a `None` limit is not enforced (for tests whose daemon runs far faster).
    pub documented_limits: bool,
    /// The tenant's per-minute limit across every credential, enforced and reported in the
    /// `x-keap-tenant-throttle-*` headers; `None`: no tenant headers, no tenant limit.
    pub tenant_minute_limit: Option<u32>,
    /// How `GET /v1/contacts?email=` matches (undocumented): partly, by default.
    pub email_filter: EmailFilter,
    /// What a refresh with a spent, revoked or unknown refresh token answers (Keap's answer
    /// changed over the years).
    pub spent_refresh_error: SpentRefreshError,
    /// Let `opt_in_reason` make an email marketable from every status (lenient); by default
    /// only from the statuses the v1 spec names.
    pub opt_in_from_any_status: bool,
    /// Answer `opt_in_reason` in a contact read (lenient); by default reads leave it out, as
    /// list items do, so a client cannot learn from a read whether consent was sent.
    pub opt_in_reason_on_reads: bool,
}

/// How the fake's `GET /v1/contacts?email=` filter matches an address (Keap documents neither).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EmailFilter {
    /// Any contact with the address in EMAIL1..3, whole, case-insensitive.
    Exact,
    /// Any contact with the address as part of one of EMAIL1..3, case-insensitive: a search for
    /// `ann@example.com` also finds `joann@example.com` and `ann@example.com.au`.
    Partial,
}

/// The token endpoint's answer to a refresh token that is spent, revoked or unknown.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SpentRefreshError {
    /// `{"error":"invalid_grant","error_description":"Invalid refresh token"}` (2016-2019).
    InvalidGrant,
    /// `{"error":"invalid_request","error_description":"Invalid Refresh Token"}` (newer gateway).
    InvalidRequest,
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
            documented_limits: true,
            tenant_minute_limit: Some(5_000),
            email_filter: EmailFilter::Partial,
            spent_refresh_error: SpentRefreshError::InvalidRequest,
            opt_in_from_any_status: false,
            opt_in_reason_on_reads: false,
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
            .field("documented_limits", &self.documented_limits)
            .field("tenant_minute_limit", &self.tenant_minute_limit)
            .field("email_filter", &self.email_filter)
            .field("spent_refresh_error", &self.spent_refresh_error)
            .field("opt_in_from_any_status", &self.opt_in_from_any_status)
            .field("opt_in_reason_on_reads", &self.opt_in_reason_on_reads)
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
    /// Matching requests to let through before the rule may fire (the n+1-th is the first).
    pub skip: u32,
}

impl FaultRule {
    /// A rule that fires on every matching request, forever.
    pub fn new(route: Route, action: FaultAction) -> Self {
        let (times, probability) = (None, 1.0);
        FaultRule { route, action, times, probability, skip: 0 }
    }
    /// Limits the rule to its next `n` firings.
    pub fn times(self, n: u32) -> Self {
        FaultRule { times: Some(n), ..self }
    }
    /// Lets the next `n` matching requests through first (a fault in the middle of a run).
    pub fn after(self, n: u32) -> Self {
        FaultRule { skip: n, ..self }
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
    /// Tag category id -> name.
    tag_categories: BTreeMap<i64, String>,
    /// Tag id -> its category's id, for the tags that have one.
    tag_category: HashMap<i64, i64>,
    /// Contact id -> applied tag id -> when (ms since the epoch).
    applied: HashMap<i64, BTreeMap<i64, u64>>,
    /// Lower-cased email address -> (opted in, reason of the last change).
    email_opt: HashMap<String, (bool, String)>,
    /// Lower-cased email address -> an `email_status` a test set (a person unsubscribed, a
    /// bounce), which an `opt_in_reason` may not lift.
    email_status: HashMap<String, String>,
    /// The tenant's rolling minute, across credentials.
    tenant_minute: std::collections::VecDeque<Instant>,
    requests: Vec<RecordedRequest>,
    faults: Vec<FaultRule>,
    buckets: HashMap<String, Bucket>,
    refresh_count: usize,
    spent_reuse: usize,
    throttled: usize,
    /// REST hook subscriptions, events waiting to be sent, delivery attempts (`hooks`).
    hooks: hooks::Hooks,
    /// Contacts the v2 listing leaves out (`FakeKeap::hide_from_listings`).
    unlisted: HashSet<i64>,
}

/// Locks, recovering from poisoning: a panicking test thread must not take the server down.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
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
mod tests;
