//! Keap's REST hooks, played by the fake (`docs/keap-api.md`, section 9 of the Keap notes):
//! `GET/POST /v1/hooks`, `GET /v1/hooks/event_keys`, `GET/DELETE /v1/hooks/{key}`,
//! `POST /v1/hooks/{key}/verify`; the `X-Hook-Secret` handshake on create and verify (a hook
//! is Verified only when the receiver answers 200 echoing the header); and deliveries.
//!
//! A test's edit through the control API (`edit_contact`, `edit_contact_json`,
//! `set_email_status`, `delete_contact`, [`FakeKeap::fire_hook`]) queues an event, and so does
//! a write through the API, as in Keap (which fires hooks for every change, its API's included):
//! a create, or an upsert that creates, `contact.add`; an upsert that updates an existing contact,
//! or a `PATCH`, `contact.edit`. Each event's `object_keys[].timestamp` is the contact's
//! `last_updated` after the change (what Keap's `timestamp` means is unverified; this is the
//! reading that lets a receiver tell a change it has seen); a deleted contact's, and a
//! [`FakeKeap::fire_hook`]'s, is the time it fired. After
//! [`HookOptions::gather`] the events of each key are sent to every Verified hook of that key,
//! [`HookOptions::batch`] ids a delivery, optionally reordered and duplicated. A delivery that
//! gets no 2xx/3xx answer within [`HookOptions::timeout`] is tried again after each of
//! [`HookOptions::retry`] (Keap: 4 tries over about 36 minutes, here compressed); after the
//! last failure, or at once on a 410, the hook goes Inactive and nothing more is sent to it
//! until it is verified again. Every attempt is recorded ([`HookAttempt`]).
//!
//! Wire types are the fake's own, from the v1 OpenAPI file's `RestHook` and `RestHookRequest`.

use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use hyper::Method;
use rand::seq::SliceRandom;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::task::JoinSet;

use super::http::{json_reply, msg, random_token, Reply, Req};
use super::{lock, rfc3339_ms, unix_ms, FakeKeap, State};

/// The event keys `GET /v1/hooks/event_keys` answers unless a test sets others.
const EVENT_KEYS: &[&str] = &[
    "contact.add",
    "contact.delete",
    "contact.edit",
    "contactGroup.applied",
    "contactGroup.removed",
    "invoice.add",
    "order.add",
];

/// How the fake delivers hook events (compressed from Keap's minutes to a test's seconds).
#[derive(Debug, Clone)]
pub struct HookOptions {
    /// How long events gather before they are sent (Keap: 30-60 s after the change).
    pub gather: Duration,
    /// Ids per delivery (Keap: at most 1,000).
    pub batch: usize,
    /// Shuffle a gathering's events before they are cut into deliveries.
    pub reorder: bool,
    /// Chance that an event is sent twice (the copy may land in another delivery).
    pub duplicate: f64,
    /// The waits before the 2nd, 3rd, … try of a failed delivery (Keap: +30-60 s, +5 min,
    /// +30 min); after the last the hook is Inactive.
    pub retry: Vec<Duration>,
    /// How long a receiver may take to answer (Keap: 30 s).
    pub timeout: Duration,
    /// Send every delivery the receiver accepted once more, this long after its answer, as a
    /// delivery of its own (recorded as a first try); `None`: once.
    pub resend: Option<Duration>,
}

impl Default for HookOptions {
    fn default() -> Self {
        HookOptions {
            gather: Duration::from_millis(50),
            batch: 1000,
            reorder: false,
            duplicate: 0.0,
            retry: vec![Duration::from_millis(300), Duration::from_millis(600), Duration::from_secs(1)],
            timeout: Duration::from_secs(5),
            resend: None,
        }
    }
}

/// A hook subscription as `RestHook` answers it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RestHook {
    /// Keap's key of the subscription.
    pub key: String,
    /// e.g. `contact.edit`.
    pub event_key: String,
    /// Where deliveries go.
    pub hook_url: String,
    /// `Unverified`, `Verified` or `Inactive`.
    pub status: String,
}

/// `RestHookRequest`.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct RestHookRequest {
    event_key: String,
    hook_url: String,
}

/// One try of one delivery, as the fake saw it.
#[derive(Debug, Clone)]
pub struct HookAttempt {
    /// The hook's key.
    pub key: String,
    /// The event key of the delivery.
    pub event_key: String,
    /// The ids it carried, in order (duplicates included).
    pub ids: Vec<i64>,
    /// 1 for the first try (and for the copy [`HookOptions::resend`] sends).
    pub attempt: usize,
    /// The status answered; `None`: no answer in time, or no connection.
    pub status: Option<u16>,
    /// From connecting to the whole answer read.
    pub elapsed: Duration,
}

/// The hooks' part of the fake's state.
#[derive(Default)]
pub(super) struct Hooks {
    subs: Vec<RestHook>,
    event_keys: Option<Vec<String>>,
    /// (event key, contact id, when) not yet sent.
    pending: Vec<(String, i64, String)>,
    attempts: Vec<HookAttempt>,
    /// Events wait, unsent, while held ([`FakeKeap::hold_hooks`]).
    held: bool,
    worker: bool,
    wake: Arc<tokio::sync::Notify>,
    pub(super) options: HookOptions,
}

impl State {
    /// `/v1/hooks…` (auth and limits already passed).
    pub(super) fn hooks_api(&mut self, m: &Method, rest: &[&str], body: &[u8]) -> Result<Reply, Reply> {
        let h = &mut self.hooks;
        match (m, rest) {
            (&Method::GET, ["event_keys"]) => Ok(json_reply(200, &json!(h.keys()))),
            (&Method::GET, []) => Ok(json_reply(200, &json!(h.subs))),
            (&Method::POST, []) => {
                let r: RestHookRequest =
                    serde_json::from_slice(body).map_err(|e| msg(400, &format!("Invalid hook: {e}")))?;
                if !h.keys().contains(&r.event_key) {
                    return Err(msg(400, &format!("Invalid eventKey: {}", r.event_key)));
                }
                let key = random_token("").chars().take(12).collect::<String>();
                let hook = RestHook {
                    key,
                    event_key: r.event_key,
                    hook_url: r.hook_url,
                    status: "Unverified".into(),
                };
                h.subs.push(hook.clone());
                Ok(json_reply(200, &json!(hook)))
            }
            (m, [key, rest @ ..]) => {
                let Some(i) = h.subs.iter().position(|s| s.key == *key) else {
                    return Err(msg(404, "Hook not found"));
                };
                match (m, rest) {
                    (&Method::GET, []) | (&Method::POST, ["verify"]) => {
                        Ok(json_reply(200, &json!(h.subs[i])))
                    }
                    (&Method::DELETE, []) => {
                        h.subs.remove(i);
                        Ok(super::http::reply(204, String::new(), ""))
                    }
                    _ => Err(msg(405, "Method Not Allowed")),
                }
            }
            _ => Err(msg(405, "Method Not Allowed")),
        }
    }
}

impl State {
    /// Queues `event_key` for contact `id` as a change made now: its timestamp is the
    /// contact's `last_updated` (the time it fired when the contact is gone or has none).
    pub(super) fn fire(&mut self, event_key: &str, id: i64) {
        let at = self.contacts.get(&id).and_then(|c| c.last_updated.clone());
        self.hooks.fire(event_key, id, at.unwrap_or_else(|| rfc3339_ms(unix_ms())));
    }

    /// [`State::fire`] for a write through the API, only while a hook of `event_key` is
    /// Verified (Keap sends nothing for an event no hook subscribes to).
    pub(super) fn fire_for_api_write(&mut self, event_key: &str, id: i64) {
        if self.hooks.subscribed(event_key) {
            self.fire(event_key, id);
        }
    }
}

impl Hooks {
    fn keys(&self) -> Vec<String> {
        self.event_keys.clone().unwrap_or_else(|| EVENT_KEYS.iter().map(|k| (*k).to_owned()).collect())
    }

    fn set_status(&mut self, key: &str, status: &str) {
        if let Some(s) = self.subs.iter_mut().find(|s| s.key == key) {
            s.status = status.to_owned();
        }
    }

    /// Queues an event for the hooks of `event_key`, about a change at `at` (RFC 3339).
    pub(super) fn fire(&mut self, event_key: &str, id: i64, at: String) {
        self.pending.push((event_key.to_owned(), id, at));
    }

    /// Whether events of `event_key` have a Verified hook to go to.
    fn subscribed(&self, event_key: &str) -> bool {
        self.subs.iter().any(|s| s.event_key == event_key && s.status == "Verified")
    }

    /// The deliveries due now.
    fn take(&mut self) -> Vec<Due> {
        if self.held {
            return Vec::new();
        }
        let mut events = std::mem::take(&mut self.pending);
        let dups: Vec<_> =
            events.iter().filter(|_| rand::random::<f64>() < self.options.duplicate).cloned().collect();
        events.extend(dups);
        if self.options.reorder {
            events.shuffle(&mut rand::rng());
        }
        let mut out = Vec::new();
        for sub in self.subs.iter().filter(|s| s.status == "Verified") {
            let ids: Vec<(i64, String)> = events
                .iter()
                .filter(|(k, _, _)| *k == sub.event_key)
                .map(|(_, id, at)| (*id, at.clone()))
                .collect();
            for chunk in ids.chunks(self.options.batch.max(1)) {
                out.push(Due {
                    key: sub.key.clone(),
                    url: sub.hook_url.clone(),
                    event_key: sub.event_key.clone(),
                    events: chunk.to_vec(),
                });
            }
        }
        out
    }
}

/// After a `POST /v1/hooks` or `POST /v1/hooks/{key}/verify` that answered 200: the key whose
/// handshake is due.
pub(super) fn handshake_due(req: &Req, answer: &Reply) -> Option<String> {
    let create = req.path == "/crm/rest/v1/hooks";
    let verify = req.path.starts_with("/crm/rest/v1/hooks/") && req.path.ends_with("/verify");
    if req.method != Method::POST || !(create || verify) || answer.status != 200 {
        return None;
    }
    let v: Value = serde_json::from_str(&answer.body).ok()?;
    v.get("key").and_then(Value::as_str).map(str::to_owned)
}

/// Keap's handshake: POST to the hook's URL with a fresh `X-Hook-Secret`; Verified when the
/// answer is 200 and echoes it, Unverified otherwise. Answers the hook as it is then.
pub(super) async fn handshake(state: &Mutex<State>, key: &str) -> Reply {
    let Some(url) = lock(state).hooks.subs.iter().find(|s| s.key == key).map(|s| s.hook_url.clone()) else {
        return msg(404, "Hook not found");
    };
    let secret = random_token("hs-");
    let answer = tokio::time::timeout(Duration::from_secs(5), post(&url, "{}", Some(&secret))).await;
    let ok = matches!(answer, Ok(Ok((200, Some(ref echoed)))) if *echoed == secret);
    let mut st = lock(state);
    st.hooks.set_status(key, if ok { "Verified" } else { "Unverified" });
    let hook = st.hooks.subs.iter().find(|s| s.key == key).cloned();
    json_reply(200, &json!(hook))
}

/// A minimal HTTP/1.1 POST of a JSON body to an `http://` URL: (status, `X-Hook-Secret`).
async fn post(url: &str, body: &str, secret: Option<&str>) -> std::io::Result<(u16, Option<String>)> {
    let bad = || std::io::Error::new(std::io::ErrorKind::InvalidInput, "not an http:// URL");
    let rest = url.strip_prefix("http://").ok_or_else(bad)?;
    let (host, path) = rest.split_once('/').map_or((rest, "/".to_owned()), |(h, p)| (h, format!("/{p}")));
    let mut stream = tokio::net::TcpStream::connect(host).await?;
    let extra = secret.map(|s| format!("X-Hook-Secret: {s}\r\n")).unwrap_or_default();
    let head = format!(
        "POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\
         Connection: close\r\n{extra}\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).await?;
    stream.write_all(body.as_bytes()).await?;
    let mut answer = Vec::new();
    stream.read_to_end(&mut answer).await?;
    let text = String::from_utf8_lossy(&answer);
    let status = text.split(' ').nth(1).and_then(|s| s.parse().ok()).ok_or_else(bad)?;
    let echoed = text
        .split("\r\n\r\n")
        .next()
        .into_iter()
        .flat_map(|h| h.lines())
        .find_map(|l| l.split_once(':').filter(|(n, _)| n.trim().eq_ignore_ascii_case("x-hook-secret")))
        .map(|(_, v)| v.trim().to_owned());
    Ok((status, echoed))
}

/// Sends what [`Hooks::take`] gives, each delivery with its retries, until the fake is gone.
async fn worker(state: Weak<Mutex<State>>, wake: Arc<tokio::sync::Notify>) {
    let mut sending = JoinSet::new();
    loop {
        tokio::select! {
            _ = wake.notified() => {}
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            Some(_) = sending.join_next(), if !sending.is_empty() => continue,
        }
        let Some(st) = state.upgrade() else { return };
        let gather = lock(&st).hooks.options.gather;
        drop(st);
        tokio::time::sleep(gather).await;
        let Some(st) = state.upgrade() else { return };
        let due = lock(&st).hooks.take();
        drop(st);
        for due in due {
            sending.spawn(deliver(Weak::clone(&state), due));
        }
    }
}

/// A delivery due to one hook.
struct Due {
    key: String,
    url: String,
    event_key: String,
    /// (contact id, timestamp) of each event.
    events: Vec<(i64, String)>,
}

/// One delivery and its retries, then its copy if [`HookOptions::resend`] asks for one.
async fn deliver(state: Weak<Mutex<State>>, due: Due) {
    let Due { key, url, event_key, events } = due;
    let keys: Vec<Value> = events.iter().map(|(id, at)| json!({"id": id, "timestamp": at})).collect();
    let body = json!({"event_key": event_key, "object_type": "contact", "object_keys": keys}).to_string();
    let ids: Vec<i64> = events.iter().map(|(id, _)| *id).collect();
    let sending = Sending { state, key, url, event_key, ids, body };
    if !sending.with_retries().await {
        return;
    }
    let Some(st) = sending.state.upgrade() else { return };
    let resend = lock(&st).hooks.options.resend;
    drop(st);
    if let Some(after) = resend {
        tokio::time::sleep(after).await;
        sending.with_retries().await;
    }
}

/// A delivery on its way to one hook.
struct Sending {
    state: Weak<Mutex<State>>,
    key: String,
    url: String,
    event_key: String,
    ids: Vec<i64>,
    body: String,
}

impl Sending {
    /// Sends the delivery until the receiver accepts it (true), or gives up: the hook goes
    /// Inactive after the last failure or a 410.
    async fn with_retries(&self) -> bool {
        let Some(st) = self.state.upgrade() else { return false };
        let (retry, timeout) = {
            let st = lock(&st);
            (st.hooks.options.retry.clone(), st.hooks.options.timeout)
        };
        drop(st);
        for attempt in 1..=retry.len() + 1 {
            if attempt > 1 {
                tokio::time::sleep(retry[attempt - 2]).await;
            }
            let Some(st) = self.state.upgrade() else { return false };
            let live = lock(&st).hooks.subs.iter().any(|s| s.key == self.key && s.status == "Verified");
            drop(st);
            if !live {
                return false;
            }
            let started = Instant::now();
            let answer = tokio::time::timeout(timeout, post(&self.url, &self.body, None)).await;
            let status = answer.ok().and_then(Result::ok).map(|(s, _)| s);
            let Some(st) = self.state.upgrade() else { return false };
            let mut st = lock(&st);
            st.hooks.attempts.push(HookAttempt {
                key: self.key.clone(),
                event_key: self.event_key.clone(),
                ids: self.ids.clone(),
                attempt,
                status,
                elapsed: started.elapsed(),
            });
            match status {
                Some(410) => {
                    st.hooks.set_status(&self.key, "Inactive");
                    return false;
                }
                Some(s) if (200..400).contains(&s) => return true,
                _ => {}
            }
        }
        if let Some(st) = self.state.upgrade() {
            lock(&st).hooks.set_status(&self.key, "Inactive");
        }
        false
    }
}

/// Wakes the delivery worker, starting it on `rt` first if need be: events are queued.
pub(super) fn kick(state: &Arc<Mutex<State>>, rt: &tokio::runtime::Handle) {
    let mut st = lock(state);
    let wake = Arc::clone(&st.hooks.wake);
    if !st.hooks.worker {
        st.hooks.worker = true;
        #[allow(clippy::disallowed_methods, reason = "the worker ends when the fake's state is dropped")]
        rt.spawn(worker(Arc::downgrade(state), Arc::clone(&wake)));
    }
    drop(st);
    wake.notify_one();
}

/// After a request through the API: wakes the worker when the request queued events.
pub(super) fn kick_after_request(state: &Arc<Mutex<State>>) {
    if lock(state).hooks.pending.is_empty() {
        return;
    }
    if let Ok(rt) = tokio::runtime::Handle::try_current() {
        kick(state, &rt);
    }
}

impl FakeKeap {
    /// Starts the delivery worker if need be and wakes it: events are queued.
    pub(super) fn kick_hooks(&self) {
        kick(&self.inner.state, &self.inner.rt);
    }

    /// Queues `event_key` events for `ids`, as Keap would after changes made now (each
    /// event's timestamp is now, not the contact's `last_updated`).
    pub fn fire_hook(&self, event_key: &str, ids: &[i64]) {
        {
            let mut st = self.state();
            let now = rfc3339_ms(unix_ms());
            for id in ids {
                st.hooks.fire(event_key, *id, now.clone());
            }
        }
        self.kick_hooks();
    }

    /// The hook subscriptions, as `GET /v1/hooks` answers them.
    pub fn hooks(&self) -> Vec<RestHook> {
        self.state().hooks.subs.clone()
    }

    /// Sets hook `key`'s state as Keap would after failed deliveries (`Inactive`), say.
    pub fn set_hook_status(&self, key: &str, status: &str) {
        self.state().hooks.set_status(key, status);
    }

    /// Every delivery attempt so far.
    pub fn hook_attempts(&self) -> Vec<HookAttempt> {
        self.state().hooks.attempts.clone()
    }

    /// What `GET /v1/hooks/event_keys` answers from now on.
    pub fn set_hook_event_keys(&self, keys: &[&str]) {
        self.state().hooks.event_keys = Some(keys.iter().map(|k| (*k).to_owned()).collect());
    }

    /// How deliveries are gathered, cut, shuffled, duplicated and retried from now on.
    pub fn set_hook_options(&self, options: HookOptions) {
        self.state().hooks.options = options;
    }

    /// Holds every event unsent (`true`), as Keap's 30-60 s before a delivery would, until
    /// released (`false`): then what waited goes out together.
    pub fn hold_hooks(&self, held: bool) {
        self.state().hooks.held = held;
        if !held {
            self.kick_hooks();
        }
    }

    /// Subscribes `url` to `event_key` and runs the handshake, as `POST /v1/hooks` does.
    pub async fn subscribe_hook(&self, event_key: &str, url: &str) -> RestHook {
        let key = random_token("").chars().take(12).collect::<String>();
        let hook = RestHook {
            key: key.clone(),
            event_key: event_key.into(),
            hook_url: url.into(),
            status: "Unverified".into(),
        };
        self.state().hooks.subs.push(hook);
        let _ = handshake(&self.inner.state, &key).await;
        self.hooks().into_iter().find(|h| h.key == key).unwrap_or_else(|| unreachable!("just added"))
    }
}
