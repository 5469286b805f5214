//! The daemon's metrics, kept with the `prometheus-client` crate and exposed as OpenMetrics text,
//! and a tiny HTTP server for them (`GET /metrics`, `GET /healthz`).
//!
//! Every [`Metrics`] owns an explicit [`Registry`] instead of a process-global one: several
//! daemons run in one test process, and each must expose only its own counts. The registry is
//! filled in [`Metrics::new`] and never changed afterwards, so [`Metrics::render`] encodes it
//! through `&self` without a lock of ours.
//!
//! Shared state, what guards it, and why:
//! - Counters and gauges are prometheus-client's, each an `Arc` around one atomic (the f64
//!   gauge keeps its bits in an `AtomicU64`). Recording is one relaxed atomic operation, so the
//!   delivery path never waits on a scrape and a scrape never stalls a delivery. A scrape reads
//!   each atomic on its own and may be one observation off between series; Prometheus
//!   tolerates that.
//! - Each labelled metric is a [`Family`], a map from label set to metric behind
//!   prometheus-client's `RwLock`. Recording and scraping both take it shared, so they run side
//!   by side; it is taken exclusively only to add a label set (a method's first call) or to drop
//!   an unknown quota window. Every outcome, token result and queue kind is added in
//!   [`Metrics::new`], so those paths never take it exclusively, and their zero samples show
//!   from the first scrape. Label values are closed enums, which bounds cardinality (at most six
//!   methods times four status classes).
//! - The duration histogram is prometheus-client's `Histogram`: sum, count and buckets behind
//!   its own `RwLock`, as the crate has no atomic histogram. An observation holds it for a few
//!   additions, a scrape for one read. Only the Keap client observes, once per HTTP call, so
//!   that wait is nothing next to the call itself.
//! - The fatal reason is a `Mutex<Option<String>>`: a string can't live in an atomic, and it is
//!   written only on a rare state change and read by scrapes and health checks, never by the
//!   delivery path. The `paused` gauge is set while the lock is held, so it always agrees with
//!   the last reason written.

use std::fmt::{self, Write as _};
use std::future::ready;
use std::io;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex, MutexGuard};

use http_body_util::Full;
use hyper::header::{HeaderValue, CONTENT_TYPE};
use hyper::{body::Bytes, body::Incoming};
use hyper::{Method, Request, Response, StatusCode};
use prometheus_client::encoding::{text::encode, EncodeLabelSet, EncodeLabelValue, LabelValueEncoder};
use prometheus_client::metrics::{counter::Counter, family::Family, gauge::Gauge, histogram::Histogram};
use prometheus_client::registry::{Registry, Unit};

/// Upper bounds (seconds) of the Keap request duration histogram; `+Inf` is implicit.
pub(crate) const DURATION_BUCKETS: [f64; 12] =
    [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0];
/// The `/metrics` content type of the OpenMetrics text that prometheus-client encodes.
pub(crate) const CONTENT_TYPE_METRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// The final result of one delivery attempt, the `outcome` label of `keap_sync_deliveries_total`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) enum DeliveryOutcome {
    Synced,
    Unchanged,
    Deleted,
    Retried,
    Parked,
}

impl DeliveryOutcome {
    const ALL: [DeliveryOutcome; 5] =
        [Self::Synced, Self::Unchanged, Self::Deleted, Self::Retried, Self::Parked];
}

impl EncodeLabelValue for DeliveryOutcome {
    fn encode(&self, encoder: &mut LabelValueEncoder) -> Result<(), fmt::Error> {
        encoder.write_str(match self {
            Self::Synced => "synced",
            Self::Unchanged => "unchanged",
            Self::Deleted => "deleted",
            Self::Retried => "retried",
            Self::Parked => "parked",
        })
    }
}

/// The `method` label: the HTTP methods the Keap client uses, and `OTHER` for any other name.
#[allow(clippy::upper_case_acronyms)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, EncodeLabelValue)]
enum HttpMethod {
    GET,
    PUT,
    PATCH,
    POST,
    DELETE,
    OTHER,
}

impl HttpMethod {
    #[cfg(test)]
    const ALL: [HttpMethod; 6] = [Self::GET, Self::PUT, Self::PATCH, Self::POST, Self::DELETE, Self::OTHER];

    /// The method label for a method name; anything unusual is `OTHER`, so labels stay few.
    fn from_name(name: &str) -> HttpMethod {
        match name {
            "GET" => Self::GET,
            "PUT" => Self::PUT,
            "PATCH" => Self::PATCH,
            "POST" => Self::POST,
            "DELETE" => Self::DELETE,
            _ => Self::OTHER,
        }
    }
}

/// The `status_class` label; `Error` is a call without a usable answer.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum StatusClass {
    Success,
    ClientError,
    ServerError,
    Error,
}

impl StatusClass {
    #[cfg(test)]
    const ALL: [StatusClass; 4] = [Self::Success, Self::ClientError, Self::ServerError, Self::Error];

    /// The status class label of an HTTP status: 2xx, 4xx, 5xx, or anything else as an error.
    fn of(status: u16) -> StatusClass {
        match status {
            200..=299 => Self::Success,
            400..=499 => Self::ClientError,
            500..=599 => Self::ServerError,
            _ => Self::Error,
        }
    }
}

impl EncodeLabelValue for StatusClass {
    fn encode(&self, encoder: &mut LabelValueEncoder) -> Result<(), fmt::Error> {
        encoder.write_str(match self {
            Self::Success => "2xx",
            Self::ClientError => "4xx",
            Self::ServerError => "5xx",
            Self::Error => "error",
        })
    }
}

// The derive writes a variant's name as the label value, so these three enums spell theirs in
// lower case, as Prometheus label values usually are.
#[allow(non_camel_case_types)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, EncodeLabelValue)]
enum RefreshResult {
    ok,
    failed,
}

#[allow(non_camel_case_types)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, EncodeLabelValue)]
enum QueueKind {
    live,
    retry,
    backfill,
    parked,
}

impl QueueKind {
    const ALL: [QueueKind; 4] = [Self::live, Self::retry, Self::backfill, Self::parked];
}

#[allow(non_camel_case_types)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, EncodeLabelValue)]
enum QuotaWindow {
    minute,
    day,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash, EncodeLabelSet)]
struct OutcomeLabels {
    outcome: DeliveryOutcome,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash, EncodeLabelSet)]
struct RequestLabels {
    method: HttpMethod,
    status_class: StatusClass,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash, EncodeLabelSet)]
struct MethodLabels {
    method: HttpMethod,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash, EncodeLabelSet)]
struct ResultLabels {
    result: RefreshResult,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash, EncodeLabelSet)]
struct ClassLabels {
    class: String,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash, EncodeLabelSet)]
struct StateLabels {
    state: String,
}

/// The states Keap gives a hook; each has a series (at zero) once hooks are watched.
const HOOK_STATES: [&str; 3] = ["Verified", "Unverified", "Inactive"];

#[derive(Clone, Debug, PartialEq, Eq, Hash, EncodeLabelSet)]
struct KindLabels {
    kind: QueueKind,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash, EncodeLabelSet)]
struct WindowLabels {
    window: QuotaWindow,
}

/// A Keap request duration histogram with [`DURATION_BUCKETS`].
fn duration_histogram() -> Histogram {
    Histogram::new(DURATION_BUCKETS)
}

/// All metrics of one daemon; share it as `Arc<Metrics>`. Every method takes `&self`.
///
/// The fields are handles onto the metrics registered in `registry` (each a clone sharing the
/// same atomic or map), kept so recording needs no lookup by name.
#[derive(Debug)]
pub(crate) struct Metrics {
    registry: Registry,
    deliveries: Family<OutcomeLabels, Counter>,
    keap_requests: Family<RequestLabels, Counter>,
    keap_durations: Family<MethodLabels, Histogram, fn() -> Histogram>,
    throttled: Counter,
    /// Shared properties changed on both sides, settled by `prefer` (`deliver::take`).
    conflicts: Counter,
    token_refreshes: Family<ResultLabels, Counter>,
    outbox_depth: Family<KindLabels, Gauge>,
    oldest_pending_age: Gauge<f64, AtomicU64>,
    /// Holds a window only while its quota is known.
    quota_remaining: Family<WindowLabels, Gauge>,
    database_connected: Gauge,
    paused: Gauge,
    /// Keap's newest change known to be in the mirror, as Unix seconds (age: `time() - it`).
    mirror_watermark: Gauge<f64, AtomicU64>,
    /// The last whole-table reconcile's users by class (only classes other than in sync).
    reconcile_drift: Family<ClassLabels, Gauge>,
    /// Our hook subscriptions by state, as the watchdog last found them.
    hooks: Family<StateLabels, Gauge>,
    /// Why delivery stopped; `paused` is written under this lock, see the module docs.
    fatal: Mutex<Option<String>>,
    /// What works, but not fully (a hook not Verified): `/healthz` still answers 200, saying so.
    degraded: Mutex<Option<String>>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// All zero; the database counts as not connected until [`Metrics::set_db_connected`].
    pub(crate) fn new() -> Metrics {
        // Series of every outcome, token result and queue kind exist (at zero) from the start.
        let deliveries = Family::<OutcomeLabels, Counter>::default();
        for outcome in DeliveryOutcome::ALL {
            let _ = deliveries.get_or_create(&OutcomeLabels { outcome });
        }
        let token_refreshes = Family::<ResultLabels, Counter>::default();
        for result in [RefreshResult::ok, RefreshResult::failed] {
            let _ = token_refreshes.get_or_create(&ResultLabels { result });
        }
        let outbox_depth = Family::<KindLabels, Gauge>::default();
        for kind in QueueKind::ALL {
            let _ = outbox_depth.get_or_create(&KindLabels { kind });
        }
        let mut m = Metrics {
            registry: Registry::with_prefix("keap_sync"),
            deliveries,
            keap_requests: Family::default(),
            keap_durations: Family::new_with_constructor(duration_histogram),
            throttled: Counter::default(),
            conflicts: Counter::default(),
            token_refreshes,
            outbox_depth,
            oldest_pending_age: Gauge::default(),
            quota_remaining: Family::default(),
            database_connected: Gauge::default(),
            paused: Gauge::default(),
            mirror_watermark: Gauge::default(),
            reconcile_drift: Family::default(),
            hooks: Family::default(),
            fatal: Mutex::new(None),
            degraded: Mutex::new(None),
        };
        // In exposition order. Counters are named without `_total`, which the encoder appends
        // (as it appends a full stop to each help text).
        let r = &mut m.registry;
        r.register("deliveries", "Finished deliveries by outcome", m.deliveries.clone());
        r.register("keap_requests", "Keap HTTP calls by method and status class", m.keap_requests.clone());
        let help = "Duration of Keap HTTP calls, including failed ones";
        r.register_with_unit("keap_request_duration", help, Unit::Seconds, m.keap_durations.clone());
        r.register("keap_throttled", "Keap answers with status 429", m.throttled.clone());
        let help = "Shared properties changed on both sides and settled by prefer (keap_sync.conflict)";
        r.register("conflicts", help, m.conflicts.clone());
        r.register("token_refreshes", "OAuth token refreshes by result", m.token_refreshes.clone());
        r.register("outbox_depth", "Outbox rows by kind", m.outbox_depth.clone());
        let help = "Age of the oldest undelivered change";
        r.register_with_unit("oldest_pending_age", help, Unit::Seconds, m.oldest_pending_age.clone());
        let help = "Keap calls left in the rate limit window";
        r.register("quota_remaining", help, m.quota_remaining.clone());
        let help = "1 while the database connection is up";
        r.register("database_connected", help, m.database_connected.clone());
        r.register("paused", "1 while delivery is stopped by a fatal condition", m.paused.clone());
        let help = "Keap's newest change known to be in keap-sync's mirror, as Unix time";
        r.register_with_unit("mirror_watermark", help, Unit::Seconds, m.mirror_watermark.clone());
        let help = "Users not in sync with Keap at the last reconcile, by class";
        r.register("reconcile_drift", help, m.reconcile_drift.clone());
        r.register("hooks", "Our Keap hook subscriptions by state", m.hooks.clone());
        m
    }

    /// Sets our hooks' counts by state (`keap_sync_hooks{state}`) and, when one is not Verified,
    /// the degraded reason `/healthz` shows (cleared otherwise).
    pub(crate) fn set_hooks(&self, states: &[&str]) {
        self.hooks.clear();
        for state in HOOK_STATES.iter().chain(states) {
            let _ = self.hooks.get_or_create(&StateLabels { state: (*state).to_owned() });
        }
        for state in states {
            self.hooks.get_or_create(&StateLabels { state: (*state).to_owned() }).inc();
        }
        let bad: Vec<&str> = states.iter().copied().filter(|s| *s != "Verified").collect();
        let reason = (!bad.is_empty()).then(|| {
            format!(
                "{} of our Keap hooks not Verified ({}); the sweep runs faster meanwhile",
                bad.len(),
                bad.join(", ")
            )
        });
        *self.degraded.lock().unwrap_or_else(|poisoned| poisoned.into_inner()) = reason;
    }

    /// Why the daemon works only in part, if it does (`/healthz` answers 200 with it).
    pub(crate) fn degraded(&self) -> Option<String> {
        self.degraded.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).clone()
    }

    /// Counts one finished delivery (`keap_sync_deliveries_total{outcome}`).
    pub(crate) fn delivery(&self, outcome: DeliveryOutcome) {
        self.deliveries.get_or_create(&OutcomeLabels { outcome }).inc();
    }

    /// Counts one Keap HTTP call and observes its duration. `method` is an HTTP method name; any
    /// but GET, PUT, PATCH, POST and DELETE counts as `method="OTHER"`. `status` 0 means no
    /// answer (connect error, timeout); 1xx/3xx and out-of-range codes are not usable answers
    /// either, so all of those count as `status_class="error"`. Negative or NaN durations count
    /// as 0.
    pub(crate) fn keap_call(&self, method: &'static str, status: u16, seconds: f64) {
        let method = HttpMethod::from_name(method);
        let status_class = StatusClass::of(status);
        self.keap_requests.get_or_create(&RequestLabels { method, status_class }).inc();
        self.keap_durations.get_or_create(&MethodLabels { method }).observe(seconds.max(0.0));
    }

    /// Counts one 429 answer from Keap (`keap_sync_keap_throttled_total`).
    pub(crate) fn throttled(&self) {
        self.throttled.inc();
    }

    /// Counts conflicts settled over shared properties (`keap_sync_conflicts_total`).
    pub(crate) fn conflicts(&self, n: u64) {
        self.conflicts.inc_by(n);
    }

    /// Counts one OAuth token refresh (`keap_sync_token_refreshes_total{result="ok|failed"}`).
    pub(crate) fn token_refresh(&self, ok: bool) {
        let result = if ok { RefreshResult::ok } else { RefreshResult::failed };
        self.token_refreshes.get_or_create(&ResultLabels { result }).inc();
    }

    /// Sets the outbox depth gauges and the age of the oldest pending change.
    pub(crate) fn set_queue(
        &self,
        live: i64,
        retry: i64,
        backfill: i64,
        parked: i64,
        oldest_pending_age_seconds: f64,
    ) {
        for (kind, depth) in QueueKind::ALL.into_iter().zip([live, retry, backfill, parked]) {
            self.outbox_depth.get_or_create(&KindLabels { kind }).set(depth);
        }
        self.oldest_pending_age.set(oldest_pending_age_seconds.max(0.0));
    }

    /// Sets the rate limiter's remaining quota; a `None` window has no sample until it is known.
    pub(crate) fn set_quota(&self, minute_available: Option<i64>, day_available: Option<i64>) {
        for (window, left) in [(QuotaWindow::minute, minute_available), (QuotaWindow::day, day_available)] {
            let labels = WindowLabels { window };
            match left {
                Some(left) => {
                    self.quota_remaining.get_or_create(&labels).set(left);
                }
                None => {
                    self.quota_remaining.remove(&labels);
                }
            }
        }
    }

    /// Sets the mirror's watermark (Unix seconds) and the last reconcile's counts by class, as
    /// read after a sweep.
    pub(crate) fn set_mirror(&self, watermark_unix: Option<f64>, drift: &[(String, i64)]) {
        self.mirror_watermark.set(watermark_unix.unwrap_or(0.0));
        self.reconcile_drift.clear();
        for (class, n) in drift {
            self.reconcile_drift.get_or_create(&ClassLabels { class: class.clone() }).set(*n);
        }
    }

    /// Sets `keap_sync_database_connected`; `/healthz` fails while it is 0.
    pub(crate) fn set_db_connected(&self, up: bool) {
        self.database_connected.set(i64::from(up));
    }

    /// Sets (or with `None` clears) why the daemon stopped delivering, e.g.
    /// "re-authorisation needed"; `/healthz` reports it and `keap_sync_paused` is 1 meanwhile.
    pub(crate) fn set_fatal(&self, reason: Option<String>) {
        let mut fatal = self.fatal();
        self.paused.set(i64::from(reason.is_some()));
        *fatal = reason;
    }

    /// The fatal reason; a panic while it was held does not lock out `/healthz` (a poisoned lock is
    /// taken anyway).
    fn fatal(&self) -> MutexGuard<'_, Option<String>> {
        self.fatal.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Ok while the database is connected and no fatal reason is set; otherwise every reason.
    pub(crate) fn healthy(&self) -> Result<(), String> {
        let mut reasons: Vec<String> = self.fatal().iter().cloned().collect();
        if self.database_connected.get() == 0 {
            reasons.push("database not connected".to_string());
        }
        if reasons.is_empty() {
            Ok(())
        } else {
            Err(reasons.join("; "))
        }
    }

    /// Deliveries counted with `outcome`.
    #[cfg(test)]
    fn deliveries(&self, outcome: DeliveryOutcome) -> u64 {
        self.deliveries.get_or_create(&OutcomeLabels { outcome }).get()
    }

    /// Keap requests counted, over every method and status class.
    #[cfg(test)]
    fn keap_requests(&self) -> u64 {
        let labels = HttpMethod::ALL.into_iter().flat_map(|method| {
            StatusClass::ALL.into_iter().map(move |status_class| RequestLabels { method, status_class })
        });
        labels.filter_map(|l| self.keap_requests.get(&l).map(|n| n.get())).sum()
    }

    /// The OpenMetrics text exposition of this instance's registry, ending in `# EOF`.
    pub(crate) fn render(&self) -> String {
        let mut out = String::with_capacity(4096);
        // Writing to a String can't fail, nor can encoding these fixed label values; should
        // it ever, a scrape gets what was written rather than the daemon a panic.
        if let Err(e) = encode(&mut out, &self.registry) {
            tracing::error!(error = %e, "could not encode the metrics");
        }
        out
    }
}

/// Serves `GET /metrics` and `GET /healthz` (200 "ok", or 503 with the reason); anything else is
/// 404. Runs until the future is dropped or aborted, which also closes open connections.
///
/// The caller binds `listener`, so tests can use port 0 and the daemon reports bind errors
/// itself. A listener not on a loopback address is refused with `InvalidInput`: the endpoints
/// have no authentication and reveal queue sizes and failure reasons, so they are for a local
/// scraper or agent only (expose them further through something that authenticates).
pub(crate) async fn serve(listener: tokio::net::TcpListener, metrics: Arc<Metrics>) -> io::Result<()> {
    let addr = listener.local_addr()?;
    if !addr.ip().to_canonical().is_loopback() {
        let msg = format!("metrics listener must be on a loopback address (127.0.0.1 or ::1), not {addr}");
        return Err(io::Error::new(io::ErrorKind::InvalidInput, msg));
    }
    crate::http::serve(listener, "metrics", move |req| ready(respond(&metrics, &req))).await
}

/// Answers `GET /metrics` and `GET /healthz` (503 with the reasons when unhealthy); anything else is
/// a 404.
fn respond(metrics: &Metrics, req: &Request<Incoming>) -> Response<Full<Bytes>> {
    let (status, content_type, body) = match (req.method(), req.uri().path()) {
        (&Method::GET, "/metrics") => (StatusCode::OK, CONTENT_TYPE_METRICS, metrics.render()),
        (&Method::GET, "/healthz") => match (metrics.healthy(), metrics.degraded()) {
            (Ok(()), None) => (StatusCode::OK, "text/plain; charset=utf-8", "ok\n".to_string()),
            (Ok(()), Some(why)) => {
                (StatusCode::OK, "text/plain; charset=utf-8", format!("degraded: {why}\n"))
            }
            (Err(reason), _) => {
                (StatusCode::SERVICE_UNAVAILABLE, "text/plain; charset=utf-8", format!("{reason}\n"))
            }
        },
        _ => (StatusCode::NOT_FOUND, "text/plain; charset=utf-8", "not found\n".to_string()),
    };
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    response.headers_mut().insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    response
}

#[cfg(test)]
#[allow(clippy::disallowed_methods, reason = "a test owns the servers it spawns; they end with it")]
mod tests {
    use super::*;
    use std::collections::HashMap;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    fn valid_name(n: &str) -> bool {
        let ok = |c: char| c.is_ascii_alphanumeric() || c == '_' || c == ':';
        n.starts_with(|c: char| !c.is_ascii_digit()) && n.chars().all(ok)
    }

    /// A strict parser of the OpenMetrics subset `render` may emit (panics on anything else),
    /// giving each sample's value keyed by `name{k="v",..}` with the labels sorted by name, so
    /// lookups don't depend on the order the encoder writes them in.
    fn parse(text: &str) -> HashMap<String, f64> {
        let body = text.strip_suffix("# EOF\n").unwrap_or_else(|| panic!("no final # EOF:\n{text}"));
        let (mut help, mut kinds, mut samples) = (Vec::new(), HashMap::new(), HashMap::new());
        for line in body.lines() {
            if let Some((name, _)) = line.strip_prefix("# HELP ").and_then(|r| r.split_once(' ')) {
                assert!(valid_name(name) && !help.contains(&name), "{line}");
                help.push(name);
            } else if let Some((name, kind)) = line.strip_prefix("# TYPE ").and_then(|r| r.split_once(' ')) {
                assert!(help.contains(&name) && ["counter", "gauge", "histogram"].contains(&kind), "{line}");
                assert!(kinds.insert(name, kind).is_none(), "second TYPE: {line}");
            } else if let Some((name, unit)) = line.strip_prefix("# UNIT ").and_then(|r| r.split_once(' ')) {
                assert!(kinds.contains_key(name) && name.ends_with(&format!("_{unit}")), "{line}");
            } else {
                assert!(!line.starts_with('#'), "unexpected comment: {line}");
                let (series, value) = line.rsplit_once(' ').unwrap_or_else(|| panic!("{line:?}"));
                let value: f64 = value.parse().unwrap_or_else(|_| panic!("value: {line}"));
                let (name, labels) = match series.split_once('{') {
                    None => (series, Vec::new()),
                    Some((name, labels)) => (name, parse_labels(labels.strip_suffix('}').expect(line), line)),
                };
                // The suffixes each type's samples carry in OpenMetrics.
                let family = [("_total", "counter"), ("_bucket", "histogram"), ("_sum", "histogram")]
                    .into_iter()
                    .chain([("_count", "histogram"), ("", "gauge")])
                    .find_map(|(suffix, kind)| {
                        name.strip_suffix(suffix).filter(|base| kinds.get(base) == Some(&kind))
                    })
                    .unwrap_or_else(|| panic!("no HELP/TYPE for this sample: {line}"));
                let has_le = labels.iter().any(|(k, _)| k == "le");
                assert_eq!(name.ends_with("_bucket") && family != name, has_le, "le: {line}");
                let key = if labels.is_empty() {
                    name.to_string()
                } else {
                    let pairs: Vec<String> = labels.iter().map(|(k, v)| format!("{k}=\"{v}\"")).collect();
                    format!("{name}{{{}}}", pairs.join(","))
                };
                assert!(samples.insert(key, value).is_none(), "repeated: {line}");
            }
        }
        samples
    }

    /// Parses `k="v",k="v"` (values kept escaped, only `\\`, `\"` and `\n` allowed), sorted by key.
    fn parse_labels(mut s: &str, line: &str) -> Vec<(String, String)> {
        let mut labels = Vec::new();
        loop {
            let (key, rest) = s.split_once("=\"").unwrap_or_else(|| panic!("label: {line}"));
            assert!(valid_name(key) && labels.iter().all(|(k, _)| k != key), "label name: {line}");
            let mut chars = rest.char_indices();
            let end = loop {
                match chars.next().unwrap_or_else(|| panic!("unterminated: {line}")) {
                    (i, '"') => break i,
                    (_, '\\') => assert!(matches!(chars.next(), Some((_, 'n' | '\\' | '"'))), "{line}"),
                    (_, c) => assert!(c != '\n', "{line}"),
                }
            };
            labels.push((key.to_string(), rest[..end].to_string()));
            match &rest[end + 1..] {
                "" => break,
                more => s = more.strip_prefix(',').unwrap_or_else(|| panic!("separator: {line}")),
            }
        }
        labels.sort();
        labels
    }

    #[test]
    fn counters_and_gauges() {
        let m = Metrics::default();
        m.delivery(DeliveryOutcome::Synced);
        m.delivery(DeliveryOutcome::Synced);
        m.delivery(DeliveryOutcome::Parked);
        for _ in 0..3 {
            m.keap_call("PUT", 200, 0.1);
        }
        m.keap_call("PUT", 0, 0.1);
        m.keap_call("PATCH", 503, 0.1);
        m.throttled();
        m.token_refresh(false);
        m.set_queue(3, 2, 1000, 7, 12.5);
        m.set_quota(Some(40), None);
        m.set_fatal(Some("re-authorisation needed".into()));
        assert_eq!((m.deliveries(DeliveryOutcome::Synced), m.deliveries(DeliveryOutcome::Parked)), (2, 1));
        assert_eq!((m.deliveries(DeliveryOutcome::Retried), m.keap_requests()), (0, 5));
        let text = m.render();
        assert!(
            text.contains("\nkeap_sync_keap_requests_total{method=\"PUT\",status_class=\"2xx\"} 3\n"),
            "{text}"
        );
        let s = parse(&text);
        let expected = [
            (r#"keap_sync_deliveries_total{outcome="synced"}"#, 2.0),
            (r#"keap_sync_deliveries_total{outcome="unchanged"}"#, 0.0),
            (r#"keap_sync_keap_requests_total{method="PUT",status_class="2xx"}"#, 3.0),
            (r#"keap_sync_keap_requests_total{method="PUT",status_class="error"}"#, 1.0),
            (r#"keap_sync_keap_requests_total{method="PATCH",status_class="5xx"}"#, 1.0),
            ("keap_sync_keap_throttled_total", 1.0),
            (r#"keap_sync_token_refreshes_total{result="failed"}"#, 1.0),
            (r#"keap_sync_token_refreshes_total{result="ok"}"#, 0.0),
            (r#"keap_sync_outbox_depth{kind="backfill"}"#, 1000.0),
            (r#"keap_sync_outbox_depth{kind="parked"}"#, 7.0),
            ("keap_sync_oldest_pending_age_seconds", 12.5),
            (r#"keap_sync_quota_remaining{window="minute"}"#, 40.0),
            ("keap_sync_database_connected", 0.0),
            ("keap_sync_paused", 1.0),
        ];
        for (series, value) in expected {
            assert_eq!(s.get(series), Some(&value), "{series}");
        }
        assert!(!s.contains_key(r#"keap_sync_keap_requests_total{method="PATCH",status_class="2xx"}"#));
        assert_eq!(m.healthy(), Err("re-authorisation needed; database not connected".into()));
        m.set_fatal(None);
        m.set_db_connected(true);
        assert_eq!(m.healthy(), Ok(()));
        let s = parse(&m.render());
        assert_eq!((s["keap_sync_paused"], s["keap_sync_database_connected"]), (0.0, 1.0));
    }

    #[test]
    fn the_mirror_watermark_and_the_reconcile_counts_are_exposed_and_replaced() {
        let m = Metrics::new();
        m.set_mirror(Some(1_765_000_000.5), &[("differs".into(), 3), ("contact_gone".into(), 1)]);
        let s = parse(&m.render());
        assert_eq!(s.get("keap_sync_mirror_watermark_seconds"), Some(&1_765_000_000.5));
        assert_eq!(s.get(r#"keap_sync_reconcile_drift{class="differs"}"#), Some(&3.0));
        m.set_mirror(Some(1_765_000_300.0), &[("differs".into(), 1)]);
        let s = parse(&m.render());
        assert_eq!(
            s.get(r#"keap_sync_reconcile_drift{class="contact_gone"}"#),
            None,
            "a class no longer found is gone"
        );
        assert_eq!(s.get(r#"keap_sync_reconcile_drift{class="differs"}"#), Some(&1.0));
    }

    #[test]
    fn a_quota_has_no_sample_while_unknown() {
        let m = Metrics::new();
        let window = |s: &HashMap<String, f64>, w: &str| {
            s.get(&format!("keap_sync_quota_remaining{{window=\"{w}\"}}")).copied()
        };
        let s = parse(&m.render());
        assert_eq!((window(&s, "minute"), window(&s, "day")), (None, None));
        m.set_quota(Some(0), Some(9000));
        let s = parse(&m.render());
        assert_eq!((window(&s, "minute"), window(&s, "day")), (Some(0.0), Some(9000.0)));
        m.set_quota(None, Some(8999));
        let s = parse(&m.render());
        assert_eq!((window(&s, "minute"), window(&s, "day")), (None, Some(8999.0)));
    }

    #[test]
    fn histogram_is_cumulative_and_methods_are_bounded() {
        let m = Metrics::new();
        for seconds in [0.003, 0.01, 0.7, 100.0] {
            m.keap_call("GET", 200, seconds);
        }
        let s = parse(&m.render());
        let h = "keap_sync_keap_request_duration_seconds";
        for (le, n) in
            [("0.005", 1.0), ("0.01", 2.0), ("0.5", 2.0), ("1.0", 3.0), ("30.0", 3.0), ("+Inf", 4.0)]
        {
            assert_eq!(s[&format!("{h}_bucket{{le=\"{le}\",method=\"GET\"}}")], n, "le={le}");
        }
        assert_eq!(s[&format!("{h}_count{{method=\"GET\"}}")], 4.0);
        assert!((s[&format!("{h}_sum{{method=\"GET\"}}")] - 100.713).abs() < 1e-9);
        // Names outside the closed set share one series; negative durations count as 0.
        for i in 0..20 {
            m.keap_call(format!("m{i}\"\\\n").leak(), 404, -1.0);
        }
        let s = parse(&m.render());
        assert_eq!(s[r#"keap_sync_keap_requests_total{method="OTHER",status_class="4xx"}"#], 20.0);
        assert_eq!(s[&format!("{h}_bucket{{le=\"0.005\",method=\"OTHER\"}}")], 20.0);
        assert_eq!(s.keys().filter(|k| k.starts_with("keap_sync_keap_requests_total")).count(), 2);
        assert_eq!(m.keap_requests(), 24);
    }

    #[test]
    fn each_instance_has_its_own_registry() {
        let (a, b) = (Metrics::new(), Metrics::new());
        a.delivery(DeliveryOutcome::Deleted);
        a.keap_call("DELETE", 204, 0.2);
        let key = r#"keap_sync_deliveries_total{outcome="deleted"}"#;
        assert_eq!((parse(&a.render())[key], parse(&b.render())[key]), (1.0, 0.0));
        assert_eq!((a.keap_requests(), b.keap_requests()), (1, 0));
    }

    async fn http_get(addr: std::net::SocketAddr, path: &str) -> (u16, String, String) {
        let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
        let request = format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n");
        stream.write_all(request.as_bytes()).await.unwrap();
        let mut text = String::new();
        stream.read_to_string(&mut text).await.unwrap();
        let (head, body) = text.split_once("\r\n\r\n").unwrap();
        let status = head.split(' ').nth(1).unwrap().parse().unwrap();
        (status, head.to_ascii_lowercase(), body.to_string())
    }

    #[tokio::test]
    async fn serves_metrics_and_health_over_http() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let m = Arc::new(Metrics::new());
        let server = tokio::spawn(serve(listener, Arc::clone(&m)));
        m.set_db_connected(true);
        m.delivery(DeliveryOutcome::Deleted);
        assert_eq!(http_get(addr, "/healthz").await.0, 200);
        let (status, head, body) = http_get(addr, "/metrics").await;
        assert_eq!(status, 200);
        let content_type = "\r\ncontent-type: application/openmetrics-text; version=1.0.0; charset=utf-8\r\n";
        assert!(head.contains(content_type), "{head}");
        assert_eq!(parse(&body)[r#"keap_sync_deliveries_total{outcome="deleted"}"#], 1.0);
        m.set_fatal(Some("re-authorisation needed".into()));
        let (status, _, body) = http_get(addr, "/healthz").await;
        assert_eq!((status, body.as_str()), (503, "re-authorisation needed\n"));
        m.set_fatal(None);
        m.set_db_connected(false);
        let (status, _, body) = http_get(addr, "/healthz").await;
        assert_eq!((status, body.as_str()), (503, "database not connected\n"));
        m.set_db_connected(true);
        let (status, _, body) = http_get(addr, "/healthz").await;
        assert_eq!((status, body.as_str()), (200, "ok\n"));
        // A hook not Verified: degraded, not failing; the gauge counts hooks by state.
        m.set_hooks(&["Verified", "Inactive", "Verified"]);
        let (status, _, body) = http_get(addr, "/healthz").await;
        assert_eq!(status, 200);
        assert!(body.starts_with("degraded: 1 of our Keap hooks not Verified (Inactive)"), "{body}");
        let metrics = parse(&http_get(addr, "/metrics").await.2);
        assert_eq!(metrics[r#"keap_sync_hooks{state="Verified"}"#], 2.0);
        assert_eq!(metrics[r#"keap_sync_hooks{state="Inactive"}"#], 1.0);
        assert_eq!(metrics[r#"keap_sync_hooks{state="Unverified"}"#], 0.0);
        m.set_hooks(&["Verified"]);
        assert_eq!(http_get(addr, "/healthz").await.2, "ok\n");
        assert_eq!(http_get(addr, "/metrics/extra").await.0, 404);
        server.abort();
    }

    #[tokio::test]
    async fn refuses_non_loopback_listener() {
        let listener = tokio::net::TcpListener::bind("0.0.0.0:0").await.unwrap();
        let err = serve(listener, Arc::new(Metrics::new())).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidInput);
    }
}
