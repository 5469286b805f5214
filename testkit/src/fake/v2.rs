//! `GET /v2/contacts`, the v2 listing: `filter` (`start_update_time`, `end_update_time`,
//! `email`, `contact_ids` (comma-separated), `;`-joined), `order_by` (`id` or `update_time`, `asc`), `page_size` (0..=1000),
//! opaque `page_token`s and `fields`. Written from Keap's v2 OpenAPI file with the v2 shape
//! (ids and tag ids as strings, `update_time`, per-address `email_opt_status`), apart from the
//! client's types. Strictest readings where the spec is silent: without `fields` only the
//! id, names and email addresses come back; an unknown filter field, order or field is a 400.

use base64::Engine as _;
use serde_json::{json, Map, Value};

use super::http::{field, json_reply, v2_error, Reply};
use super::{Contact, State};

/// Items per page when `page_size` is not given.
const DEFAULT_PAGE: usize = 100;

/// What comes back without `fields`.
const DEFAULT_FIELDS: &[&str] = &["id", "given_name", "family_name", "email_addresses"];

/// Every field this fake can return (the v2 spec lists more; asking for those is not an error).
const FIELDS: &[&str] = &[
    "id",
    "given_name",
    "family_name",
    "middle_name",
    "email_addresses",
    "phone_numbers",
    "addresses",
    "custom_fields",
    "tag_ids",
    "update_time",
    "create_time",
    "job_title",
    "birth_date",
    "anniversary_date",
    "leadsource_id",
    "owner_id",
    "website",
    "time_zone",
    "preferred_locale",
    "preferred_name",
    "prefix",
    "suffix",
    "spouse_name",
    "source_type",
    "contact_type",
    "company",
    "notes",
    "origin",
    "score_value",
    "social_accounts",
    "fax_numbers",
    "links",
    "utm_parameters",
    "referral_code",
];

/// The order of a listing: by id, or by update time then id.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Order {
    Id,
    UpdateTime,
}

/// A `filter` parsed: update-time bounds (ms since the epoch) and an email (exact, or a
/// prefix with a trailing `*`).
#[derive(Default)]
struct Filter {
    start: Option<u64>,
    end: Option<u64>,
    email: Option<String>,
    /// `contact_ids==1,2,3` (a set; its spelling is not documented, commas assumed).
    ids: Option<std::collections::HashSet<i64>>,
}

impl Filter {
    fn parse(text: Option<&str>) -> Result<Filter, Reply> {
        let mut f = Filter::default();
        for part in text.unwrap_or("").split(';').filter(|p| !p.is_empty()) {
            let Some((name, value)) = part.split_once("==") else {
                return Err(bad(&format!("Invalid filter expression: {part}")));
            };
            match name.trim() {
                "start_update_time" => f.start = Some(time(value)?),
                "end_update_time" => f.end = Some(time(value)?),
                "email" => f.email = Some(value.trim().to_ascii_lowercase()),
                "contact_ids" => {
                    let ids = value.split(',').map(|id| id.trim().parse::<i64>());
                    let ids = ids
                        .collect::<Result<_, _>>()
                        .map_err(|_| bad(&format!("Invalid contact_ids: {value}")))?;
                    f.ids = Some(ids);
                }
                other => return Err(bad(&format!("Invalid filter field: {other}"))),
            }
        }
        Ok(f)
    }

    fn admits(&self, c: &Contact, updated: u64) -> bool {
        let email_ok = self.email.as_deref().is_none_or(|want| {
            c.email_addresses.iter().filter_map(|e| e.email.as_deref()).any(|e| {
                let e = e.to_ascii_lowercase();
                match want.strip_suffix('*') {
                    Some(prefix) => e.starts_with(prefix),
                    None => e == want,
                }
            })
        });
        let id_ok = self.ids.as_ref().is_none_or(|ids| ids.contains(&c.id));
        id_ok && email_ok && self.start.is_none_or(|s| updated >= s) && self.end.is_none_or(|e| updated <= e)
    }
}

impl State {
    /// `GET /v2/contacts`.
    pub(super) fn list_v2(&self, query: &[(String, String)]) -> Result<Reply, Reply> {
        let page_size = match field(query, "page_size") {
            None => DEFAULT_PAGE,
            Some(s) => s
                .parse::<usize>()
                .ok()
                .filter(|n| *n <= 1000)
                .ok_or_else(|| bad("page_size must be 0 to 1000"))?,
        };
        let order = match field(query, "order_by").map(str::trim) {
            None | Some("id") | Some("id asc") => Order::Id,
            Some("update_time") | Some("update_time asc") => Order::UpdateTime,
            Some(other) => return Err(bad(&format!("Invalid order_by: {other}"))),
        };
        let filter = Filter::parse(field(query, "filter"))?;
        let after = field(query, "page_token").map(decode_token).transpose()?;
        let fields = fields(field(query, "fields"))?;
        let rows = match order {
            // By id: walk the store from the token on, a page at a time (a listing of a million
            // contacts costs each page its own length, not a sort of them all).
            Order::Id => {
                let from = after.map_or(i64::MIN, |(_, id)| id.saturating_add(1));
                let mut rows: Vec<((u64, i64), &Contact)> = self
                    .contacts
                    .by_id
                    .range(from..)
                    .map(|(_, c)| c)
                    .filter(|c| !self.unlisted.contains(&c.id) && filter.admits(c, updated_ms(c)))
                    .map(|c| ((0, c.id), c))
                    .take(page_size + 1)
                    .collect();
                let more = rows.len() > page_size;
                rows.truncate(page_size);
                (rows, more)
            }
            Order::UpdateTime => {
                let mut rows: Vec<((u64, i64), &Contact)> = self
                    .contacts
                    .values()
                    .filter(|c| !self.unlisted.contains(&c.id))
                    .filter_map(|c| {
                        let updated = updated_ms(c);
                        filter.admits(c, updated).then_some(((updated, c.id), c))
                    })
                    .collect();
                rows.sort_unstable_by_key(|(key, _)| *key);
                let start = after.map_or(0, |a| rows.partition_point(|(key, _)| *key <= a));
                let mut rows: Vec<_> = rows.into_iter().skip(start).take(page_size + 1).collect();
                let more = rows.len() > page_size;
                rows.truncate(page_size);
                (rows, more)
            }
        };
        let (page, more) = rows;
        let next = match page.last() {
            Some((key, _)) if more => encode_token(*key),
            _ => String::new(),
        };
        let contacts: Vec<Value> = page.iter().map(|(_, c)| self.v2_json(c, &fields)).collect();
        Ok(json_reply(200, &json!({"contacts": contacts, "next_page_token": next})))
    }

    /// A contact in the v2 shape, with only `fields`.
    fn v2_json(&self, c: &Contact, fields: &[String]) -> Value {
        let mut all = Map::new();
        all.insert("id".into(), json!(c.id.to_string()));
        for (k, v) in [("given_name", &c.given_name), ("family_name", &c.family_name)] {
            if let Some(v) = v {
                all.insert(k.into(), json!(v));
            }
        }
        let emails: Vec<Value> = c
            .email_addresses
            .iter()
            .map(|e| {
                let address = e.email.as_deref().map(str::to_lowercase);
                let set = address.as_deref().and_then(|a| self.email_status.get(a));
                let opted = address.as_deref().and_then(|a| self.email_opt.get(a)).is_some_and(|(o, _)| *o);
                // A status a test set (an unsubscribe, a bounce) in v2's spelling; else as the
                // last opt-in or opt-out left it.
                let (status, opted) = match set {
                    Some(set) => (upper_snake(set), false),
                    None if opted => ("SINGLE_OPT_IN".to_owned(), true),
                    None => ("UNENGAGED_MARKETABLE".to_owned(), false),
                };
                json!({"email": e.email, "field": e.field, "email_opt_status": status, "is_opt_in": opted})
            })
            .collect();
        all.insert("email_addresses".into(), json!(emails));
        let updated = c.last_updated.clone().or_else(|| c.date_created.clone());
        all.insert("update_time".into(), json!(updated));
        all.insert("create_time".into(), json!(c.date_created));
        let tags: Vec<String> =
            self.applied.get(&c.id).map(|t| t.keys().map(i64::to_string).collect()).unwrap_or_default();
        all.insert("tag_ids".into(), json!(tags));
        for (k, v) in &c.extra {
            let (name, v) = match k.as_str() {
                "birthday" => ("birth_date".to_owned(), v.clone()),
                "anniversary" => ("anniversary_date".to_owned(), v.clone()),
                "lead_source_id" => ("leadsource_id".to_owned(), v.clone()),
                "custom_fields" => ("custom_fields".to_owned(), string_ids(v)),
                _ => (k.clone(), v.clone()),
            };
            all.insert(name, v);
        }
        Value::Object(all.into_iter().filter(|(k, _)| fields.iter().any(|f| f == k)).collect())
    }
}

/// v1's `ListUnsubscribe` as v2 spells it: `LIST_UNSUBSCRIBE`.
fn upper_snake(v1: &str) -> String {
    let mut out = String::new();
    for (i, ch) in v1.chars().enumerate() {
        if ch.is_ascii_uppercase() && i > 0 {
            out.push('_');
        }
        out.push(ch.to_ascii_uppercase());
    }
    out
}

/// A contact's update time in ms since the epoch (its creation time if never updated).
fn updated_ms(c: &Contact) -> u64 {
    let text = c.last_updated.as_deref().or(c.date_created.as_deref()).unwrap_or("");
    parse_time(text).unwrap_or(0)
}

/// `[{"id": 12, …}]` → `[{"id": "12", …}]`.
fn string_ids(v: &Value) -> Value {
    let items = v.as_array().cloned().unwrap_or_default();
    let items = items.into_iter().map(|mut i| {
        if let Some(id) = i.get("id").and_then(Value::as_i64) {
            i["id"] = json!(id.to_string());
        }
        i
    });
    Value::Array(items.collect())
}

fn fields(text: Option<&str>) -> Result<Vec<String>, Reply> {
    let Some(text) = text else { return Ok(DEFAULT_FIELDS.iter().map(|s| (*s).to_owned()).collect()) };
    let mut out = vec!["id".to_owned()];
    for f in text.split(',').map(str::trim).filter(|f| !f.is_empty()) {
        if !FIELDS.contains(&f) {
            return Err(bad(&format!("Invalid field: {f}")));
        }
        out.push(f.to_owned());
    }
    Ok(out)
}

fn encode_token(key: (u64, i64)) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(format!("{}:{}", key.0, key.1))
}

fn decode_token(token: &str) -> Result<(u64, i64), Reply> {
    let raw = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(token)
        .map_err(|_| bad("Invalid page_token"))?;
    let text = String::from_utf8(raw).map_err(|_| bad("Invalid page_token"))?;
    let (a, b) = text.split_once(':').ok_or_else(|| bad("Invalid page_token"))?;
    Ok((a.parse().map_err(|_| bad("Invalid page_token"))?, b.parse().map_err(|_| bad("Invalid page_token"))?))
}

fn time(value: &str) -> Result<u64, Reply> {
    parse_time(value.trim()).ok_or_else(|| bad(&format!("Invalid timestamp: {value}")))
}

/// `2024-03-15T10:30:00Z` or `…:00.123Z` → ms since the epoch.
pub(super) fn parse_time(s: &str) -> Option<u64> {
    let s = s.strip_suffix('Z')?;
    let (date, clock) = s.split_once('T')?;
    let mut d = date.split('-').map(str::parse::<i64>);
    let (y, m, day) = (d.next()?.ok()?, d.next()?.ok()?, d.next()?.ok()?);
    let (hms, milli) = clock.split_once('.').unwrap_or((clock, "0"));
    let mut t = hms.split(':').map(str::parse::<i64>);
    let (h, min, sec) = (t.next()?.ok()?, t.next()?.ok()?, t.next()?.ok()?);
    let milli: i64 = format!("{milli:0<3}")[..3].parse().ok()?;
    // Howard Hinnant's days-from-civil.
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    u64::try_from(((days * 24 + h) * 60 + min) * 60_000 + sec * 1000 + milli).ok()
}

fn bad(text: &str) -> Reply {
    v2_error(400, json!(400), text, "INVALID_ARGUMENT")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_read_back_as_written() {
        let ms = 1_723_638_896_789;
        assert_eq!(parse_time(&super::super::rfc3339_ms(ms)), Some(ms));
        assert_eq!(parse_time("1970-01-01T00:00:01Z"), Some(1000));
        assert_eq!(parse_time("2024-02-29T00:00:00.5Z"), Some(1_709_164_800_500));
    }
}
