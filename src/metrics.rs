//! Process-wide metrics in the Prometheus text exposition format 0.0.4, and a tiny HTTP server
//! for them (`GET /metrics`, `GET /healthz`).
//!
//! Every counter and gauge is an atomic: the delivery path records a result with one relaxed
//! `fetch_add`, never a lock, so a slow scrape can't stall deliveries and a delivery can't stall
//! a scrape. f64 values (durations, ages) are stored as their bit patterns in an [`AtomicU64`];
//! a sum is added with a compare-exchange loop. A scrape reads each atomic on its own, so a
//! render taken mid-update may be one observation off between series; Prometheus tolerates that.
//!
//! Label sets are closed, to bound cardinality: outcomes, status classes, token results, queue
//! kinds and quota windows are enums. The Keap `method` label comes from a `&'static str` in our
//! own code; the first [`METHOD_SLOTS`]` - 1` distinct names get a slot each (claimed once,
//! with a [`OnceLock`]), and any further name is counted under `method="other"`.
//!
//! The only lock is the fatal reason's `Mutex`, written on a rare state change and read by
//! scrapes and health checks, never by the delivery path.

use std::convert::Infallible;
use std::fmt::Write as _;
use std::future::ready;
use std::io;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use http_body_util::Full;
use hyper::header::{HeaderValue, CONTENT_TYPE};
use hyper::{body::Bytes, body::Incoming, server::conn::http1, service::service_fn};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::task::JoinSet;

/// Upper bounds (seconds) of the Keap request duration histogram; `+Inf` is implicit.
pub const DURATION_BUCKETS: [f64; 12] = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0];
/// Distinct `method` label values kept, the last being the shared `"other"`.
pub const METHOD_SLOTS: usize = 16;
/// The `/metrics` content type required by the text format 0.0.4.
pub const CONTENT_TYPE_METRICS: &str = "text/plain; version=0.0.4; charset=utf-8";

/// The final result of one delivery attempt, the `outcome` label of `keap_sync_deliveries_total`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DeliveryOutcome {
    Synced,
    Unchanged,
    Deleted,
    Retried,
    Parked,
}

/// The `outcome` label values, in `DeliveryOutcome` declaration order.
const OUTCOMES: [&str; 5] = ["synced", "unchanged", "deleted", "retried", "parked"];
const STATUS_CLASSES: [&str; 4] = ["2xx", "4xx", "5xx", "error"];
const QUEUE_KINDS: [&str; 4] = ["live", "retry", "backfill", "parked"];
/// Stored in a quota gauge while its value is unknown, so the sample is left out.
const ABSENT: i64 = i64::MIN;

/// Counters and the duration histogram of one Keap `method` label value.
struct MethodSeries {
    name: OnceLock<&'static str>,
    by_class: [AtomicU64; 4],
    /// Per-bucket (not cumulative) counts; the last is `+Inf`. Cumulated when rendered.
    buckets: [AtomicU64; DURATION_BUCKETS.len() + 1],
    sum_bits: AtomicU64,
}

impl MethodSeries {
    fn new(name: OnceLock<&'static str>) -> Self {
        let buckets = std::array::from_fn(|_| AtomicU64::new(0));
        MethodSeries { name, by_class: Default::default(), buckets, sum_bits: AtomicU64::new(0) }
    }
}

/// All metrics of the process; share it as `Arc<Metrics>`. Every method takes `&self`.
pub struct Metrics {
    deliveries: [AtomicU64; 5],
    methods: [MethodSeries; METHOD_SLOTS],
    throttled: AtomicU64,
    token_refreshes: [AtomicU64; 2],
    queue: [AtomicI64; 4],
    oldest_age_bits: AtomicU64,
    quota: [AtomicI64; 2],
    db_connected: AtomicBool,
    fatal: Mutex<Option<String>>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// All zero; the database counts as not connected until [`Metrics::set_db_connected`].
    pub fn new() -> Metrics {
        let mut methods = std::array::from_fn(|_| MethodSeries::new(OnceLock::new()));
        methods[METHOD_SLOTS - 1] = MethodSeries::new(OnceLock::from("other"));
        Metrics {
            deliveries: Default::default(),
            methods,
            throttled: AtomicU64::new(0),
            token_refreshes: Default::default(),
            queue: Default::default(),
            oldest_age_bits: AtomicU64::new(0f64.to_bits()),
            quota: [AtomicI64::new(ABSENT), AtomicI64::new(ABSENT)],
            db_connected: AtomicBool::new(false),
            fatal: Mutex::new(None),
        }
    }

    /// Counts one finished delivery (`keap_sync_deliveries_total{outcome}`).
    pub fn delivery(&self, outcome: DeliveryOutcome) {
        self.deliveries[outcome as usize].fetch_add(1, Relaxed);
    }

    /// Counts one Keap HTTP call and observes its duration. `status` 0 means no answer
    /// (connect error, timeout); 1xx/3xx and out-of-range codes are not usable answers either,
    /// so all of those count as `status_class="error"`. Negative or NaN durations count as 0.
    pub fn keap_call(&self, method: &'static str, status: u16, seconds: f64) {
        let series = self.series(method);
        let class = match status {
            200..=299 => 0,
            400..=499 => 1,
            500..=599 => 2,
            _ => 3,
        };
        series.by_class[class].fetch_add(1, Relaxed);
        let seconds = seconds.max(0.0);
        let bucket = DURATION_BUCKETS.iter().position(|&le| seconds <= le).unwrap_or(DURATION_BUCKETS.len());
        series.buckets[bucket].fetch_add(1, Relaxed);
        // No atomic f64 add: a compare-exchange loop on the bits (fetch_update is that loop).
        let add = |bits| Some((f64::from_bits(bits) + seconds).to_bits());
        let _ = series.sum_bits.fetch_update(Relaxed, Relaxed, add);
    }

    /// The slot of `method`: an existing one, the first free one (claimed), or `"other"`.
    fn series(&self, method: &'static str) -> &MethodSeries {
        for slot in &self.methods[..METHOD_SLOTS - 1] {
            // Slots fill in order and are never freed; a racer may claim this one first.
            if *slot.name.get_or_init(|| method) == method {
                return slot;
            }
        }
        &self.methods[METHOD_SLOTS - 1]
    }

    /// Counts one 429 answer from Keap (`keap_sync_keap_throttled_total`).
    pub fn throttled(&self) {
        self.throttled.fetch_add(1, Relaxed);
    }

    /// Counts one OAuth token refresh (`keap_sync_token_refreshes_total{result="ok|failed"}`).
    pub fn token_refresh(&self, ok: bool) {
        self.token_refreshes[usize::from(!ok)].fetch_add(1, Relaxed);
    }

    /// Sets the outbox depth gauges and the age of the oldest pending change.
    pub fn set_queue(
        &self,
        live: i64,
        retry: i64,
        backfill: i64,
        parked: i64,
        oldest_pending_age_seconds: f64,
    ) {
        for (gauge, value) in self.queue.iter().zip([live, retry, backfill, parked]) {
            gauge.store(value, Relaxed);
        }
        self.oldest_age_bits.store(oldest_pending_age_seconds.max(0.0).to_bits(), Relaxed);
    }

    /// Sets the rate limiter's remaining quota; a `None` window has no sample until it is known.
    pub fn set_quota(&self, minute_available: Option<i64>, day_available: Option<i64>) {
        // i64::MIN is the "unknown" marker; a real quota is never that negative.
        for (gauge, value) in self.quota.iter().zip([minute_available, day_available]) {
            gauge.store(value.unwrap_or(ABSENT), Relaxed);
        }
    }

    pub fn set_db_connected(&self, up: bool) {
        self.db_connected.store(up, Relaxed);
    }

    /// Sets (or with `None` clears) why the daemon stopped delivering, e.g.
    /// "re-authorisation needed"; `/healthz` reports it and `keap_sync_paused` is 1 meanwhile.
    pub fn set_fatal(&self, reason: Option<String>) {
        *self.fatal() = reason;
    }

    fn fatal(&self) -> std::sync::MutexGuard<'_, Option<String>> {
        self.fatal.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Ok while the database is connected and no fatal reason is set; otherwise every reason.
    pub fn healthy(&self) -> Result<(), String> {
        let mut reasons: Vec<String> = self.fatal().iter().cloned().collect();
        if !self.db_connected.load(Relaxed) {
            reasons.push("database not connected".to_string());
        }
        if reasons.is_empty() {
            Ok(())
        } else {
            Err(reasons.join("; "))
        }
    }

    pub fn deliveries(&self, outcome: DeliveryOutcome) -> u64 {
        self.deliveries[outcome as usize].load(Relaxed)
    }

    pub fn keap_requests(&self) -> u64 {
        self.methods.iter().flat_map(|s| &s.by_class).map(|c| c.load(Relaxed)).sum()
    }

    /// The text exposition format 0.0.4: every family has HELP and TYPE before its samples.
    pub fn render(&self) -> String {
        let mut out = String::with_capacity(4096);
        let o = &mut out;
        let load = |a: &AtomicU64| a.load(Relaxed);
        family(o, "keap_sync_deliveries_total", "counter", "Finished deliveries by outcome.");
        for (outcome, n) in OUTCOMES.iter().zip(&self.deliveries) {
            sample(o, "keap_sync_deliveries_total", &[("outcome", outcome)], load(n));
        }
        let used: Vec<(&str, &MethodSeries)> =
            self.methods.iter().filter_map(|s| s.name.get().map(|n| (*n, s))).collect();
        let req = "keap_sync_keap_requests_total";
        family(o, req, "counter", "Keap HTTP calls by method and status class.");
        for (method, series) in &used {
            for (class, n) in STATUS_CLASSES.iter().zip(&series.by_class) {
                sample(o, req, &[("method", method), ("status_class", class)], load(n));
            }
        }
        let hist = "keap_sync_keap_request_duration_seconds";
        family(o, hist, "histogram", "Duration of Keap HTTP calls, including failed ones.");
        for (method, series) in &used {
            let mut cumulative = 0u64;
            for (i, bucket) in series.buckets.iter().enumerate() {
                cumulative += load(bucket);
                let le = DURATION_BUCKETS.get(i).map_or("+Inf".to_string(), |b| num(*b));
                sample(o, &format!("{hist}_bucket"), &[("method", method), ("le", &le)], cumulative);
            }
            let sum = num(f64::from_bits(load(&series.sum_bits)));
            sample(o, &format!("{hist}_sum"), &[("method", method)], sum);
            sample(o, &format!("{hist}_count"), &[("method", method)], cumulative);
        }
        family(o, "keap_sync_keap_throttled_total", "counter", "Keap answers with status 429.");
        sample(o, "keap_sync_keap_throttled_total", &[], load(&self.throttled));
        family(o, "keap_sync_token_refreshes_total", "counter", "OAuth token refreshes by result.");
        for (result, n) in ["ok", "failed"].iter().zip(&self.token_refreshes) {
            sample(o, "keap_sync_token_refreshes_total", &[("result", result)], load(n));
        }
        family(o, "keap_sync_outbox_depth", "gauge", "Outbox rows by kind.");
        for (kind, depth) in QUEUE_KINDS.iter().zip(&self.queue) {
            sample(o, "keap_sync_outbox_depth", &[("kind", kind)], depth.load(Relaxed));
        }
        let age = "keap_sync_oldest_pending_age_seconds";
        family(o, age, "gauge", "Age of the oldest undelivered change.");
        sample(o, age, &[], num(f64::from_bits(load(&self.oldest_age_bits))));
        family(o, "keap_sync_quota_remaining", "gauge", "Keap calls left in the rate limit window.");
        for (window, left) in ["minute", "day"].iter().zip(&self.quota) {
            let left = left.load(Relaxed);
            if left != ABSENT {
                sample(o, "keap_sync_quota_remaining", &[("window", window)], left);
            }
        }
        family(o, "keap_sync_database_connected", "gauge", "1 while the database connection is up.");
        sample(o, "keap_sync_database_connected", &[], u8::from(self.db_connected.load(Relaxed)));
        family(o, "keap_sync_paused", "gauge", "1 while delivery is stopped by a fatal condition.");
        sample(o, "keap_sync_paused", &[], u8::from(self.fatal().is_some()));
        out
    }
}

fn family(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
}

/// One sample line, `name{k="v",..} value`, label values escaped.
fn sample(out: &mut String, name: &str, labels: &[(&str, &str)], value: impl std::fmt::Display) {
    out.push_str(name);
    for (i, (key, val)) in labels.iter().enumerate() {
        let _ = write!(out, "{}{key}=\"{}\"", if i == 0 { '{' } else { ',' }, escape(val));
    }
    let _ = writeln!(out, "{} {value}", if labels.is_empty() { "" } else { "}" });
}

/// A label value with `\`, `"` and newline escaped, as the format requires.
fn escape(value: &str) -> String {
    value.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

/// A sample value or `le` bound: the format spells infinities `+Inf`/`-Inf`.
fn num(v: f64) -> String {
    match v {
        f64::INFINITY => "+Inf".to_string(),
        f64::NEG_INFINITY => "-Inf".to_string(),
        v => v.to_string(),
    }
}

/// Serves `GET /metrics` and `GET /healthz` (200 "ok", or 503 with the reason); anything else is
/// 404. Runs until the future is dropped or aborted, which also closes open connections.
///
/// The caller binds `listener`, so tests can use port 0 and the daemon reports bind errors
/// itself. A listener not on a loopback address is refused with `InvalidInput`: the endpoints
/// have no authentication and reveal queue sizes and failure reasons, so they are for a local
/// scraper or agent only (expose them further through something that authenticates).
pub async fn serve(listener: tokio::net::TcpListener, metrics: Arc<Metrics>) -> io::Result<()> {
    let addr = listener.local_addr()?;
    if !addr.ip().to_canonical().is_loopback() {
        let msg = format!("metrics listener must be on a loopback address (127.0.0.1 or ::1), not {addr}");
        return Err(io::Error::new(io::ErrorKind::InvalidInput, msg));
    }
    // Connections live in the JoinSet, so dropping this future aborts them all.
    let mut connections = JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    let metrics = Arc::clone(&metrics);
                    connections.spawn(async move {
                        let svc = service_fn(move |req| ready(Ok::<_, Infallible>(respond(&metrics, &req))));
                        let conn = http1::Builder::new()
                            .timer(TokioTimer::new())
                            .header_read_timeout(Duration::from_secs(10))
                            .serve_connection(TokioIo::new(stream), svc);
                        let _ = conn.await;
                    });
                }
                // Out of descriptors and the like: back off instead of spinning.
                Err(e) => {
                    tracing::warn!(error = %e, "metrics listener: accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            },
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
        }
    }
}

fn respond(metrics: &Metrics, req: &Request<Incoming>) -> Response<Full<Bytes>> {
    let (status, content_type, body) = match (req.method(), req.uri().path()) {
        (&Method::GET, "/metrics") => (StatusCode::OK, CONTENT_TYPE_METRICS, metrics.render()),
        (&Method::GET, "/healthz") => match metrics.healthy() {
            Ok(()) => (StatusCode::OK, "text/plain; charset=utf-8", "ok\n".to_string()),
            Err(reason) => {
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
mod tests {
    use super::*;
    use std::collections::HashMap;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    fn valid_name(n: &str) -> bool {
        let ok = |c: char| c.is_ascii_alphanumeric() || c == '_' || c == ':';
        n.starts_with(|c: char| !c.is_ascii_digit()) && n.chars().all(ok)
    }

    /// A strict parser of the format subset `render` may emit (panics on anything else), giving
    /// each sample's value keyed by its series as written, `name{k="v",..}`.
    fn parse(text: &str) -> HashMap<String, f64> {
        let (mut help, mut kinds, mut samples) = (Vec::new(), HashMap::new(), HashMap::new());
        for line in text.lines() {
            if let Some((name, _)) = line.strip_prefix("# HELP ").and_then(|r| r.split_once(' ')) {
                assert!(valid_name(name) && !help.contains(&name), "{line}");
                help.push(name);
            } else if let Some((name, kind)) = line.strip_prefix("# TYPE ").and_then(|r| r.split_once(' ')) {
                assert!(help.contains(&name) && ["counter", "gauge", "histogram"].contains(&kind), "{line}");
                assert!(kinds.insert(name, kind).is_none(), "second TYPE: {line}");
            } else {
                let (series, value) = line.rsplit_once(' ').unwrap_or_else(|| panic!("{line:?}"));
                let value: f64 = value.parse().unwrap_or_else(|_| panic!("value: {line}"));
                let name = match series.split_once('{') {
                    None => series,
                    Some((name, labels)) => check_labels(labels.strip_suffix('}').expect(line), line, name),
                };
                let family = ["_bucket", "_sum", "_count"]
                    .iter()
                    .filter_map(|suffix| name.strip_suffix(suffix))
                    .find(|base| kinds.get(base) == Some(&"histogram"))
                    .unwrap_or(name);
                assert!(valid_name(name) && kinds.contains_key(family), "no HELP/TYPE before: {line}");
                let bucket = name.ends_with("_bucket") && family != name;
                assert!(!bucket || series.contains(",le=\""), "bucket without le: {line}");
                assert!(samples.insert(series.to_string(), value).is_none(), "repeated: {line}");
            }
        }
        samples
    }

    /// Checks `k="v",k="v"` with only `\\`, `\"` and `\n` escapes; returns `name`.
    fn check_labels<'a>(mut s: &str, line: &str, name: &'a str) -> &'a str {
        loop {
            let (key, rest) = s.split_once("=\"").unwrap_or_else(|| panic!("label: {line}"));
            assert!(valid_name(key), "label name: {line}");
            let mut chars = rest.char_indices();
            let end = loop {
                match chars.next().unwrap_or_else(|| panic!("unterminated: {line}")) {
                    (i, '"') => break i,
                    (_, '\\') => assert!(matches!(chars.next(), Some((_, 'n' | '\\' | '"'))), "{line}"),
                    (_, c) => assert!(c != '\n', "{line}"),
                }
            };
            match &rest[end + 1..] {
                "" => return name,
                more => s = more.strip_prefix(',').unwrap_or_else(|| panic!("separator: {line}")),
            }
        }
    }

    #[test]
    fn counters_and_gauges() {
        let m = Metrics::default();
        assert!(!m.render().contains("quota_remaining{"));
        m.delivery(DeliveryOutcome::Synced);
        m.delivery(DeliveryOutcome::Synced);
        m.delivery(DeliveryOutcome::Parked);
        m.keap_call("upsert", 200, 0.1);
        m.keap_call("upsert", 0, 0.1);
        m.keap_call("patch", 503, 0.1);
        m.throttled();
        m.token_refresh(false);
        m.set_queue(3, 2, 1000, 7, 12.5);
        m.set_quota(Some(40), None);
        m.set_fatal(Some("re-authorisation needed".into()));
        assert_eq!((m.deliveries(DeliveryOutcome::Synced), m.deliveries(DeliveryOutcome::Parked)), (2, 1));
        assert_eq!((m.deliveries(DeliveryOutcome::Retried), m.keap_requests()), (0, 3));
        let s = parse(&m.render());
        let expected = [
            (r#"keap_sync_deliveries_total{outcome="synced"}"#, 2.0),
            (r#"keap_sync_deliveries_total{outcome="unchanged"}"#, 0.0),
            (r#"keap_sync_keap_requests_total{method="upsert",status_class="error"}"#, 1.0),
            (r#"keap_sync_keap_requests_total{method="patch",status_class="5xx"}"#, 1.0),
            ("keap_sync_keap_throttled_total", 1.0),
            (r#"keap_sync_token_refreshes_total{result="failed"}"#, 1.0),
            (r#"keap_sync_outbox_depth{kind="backfill"}"#, 1000.0),
            ("keap_sync_oldest_pending_age_seconds", 12.5),
            (r#"keap_sync_quota_remaining{window="minute"}"#, 40.0),
            ("keap_sync_database_connected", 0.0),
            ("keap_sync_paused", 1.0),
        ];
        for (series, value) in expected {
            assert_eq!(s.get(series), Some(&value), "{series}");
        }
        assert!(!s.contains_key(r#"keap_sync_quota_remaining{window="day"}"#));
        assert_eq!(m.healthy(), Err("re-authorisation needed; database not connected".into()));
        m.set_fatal(None);
        m.set_db_connected(true);
        assert_eq!(m.healthy(), Ok(()));
    }

    #[test]
    fn histogram_is_cumulative_and_methods_are_bounded() {
        let m = Metrics::new();
        for seconds in [0.003, 0.01, 0.7, 100.0] {
            m.keap_call("get", 200, seconds);
        }
        let s = parse(&m.render());
        let h = "keap_sync_keap_request_duration_seconds";
        for (le, n) in [("0.005", 1.0), ("0.01", 2.0), ("0.5", 2.0), ("1", 3.0), ("30", 3.0), ("+Inf", 4.0)] {
            assert_eq!(s[&format!("{h}_bucket{{method=\"get\",le=\"{le}\"}}")], n, "le={le}");
        }
        assert_eq!(s[&format!("{h}_count{{method=\"get\"}}")], 4.0);
        assert!((s[&format!("{h}_sum{{method=\"get\"}}")] - 100.713).abs() < 1e-9);
        // Past the slots, names share "other"; odd names are escaped.
        for i in 0..20 {
            m.keap_call(format!("m{i}\"\\\n").leak(), 404, 0.0);
        }
        let s = parse(&m.render());
        let req = |method: &str| {
            s[&format!("keap_sync_keap_requests_total{{method=\"{method}\",status_class=\"4xx\"}}")]
        };
        assert_eq!((req(r#"m0\"\\\n"#), req(r#"m13\"\\\n"#), req("other")), (1.0, 1.0, 6.0));
        assert_eq!(m.keap_requests(), 24);
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
        assert!(head.contains("\r\ncontent-type: text/plain; version=0.0.4; charset=utf-8\r\n"), "{head}");
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
