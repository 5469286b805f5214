//! The test's handle on a running fake: start it, seed and inspect contacts, tags and tokens,
//! set latency and limits, inject faults, take it down and back up.

use std::io;
use std::net::{Ipv4Addr, SocketAddr, TcpListener as StdListener};
use std::ops::Range;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use serde_json::{json, Map, Value};
use tokio::sync::watch;

use super::contacts::slot;
use super::http::random_token;
use super::server::{rebind, take_down};
use super::{
    lock, rfc3339_ms, rules, unix_ms, Contact, ContactWrite, CustomField, FakeKeap, FakeOptions, FaultRule,
    Inner, RecordedRequest, Refresh, State, TokenGrant, Write, FIRST_FIELD_ID, FIRST_ID,
};

impl FakeKeap {
    /// Starts a fake on a random free port of 127.0.0.1.
    pub async fn start(opts: FakeOptions) -> io::Result<FakeKeap> {
        Self::start_on(SocketAddr::from((Ipv4Addr::LOCALHOST, 0)), opts).await
    }

    /// Starts a fake on `addr` (port 0 = random), which must be a loopback address.
    #[expect(
        clippy::unused_async,
        reason = "async so that it is only called inside a Tokio runtime, which the listener and its task need"
    )]
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

    /// Seeds many contacts as [`FakeKeap::seed_contact`] seeds one (no auth, not logged, not
    /// validated), under one lock and without copying them back: a benchmark's million
    /// contacts without a million HTTP calls. Returns the ids they were given, consecutive and
    /// in the order of `contacts`.
    pub fn seed_contacts(&self, contacts: impl IntoIterator<Item = ContactWrite>) -> Range<i64> {
        let mut st = self.state();
        let first = st.next_id;
        for w in contacts {
            let Ok(Value::Object(w)) = serde_json::to_value(&w) else {
                unreachable!("a ContactWrite is an object")
            };
            st.store_new(&w);
        }
        first..st.next_id
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
    /// recorded, not validated; the `contact.edit` hooks fire). Returns false if there is no
    /// such contact.
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
                st.fire("contact.edit", id);
                drop(st);
                self.kick_hooks();
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

    /// Creates a tag category (as a person would); returns its id.
    pub fn create_tag_category(&self, name: &str) -> i64 {
        self.state().add_tag_category(name)
    }

    /// Creates a tag in category `category` (an id of [`FakeKeap::create_tag_category`]);
    /// returns its id.
    pub fn create_tag_in(&self, name: &str, category: i64) -> i64 {
        let mut st = self.state();
        let id = st.add_tag(name);
        st.tag_category.insert(id, category);
        id
    }

    /// Applies a tag to a contact as a person (or a campaign) would in Keap's web app: the
    /// contact's update time moves, so a sweep sees it, and `contactGroup.applied` fires
    /// (unverified for real Keap). Whether it was not applied before.
    pub fn apply_tag_by_hand(&self, contact_id: i64, tag_id: i64) -> bool {
        let changed = self.state().tag_by_hand(contact_id, tag_id, true);
        self.kick_hooks();
        changed
    }

    /// Removes a tag as [`FakeKeap::apply_tag_by_hand`] applies one (`contactGroup.removed`
    /// fires). Whether it was applied.
    pub fn remove_tag_by_hand(&self, contact_id: i64, tag_id: i64) -> bool {
        let changed = self.state().tag_by_hand(contact_id, tag_id, false);
        self.kick_hooks();
        changed
    }

    /// Applies a tag to a contact as a person would (not logged; the contact's update time
    /// stays and no hook fires: see [`FakeKeap::apply_tag_by_hand`]).
    pub fn apply_tag(&self, contact_id: i64, tag_id: i64) {
        self.state().applied.entry(contact_id).or_default().insert(tag_id, unix_ms());
    }

    /// Removes a tag from a contact as a person would (not logged); whether it was there.
    pub fn remove_tag(&self, contact_id: i64, tag_id: i64) -> bool {
        self.state().applied.get_mut(&contact_id).is_some_and(|t| t.remove(&tag_id).is_some())
    }

    /// The tags applied to a contact.
    pub fn contact_tags(&self, contact_id: i64) -> std::collections::BTreeSet<i64> {
        self.state().applied.get(&contact_id).map(|t| t.keys().copied().collect()).unwrap_or_default()
    }

    /// Puts `email` in Keap status `status` (`ListUnsubscribe`, `HardBounce`, `Manual`, …), as a
    /// person unsubscribing or a bounce would: an `opt_in_reason` lifts only the statuses the
    /// v1 spec names. The contacts holding the address get a new update time, so a sweep of
    /// Keap's changes sees them (that Keap moves it for a status change is unverified; without
    /// it only a full listing would).
    pub fn set_email_status(&self, email: &str, status: &str) {
        let mut st = self.state();
        st.email_opt.remove(&email.to_lowercase());
        st.email_status.insert(email.to_lowercase(), status.to_owned());
        let ids: Vec<i64> = st.contacts.with_email(email).map(|c| c.id).collect();
        let now = rfc3339_ms(unix_ms());
        for id in ids {
            st.contacts.edit(id, |c| c.last_updated = Some(now.clone()));
            st.fire("contact.edit", id);
        }
        drop(st);
        self.kick_hooks();
    }

    /// The `email_status` Keap would answer for this address now.
    pub fn email_status(&self, email: &str) -> String {
        self.state().email_status_of(&email.to_lowercase())
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
            // A person's edit moves the contact's update time, as in Keap.
            c.last_updated = Some(rfc3339_ms(unix_ms()));
        });
        if edited.is_some() {
            state.fire("contact.edit", id);
            drop(state);
            self.kick_hooks();
        }
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
        let existed = st.contacts.remove(&id).is_some();
        if existed {
            st.fire("contact.delete", id);
            drop(st);
            self.kick_hooks();
        }
        existed
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

    /// When each contact call (`/v1/contacts…`, 429s included) reached the fake, in order.
    pub fn contact_call_times(&self) -> Vec<std::time::Instant> {
        let mut at: Vec<std::time::Instant> = self
            .state()
            .requests
            .iter()
            .filter(|r| r.path.starts_with("/crm/rest/v1/contacts"))
            .map(|r| r.at)
            .collect();
        at.sort();
        at
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

    pub(super) fn state(&self) -> MutexGuard<'_, State> {
        lock(&self.inner.state)
    }
}
