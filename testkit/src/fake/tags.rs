//! Tags (the catalogue, applied and removed per contact) and email opt-outs.

use hyper::Method;
use serde_json::{json, Map, Value};

use super::contacts::not_found;
use super::http::{field, json_reply, msg, reply, Reply};
use super::{rfc3339_ms, unix_ms, State, BAD_INPUT, FIRST_TAG_ID};

impl State {
    /// `/v1/contacts/{id}/tags[/{tagId}]`: list, apply (`{"tagIds": […]}`), remove (`?ids=1,2`
    /// or one by path). More than 100 ids in one call is refused, as the PHP SDK refuses it.
    pub(super) fn contact_tags_api(
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
                        let category = self.tag_category.get(t).and_then(|c| self.tag_categories.get(c));
                        json!({"date_applied": rfc3339_ms(*at), "tag": {"id": t, "name": name, "category": category}})
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
    pub(super) fn tags_api(
        &mut self,
        method: &Method,
        body: &[u8],
        query: &[(String, String)],
    ) -> Result<Reply, Reply> {
        match *method {
            Method::GET => self.list_tags(query),
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
                        let category = b.get("category").and_then(|c| c.get("id")).and_then(Value::as_i64);
                        if category.is_some_and(|c| !self.tag_categories.contains_key(&c)) {
                            return Err(msg(400, "Invalid tag category"));
                        }
                        let id = self.add_tag(n);
                        if let Some(c) = category {
                            self.tag_category.insert(id, c);
                        }
                        Ok(json_reply(
                            201,
                            &json!({"id": id, "name": n, "description": b.get("description"),
                                    "category": self.category_json(id)}),
                        ))
                    }
                    _ => Err(msg(400, "name is required (at most 100 characters)")),
                }
            }
            _ => Err(msg(405, "Method Not Allowed")),
        }
    }

    /// `GET /v1/tags`: `name` (contained, as above), `category` (its id), `limit` (default
    /// 1000, Keap's is not documented), `offset`; `next` is set while more follow. Each tag with
    /// its category (`{id, name, description}`) or `null`.
    fn list_tags(&self, query: &[(String, String)]) -> Result<Reply, Reply> {
        let number = |key: &str| -> Result<Option<usize>, Reply> {
            field(query, key)
                .map(|v| v.parse::<usize>().map_err(|_| msg(400, &format!("Invalid {key}"))))
                .transpose()
        };
        let (limit, offset) =
            (number("limit")?.unwrap_or(1000).clamp(1, 1000), number("offset")?.unwrap_or(0));
        let category = field(query, "category").map(|c| c.parse::<i64>().unwrap_or(-1));
        let name = field(query, "name").map(str::to_lowercase);
        let all: Vec<Value> = self
            .tags
            .iter()
            .filter(|(_, n)| name.as_deref().is_none_or(|want| n.to_lowercase().contains(want)))
            .filter(|(id, _)| category.is_none_or(|c| self.tag_category.get(id) == Some(&c)))
            .map(|(id, n)| json!({"id": id, "name": n, "description": null, "category": self.category_json(*id)}))
            .collect();
        let page: Vec<Value> = all.iter().skip(offset).take(limit).cloned().collect();
        let next = (offset + page.len() < all.len())
            .then(|| format!("/v1/tags?limit={limit}&offset={}", offset + limit));
        Ok(json_reply(200, &json!({"tags": page, "count": page.len(), "next": next, "previous": null})))
    }

    /// Tag `id`'s category as the tag list shows it, or `null`.
    fn category_json(&self, id: i64) -> Value {
        match self.tag_category.get(&id).and_then(|c| Some((c, self.tag_categories.get(c)?))) {
            Some((c, name)) => json!({"id": c, "name": name, "description": null}),
            None => Value::Null,
        }
    }

    /// Adds a tag category; returns its id.
    pub(super) fn add_tag_category(&mut self, name: &str) -> i64 {
        let id = self.tag_categories.keys().next_back().map_or(1, |last| last + 1);
        self.tag_categories.insert(id, name.to_owned());
        id
    }

    /// Applies (`on`) or removes a tag as a person would in Keap's web app: the contact's update
    /// time moves and `contactGroup.applied` / `contactGroup.removed` fires (both unverified
    /// for real Keap: a listing by update time may not see a tag change there). Whether the
    /// contact's tags changed.
    pub(super) fn tag_by_hand(&mut self, contact: i64, tag: i64, on: bool) -> bool {
        let now = unix_ms();
        let applied = self.applied.entry(contact).or_default();
        let changed = if on { applied.insert(tag, now).is_none() } else { applied.remove(&tag).is_some() };
        if changed && self.contacts.edit(contact, |c| c.last_updated = Some(rfc3339_ms(now))).is_some() {
            let key = if on { "contactGroup.applied" } else { "contactGroup.removed" };
            self.hooks.fire(key, contact, rfc3339_ms(now));
        }
        changed
    }

    pub(super) fn add_tag(&mut self, name: &str) -> i64 {
        let id = self.next_tag_id.max(FIRST_TAG_ID);
        self.next_tag_id = id + 1;
        self.tags.insert(id, name.to_owned());
        id
    }

    /// `PUT /v1/emailAddresses/{email}`: body exactly `{"opted_in": bool, "reason": string}`.
    /// An address no contact has answers 404 (strict: the spec declares no such case).
    pub(super) fn opt(&mut self, email: &str, body: &[u8]) -> Result<Reply, Reply> {
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
        let key = email.to_lowercase();
        if opted_in && !self.opt_in_lifts(&key) {
            // Keap leaves an address that unsubscribed or bounced as it is.
            let status = self.email_status_of(&key);
            return Ok(json_reply(200, &json!({"email": email, "opted_in": false, "status": status})));
        }
        self.email_status.remove(&key);
        self.email_opt.insert(key, (opted_in, reason.to_owned()));
        let status = if opted_in { "Unconfirmed" } else { "Opt-Out" };
        Ok(json_reply(200, &json!({"email": email, "opted_in": opted_in, "status": status})))
    }
}
