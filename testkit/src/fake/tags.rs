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
    pub(super) fn tags_api(
        &mut self,
        method: &Method,
        body: &[u8],
        query: &[(String, String)],
    ) -> Result<Reply, Reply> {
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
