//! The contact endpoints (list, upsert, create, patch, delete) and the contact store indexed by
//! email, with writes applied as Keap does: arrays replaced whole.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::Instant;

use hyper::Method;
use serde_json::{json, Map, Value};

use super::http::{
    content_type_is, field, json_reply, msg, parse_pairs, reply, url_decode, v2_error, Reply, Req,
};
use super::{rfc3339_ms, rules, unix_ms, Contact, EmailField, EmailFilter, State, Write, UPDATE_MASK_VALUES};

/// The email statuses from which `opt_in_reason` makes an address marketable, as Keap's v1
/// spec lists them ("Unengaged Marketable, Unengaged Non-Marketable, Non-Marketable, Opt-Out:
/// Manual"); every other status stays as it is.
const OPT_IN_LIFTS: [&str; 4] = ["UnengagedMarketable", "UnengagedNonMarketable", "NonMarketable", "Manual"];

impl State {
    /// Everything under `/crm/rest`: auth, rate limits, then the contact endpoints.
    pub(super) fn rest(&mut self, req: &Req) -> Reply {
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
    pub(super) fn contacts_api(&mut self, req: &Req) -> Reply {
        let writes = matches!(req.method, Method::PUT | Method::POST | Method::PATCH);
        if writes && !content_type_is(&req.headers, "application/json") {
            return msg(415, "Content-Type must be application/json");
        }
        let Some(query) = parse_pairs(&req.query) else {
            return msg(400, "Malformed query string");
        };
        let body = &req.body[..];
        if req.path == "/crm/rest/v2/contacts" {
            let listed = if req.method == Method::GET {
                self.list_v2(&query)
            } else {
                Err(msg(405, "Method Not Allowed"))
            };
            return listed.unwrap_or_else(|e| e);
        }
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
            (m, ["hooks", rest @ ..]) => self.hooks_api(m, rest, body),
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
                        Some(c) => Ok(json_reply(200, &self.answer_json(c, &optional(&query), false))),
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

    /// `GET /v1/contacts`: case-insensitive `email` filter over EMAIL1..3, partial unless the
    /// options say exact, paged. Items are RestPartialContacts: no `tag_ids`, `opt_in_reason` or
    /// `origin`.
    pub(super) fn list(&self, query: &[(String, String)]) -> Result<Reply, Reply> {
        let number = |k: &str, default: usize| field(query, k).map_or(Ok(default), str::parse);
        let (Ok(limit), Ok(offset)) = (number("limit", 1000), number("offset", 0)) else {
            return Err(msg(400, "limit and offset must be non-negative integers"));
        };
        let matching: Vec<&Contact> = match (field(query, "email"), self.opts.email_filter) {
            (Some(email), EmailFilter::Exact) => self.contacts.with_email(email).collect(),
            (Some(email), EmailFilter::Partial) => {
                let part = email.to_lowercase();
                let has = |c: &&Contact| {
                    c.email_addresses
                        .iter()
                        .any(|e| e.email.as_deref().is_some_and(|a| a.to_lowercase().contains(&part)))
                };
                self.contacts.values().filter(has).collect()
            }
            (None, _) => self.contacts.values().collect(),
        };
        let optional = optional(query);
        let page: Vec<Value> = matching
            .iter()
            .skip(offset)
            .take(limit.min(1000))
            .map(|c| self.answer_json(c, &optional, true))
            .collect();
        let count = i64::try_from(matching.len()).unwrap_or(i64::MAX);
        Ok(json_reply(200, &json!({"contacts": page, "count": count, "next": null, "previous": null})))
    }

    /// `PUT /v1/contacts`: update the duplicate found by `duplicate_option`, else create.
    pub(super) fn upsert(&mut self, body: &[u8]) -> Result<Reply, Reply> {
        let w = rules::parse_write(body, Write::Upsert, &self.model).map_err(|e| msg(400, &e))?;
        let (id, status) = match self.find_duplicate(&w) {
            Some(id) => {
                self.contacts.edit(id, |c| apply(c, &w, None));
                self.fire_for_api_write("contact.edit", id);
                (id, 200)
            }
            // The spec declares 200 only; a create answering 201 is the stricter reading.
            None => {
                let id = self.create(&w)?.id;
                self.fire_for_api_write("contact.add", id);
                (id, 201)
            }
        };
        self.after_write(id, &w);
        Ok(json_reply(status, &self.answer_json(&self.contacts[&id], &[], false)))
    }

    /// `POST /v1/contacts`: always a new contact.
    pub(super) fn create_from(&mut self, body: &[u8]) -> Result<Reply, Reply> {
        let w = rules::parse_write(body, Write::Create, &self.model).map_err(|e| msg(400, &e))?;
        let c = self.create(&w)?;
        self.fire_for_api_write("contact.add", c.id);
        self.after_write(c.id, &w);
        Ok(json_reply(201, &self.answer_json(&c, &[], false)))
    }

    /// Lowest-id contact sharing one of the request's emails (EMAIL1 tried first) and, for
    /// `EmailAndName`, the same given and family name (case-insensitive).
    pub(super) fn find_duplicate(&self, w: &Map<String, Value>) -> Option<i64> {
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

    pub(super) fn patch(&mut self, id: i64, body: &[u8], query: &[(String, String)]) -> Result<Reply, Reply> {
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
        self.fire_for_api_write("contact.edit", id);
        if mask.is_empty() || mask.iter().any(|m| m == "opt_in_reason") {
            self.after_write(id, &w);
        }
        Ok(json_reply(200, &self.answer_json(&self.contacts[&id], &[], false)))
    }

    /// Validated create: a new contact needs at least one email address or phone number.
    pub(super) fn create(&mut self, w: &Map<String, Value>) -> Result<Contact, Reply> {
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

    pub(super) fn insert_new(&mut self, w: &Map<String, Value>) -> Contact {
        let id = self.store_new(w);
        self.contacts[&id].clone()
    }

    /// Stores a new contact from `w` (not validated) under the next id, and returns that id.
    pub(super) fn store_new(&mut self, w: &Map<String, Value>) -> i64 {
        let id = self.next_id;
        self.next_id += 1;
        let now = Some(rfc3339_ms(unix_ms()));
        let mut c = Contact { id, date_created: now, ..Contact::default() };
        apply(&mut c, w, None);
        self.contacts.insert(c);
        id
    }

    /// Sending `opt_in_reason` marks EMAIL1 marketable, but only from the statuses Keap's v1
    /// spec names ([`OPT_IN_LIFTS`]) unless the options say any status.
    pub(super) fn after_write(&mut self, id: i64, w: &Map<String, Value>) {
        let reason = w.get("opt_in_reason").and_then(Value::as_str).filter(|r| !r.is_empty());
        let email = self.contacts.get(&id).and_then(|c| c.email1().map(str::to_lowercase));
        if let (Some(reason), Some(email)) = (reason, email) {
            if self.opt_in_lifts(&email) {
                self.email_status.remove(&email);
                self.email_opt.insert(email, (true, reason.to_owned()));
            }
        }
    }

    /// Whether an opt-in may make `email` (lower case) marketable now.
    pub(super) fn opt_in_lifts(&self, email: &str) -> bool {
        self.opts.opt_in_from_any_status
            || self.email_status.get(email).is_none_or(|s| OPT_IN_LIFTS.contains(&s.as_str()))
    }

    /// The `email_status` Keap would answer for `email` (lower case).
    pub(super) fn email_status_of(&self, email: &str) -> String {
        match (self.email_status.get(email), self.email_opt.get(email)) {
            (Some(set), _) => set.clone(),
            (None, Some((true, _))) => "UnconfirmedMarketable".into(),
            (None, Some((false, _))) => "Manual".into(),
            (None, None) => "UnengagedMarketable".into(),
        }
    }

    /// A contact as an HTTP answer carries it: [`State::full_json`], without `opt_in_reason`
    /// unless the options say reads return it (Keap's v1 spec lists it in FullContact, but
    /// whether a read answers it is unverified; the strict reading is that it does not).
    pub(super) fn answer_json(&self, c: &Contact, optional: &[String], list: bool) -> Value {
        let mut v = self.full_json(c, optional, list);
        if !self.opts.opt_in_reason_on_reads {
            if let Value::Object(m) = &mut v {
                m.remove("opt_in_reason");
            }
        }
        v
    }

    /// A FullContact (`list`: a RestPartialContact): the stored properties, `custom_fields`,
    /// `job_title` and `lead_source_id` only when asked for in `optional_properties`, plus
    /// properties the fake does not keep, so a client that fails on unknown fields fails here
    /// as it would against Keap.
    pub(super) fn full_json(&self, c: &Contact, optional: &[String], list: bool) -> Value {
        let mut v = serde_json::to_value(c).unwrap_or_else(|_| json!({}));
        let Value::Object(m) = &mut v else { return v };
        for hidden in ["custom_fields", "job_title", "lead_source_id"] {
            if !optional.iter().any(|o| o == hidden) {
                m.remove(hidden);
            }
        }
        let email1 = c.email1().map(str::to_lowercase);
        let status =
            email1.as_deref().map_or_else(|| "UnengagedMarketable".to_owned(), |e| self.email_status_of(e));
        let opted_in = status == "UnconfirmedMarketable";
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
    pub(super) fn model_json(&self) -> Value {
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
}

/// The `optional_properties` a GET asks for (comma-delimited).
pub(super) fn optional(query: &[(String, String)]) -> Vec<String> {
    let list = field(query, "optional_properties").unwrap_or("");
    list.split(',').map(|s| s.trim().to_owned()).filter(|s| !s.is_empty()).collect()
}

pub(super) fn not_found(id: i64) -> Reply {
    msg(404, &format!("Contact {id} not found"))
}

/// The stored contacts by id, with an index of their email addresses (ASCII case folded, as
/// the lookups compare them). Keap finds a contact by email through an index; a fake that
/// scanned every contact would make a 20,000-user first sync cost O(n) per delivery on the
/// fake's side and a benchmark would measure the fake. Every change to a contact goes through
/// [`Contacts::edit`], which re-indexes it.
#[derive(Debug, Default)]
pub(super) struct Contacts {
    pub(super) by_id: BTreeMap<i64, Contact>,
    pub(super) by_email: HashMap<String, BTreeSet<i64>>,
}

impl Contacts {
    pub(super) fn emails(c: &Contact) -> impl Iterator<Item = String> + '_ {
        c.email_addresses.iter().filter_map(|e| e.email.as_deref()).map(str::to_ascii_lowercase)
    }

    pub(super) fn index_emails(&mut self, c: &Contact) {
        for email in Self::emails(c) {
            self.by_email.entry(email).or_default().insert(c.id);
        }
    }

    pub(super) fn unindex_emails(&mut self, c: &Contact) {
        for email in Self::emails(c) {
            if let Some(ids) = self.by_email.get_mut(&email) {
                ids.remove(&c.id);
                if ids.is_empty() {
                    self.by_email.remove(&email);
                }
            }
        }
    }

    pub(super) fn get(&self, id: &i64) -> Option<&Contact> {
        self.by_id.get(id)
    }

    pub(super) fn contains_key(&self, id: &i64) -> bool {
        self.by_id.contains_key(id)
    }

    pub(super) fn values(&self) -> impl Iterator<Item = &Contact> {
        self.by_id.values()
    }

    pub(super) fn insert(&mut self, c: Contact) {
        if let Some(old) = self.by_id.remove(&c.id) {
            self.unindex_emails(&old);
        }
        self.index_emails(&c);
        self.by_id.insert(c.id, c);
    }

    pub(super) fn remove(&mut self, id: &i64) -> Option<Contact> {
        let c = self.by_id.remove(id)?;
        self.unindex_emails(&c);
        Some(c)
    }

    /// Changes contact `id` in place and re-indexes its emails; `None` if there is none.
    pub(super) fn edit<R>(&mut self, id: i64, f: impl FnOnce(&mut Contact) -> R) -> Option<R> {
        let mut c = self.by_id.remove(&id)?;
        self.unindex_emails(&c);
        let r = f(&mut c);
        self.insert(c);
        Some(r)
    }

    /// Contacts having `email` (ASCII case-insensitive) in any of EMAIL1..3, by increasing id.
    pub(super) fn with_email(&self, email: &str) -> impl Iterator<Item = &Contact> {
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

pub(super) fn slot(f: EmailField) -> u8 {
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
pub(super) fn apply(c: &mut Contact, w: &Map<String, Value>, mask: Option<&[String]>) {
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
pub(super) fn email_is_valid(e: &str) -> bool {
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
