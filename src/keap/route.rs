//! Keap's v1 routes and request bodies, spelled once: the client sends them, `preview` prints
//! them. A route is a method, a path below the API base and a query; ids are anything that
//! prints, so a plan can name a contact that does not exist yet (`{new}`).

use std::fmt::Display;

use reqwest::Method;
use serde_json::{json, Value};

/// Where one call goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Route {
    pub(crate) method: Method,
    /// Below the API base, e.g. `/v1/contacts/7`.
    pub(crate) path: String,
    pub(crate) query: Vec<(&'static str, String)>,
}

impl Route {
    /// A route with no query yet.
    fn new(method: Method, path: impl Into<String>) -> Route {
        Route { method, path: path.into(), query: Vec::new() }
    }

    /// The route with one more query parameter.
    fn with(mut self, name: &'static str, value: impl Into<String>) -> Route {
        self.query.push((name, value.into()));
        self
    }

    /// `optional_properties=…`, when any are asked for.
    fn optional(self, optional: &[&str]) -> Route {
        if optional.is_empty() {
            self
        } else {
            self.with("optional_properties", optional.join(","))
        }
    }

    /// `PUT /v1/contacts`: create, or update the contact with this email (`duplicate_option`
    /// is in the body).
    pub(crate) fn upsert_contact() -> Route {
        Route::new(Method::PUT, "/v1/contacts")
    }

    /// `PATCH /v1/contacts/{id}?update_mask=…`: only the properties named in `mask`.
    pub(crate) fn update_contact(id: impl Display, mask: &[&str]) -> Route {
        let route = Route::new(Method::PATCH, format!("/v1/contacts/{id}"));
        mask.iter().fold(route, |r, m| r.with("update_mask", *m))
    }

    /// `GET /v1/contacts?email=…`.
    pub(crate) fn find_by_email(email: &str, optional: &[&str]) -> Route {
        Route::new(Method::GET, "/v1/contacts").with("email", email).optional(optional)
    }

    /// `GET /v1/contacts/{id}`.
    pub(crate) fn get_contact(id: impl Display, optional: &[&str]) -> Route {
        Route::new(Method::GET, format!("/v1/contacts/{id}")).optional(optional)
    }

    /// `DELETE /v1/contacts/{id}`.
    pub(crate) fn delete_contact(id: impl Display) -> Route {
        Route::new(Method::DELETE, format!("/v1/contacts/{id}"))
    }

    /// `GET /v1/contacts/model`: the custom fields.
    pub(crate) fn contact_model() -> Route {
        Route::new(Method::GET, "/v1/contacts/model")
    }

    /// `GET /v1/tags?name=…`.
    pub(crate) fn find_tag(name: &str) -> Route {
        Route::new(Method::GET, "/v1/tags").with("name", name).with("limit", "1000")
    }

    /// `GET /v1/tags?limit=…&offset=…`: a page of the whole catalogue.
    pub(crate) fn list_tags(limit: usize, offset: usize) -> Route {
        Route::new(Method::GET, "/v1/tags")
            .with("limit", limit.to_string())
            .with("offset", offset.to_string())
    }

    /// `POST /v1/tags`.
    pub(crate) fn create_tag() -> Route {
        Route::new(Method::POST, "/v1/tags")
    }

    /// `POST /v1/contacts/{id}/tags`, body [`tag_ids`].
    pub(crate) fn apply_tags(contact: impl Display) -> Route {
        Route::new(Method::POST, format!("/v1/contacts/{contact}/tags"))
    }

    /// `DELETE /v1/contacts/{id}/tags?ids=1,2`.
    pub(crate) fn remove_tags(contact: impl Display, ids: &[i64]) -> Route {
        let list: Vec<String> = ids.iter().map(i64::to_string).collect();
        Route::new(Method::DELETE, format!("/v1/contacts/{contact}/tags")).with("ids", list.join(","))
    }

    /// `PUT /v1/emailAddresses/{email}`, body [`opt_out`]; the address is one path segment,
    /// percent-encoded. `None`: not known yet (a plan made before the contact is read).
    pub(crate) fn opt_out(email: Option<&str>) -> Route {
        let Some(email) = email else { return Route::new(Method::PUT, "/v1/emailAddresses/{EMAIL1}") };
        let mut url = reqwest::Url::parse("http://x/v1/emailAddresses/").expect("a constant URL");
        if let Ok(mut segments) = url.path_segments_mut() {
            segments.pop_if_empty().push(email);
        }
        Route::new(Method::PUT, url.path())
    }

    /// `GET /v2/contacts?…`: one page of the v2 listing, ordered by `order_by`, `filter` as
    /// the v2 syntax spells it (`start_update_time==…;end_update_time==…`), only `fields`.
    pub(crate) fn list_contacts(
        order_by: &str,
        filter: &str,
        fields: &str,
        page_token: Option<&str>,
    ) -> Route {
        let mut route =
            Route::new(Method::GET, "/v2/contacts").with("page_size", "1000").with("order_by", order_by);
        if !filter.is_empty() {
            route = route.with("filter", filter);
        }
        route = route.with("fields", fields);
        match page_token {
            Some(token) => route.with("page_token", token),
            None => route,
        }
    }

    /// `GET /v1/hooks`: every REST hook subscription of the app.
    pub(crate) fn list_hooks() -> Route {
        Route::new(Method::GET, "/v1/hooks")
    }

    /// `GET /v1/hooks/event_keys`: the event keys a hook may subscribe to.
    pub(crate) fn hook_event_keys() -> Route {
        Route::new(Method::GET, "/v1/hooks/event_keys")
    }

    /// `POST /v1/hooks`, body [`new_hook`]: subscribes a URL to one event key (Keap then runs
    /// the handshake).
    pub(crate) fn create_hook() -> Route {
        Route::new(Method::POST, "/v1/hooks")
    }

    /// `POST /v1/hooks/{key}/verify`: runs the handshake again (the way out of Inactive).
    pub(crate) fn verify_hook(key: &str) -> Route {
        Route::new(Method::POST, format!("/v1/hooks/{}/verify", segment(key)))
    }

    /// `DELETE /v1/hooks/{key}`.
    pub(crate) fn delete_hook(key: &str) -> Route {
        Route::new(Method::DELETE, format!("/v1/hooks/{}", segment(key)))
    }

    /// `PATCH /v1/contacts/7`, for messages (no query: it may hold an address).
    pub(crate) fn name(&self) -> String {
        format!("{} {}", self.method, self.path)
    }

    /// The path with its query, percent-encoded, as sent: `/v1/contacts/7?update_mask=given_name`.
    pub(crate) fn path_and_query(&self) -> String {
        if self.query.is_empty() {
            return self.path.clone();
        }
        let mut url = reqwest::Url::parse("http://x/").expect("a constant URL");
        url.query_pairs_mut().extend_pairs(self.query.iter().map(|(k, v)| (*k, v.as_str())));
        format!("{}?{}", self.path, url.query().unwrap_or_default())
    }

    /// The method's name, for metrics and plans.
    pub(crate) fn method_name(&self) -> &'static str {
        match self.method {
            Method::PUT => "PUT",
            Method::PATCH => "PATCH",
            Method::DELETE => "DELETE",
            Method::POST => "POST",
            _ => "GET",
        }
    }
}

/// Body of [`Route::apply_tags`].
pub(crate) fn tag_ids(ids: &[impl serde::Serialize]) -> Value {
    json!({ "tagIds": ids })
}

/// Body of [`Route::opt_out`].
pub(crate) fn opt_out(reason: &str) -> Value {
    json!({"opted_in": false, "reason": reason})
}

/// Body of [`Route::create_hook`] (`RestHookRequest`).
pub(crate) fn new_hook(event_key: &str, hook_url: &str) -> Value {
    json!({"eventKey": event_key, "hookUrl": hook_url})
}

/// `text` percent-encoded as one path segment (a hook key is Keap's, so not trusted to be plain).
fn segment(text: &str) -> String {
    let mut url = reqwest::Url::parse("http://x/").expect("a constant URL");
    if let Ok(mut segments) = url.path_segments_mut() {
        segments.pop_if_empty().push(text);
    }
    url.path().trim_start_matches('/').to_owned()
}

/// Body of [`Route::create_tag`].
pub(crate) fn new_tag(name: &str) -> Value {
    json!({"name": name, "description": "Created by keap-sync"})
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes_print_as_sent() {
        assert_eq!(
            Route::update_contact(7, &["given_name", "phone_numbers"]).path_and_query(),
            "/v1/contacts/7?update_mask=given_name&update_mask=phone_numbers"
        );
        assert_eq!(
            Route::remove_tags("{new}", &[1, 2]).path_and_query(),
            "/v1/contacts/{new}/tags?ids=1%2C2"
        );
        assert_eq!(Route::opt_out(Some("a b/c@x.io")).path, "/v1/emailAddresses/a%20b%2Fc@x.io");
        assert_eq!(Route::find_by_email("a+b@x.io", &[]).path_and_query(), "/v1/contacts?email=a%2Bb%40x.io");
        assert_eq!(Route::get_contact(3, &["custom_fields"]).name(), "GET /v1/contacts/3");
        assert_eq!(Route::verify_hook("k1").name(), "POST /v1/hooks/k1/verify");
        assert_eq!(Route::delete_hook("a/b").path, "/v1/hooks/a%2Fb");
    }
}
