//! The OAuth side: tokens minted and rotated (single-use refresh tokens), the token endpoint's
//! grants, and each REST request's credential checked.

use std::time::Instant;

use hyper::header::{HeaderMap, AUTHORIZATION};
use hyper::Method;
use serde_json::{json, Value};

use super::http::{
    auth_param, basic_credentials, content_type_is, field, header, json_reply, msg, oauth, parse_pairs,
    random_token, v2_error, Reply, Req,
};
use super::limits::Cred;
use super::{SpentRefreshError, State, TokenGrant, FAKE_SCOPE};

#[derive(Clone, Copy, PartialEq, Eq)]
pub(super) enum Refresh {
    Live,
    Spent,
    Revoked,
}

impl State {
    pub(super) fn mint(&mut self) -> TokenGrant {
        self.mint_for(FAKE_SCOPE)
    }

    pub(super) fn mint_for(&mut self, scope: &str) -> TokenGrant {
        let lifetime = self.opts.access_token_lifetime;
        let (access, refresh) = (random_token("fake-at-"), random_token("fake-rt-"));
        let expiry = Instant::now().checked_add(lifetime);
        self.access.insert(access.clone(), expiry);
        self.refresh.insert(refresh.clone(), Refresh::Live);
        self.issued.push(access.clone());
        self.issued.push(refresh.clone());
        if scope != FAKE_SCOPE {
            self.scopes.insert(refresh.clone(), scope.to_owned());
        }
        TokenGrant {
            access_token: access,
            token_type: "bearer".into(),
            // At least a second, and small enough for any client's signed 64-bit integer.
            expires_in: lifetime.as_secs().clamp(1, i64::MAX.unsigned_abs()),
            refresh_token: refresh,
            scope: scope.to_owned(),
        }
    }

    pub(super) fn client_ok(&self, (id, secret): &(String, String)) -> bool {
        *id == self.opts.client_id && *secret == self.opts.client_secret
    }

    /// `POST /token`: form-encoded refresh and authorization-code grants.
    pub(super) fn token(&mut self, req: &Req) -> Reply {
        if req.method != Method::POST {
            return oauth(405, "invalid_request", "Method not allowed");
        }
        // A JSON (or any non-form) body carries no readable field, as at Keap.
        let form = if content_type_is(&req.headers, "application/x-www-form-urlencoded") {
            let Some(form) = std::str::from_utf8(&req.body).ok().and_then(parse_pairs) else {
                return oauth(400, "invalid_request", "Malformed form body");
            };
            form
        } else {
            Vec::new()
        };
        let get = |k: &str| field(&form, k);
        let basic = basic_credentials(&req.headers);
        let invalid_client = || oauth(401, "invalid_client", "Invalid client credentials");
        match get("grant_type") {
            None => oauth(400, "invalid_request", "response_type or grant_type is required"),
            Some("refresh_token") => {
                // Strict: client credentials only as HTTP Basic for this grant (`docs/keap-api.md`).
                if !basic.is_some_and(|c| self.client_ok(&c)) {
                    return invalid_client();
                }
                let Some(rt) = get("refresh_token") else {
                    return oauth(400, "invalid_request", "refresh_token is required");
                };
                let refused = match self.opts.spent_refresh_error {
                    SpentRefreshError::InvalidGrant => oauth(400, "invalid_grant", "Invalid refresh token"),
                    SpentRefreshError::InvalidRequest => {
                        oauth(400, "invalid_request", "Invalid Refresh Token")
                    }
                };
                match self.refresh.get_mut(rt) {
                    Some(s @ Refresh::Live) => *s = Refresh::Spent,
                    Some(Refresh::Spent) => {
                        self.spent_reuse += 1;
                        return refused;
                    }
                    _ => return refused,
                }
                self.refresh_count += 1;
                let scope = self.scopes.get(rt).cloned();
                self.token_reply(scope)
            }
            Some("authorization_code") => {
                // The PHP SDK sends the client credentials in the body here; Basic works too.
                let body_creds = || Some((get("client_id")?.into(), get("client_secret")?.into()));
                if !basic.or_else(body_creds).is_some_and(|c| self.client_ok(&c)) {
                    return invalid_client();
                }
                let (code, redirect) = (get("code").unwrap_or(""), get("redirect_uri"));
                match self.codes.get_mut(code) {
                    Some((uri, used)) if !*used && Some(uri.as_str()) == redirect => *used = true,
                    _ => return oauth(400, "invalid_grant", "Invalid authorization code"),
                }
                let scope = self.scopes.get(code).cloned();
                self.token_reply(scope)
            }
            Some(_) => oauth(400, "unsupported_grant_type", "grant_type is not supported"),
        }
    }

    /// A new grant for `scope` (`None`: [`FAKE_SCOPE`]).
    pub(super) fn token_reply(&mut self, scope: Option<String>) -> Reply {
        let grant = self.mint_for(scope.as_deref().unwrap_or(FAKE_SCOPE));
        let body = serde_json::to_value(grant).unwrap_or(Value::Null);
        let no_store = vec![("cache-control".into(), "no-store".into())];
        json_reply(200, &body).with_headers(no_store)
    }

    /// Bearer token or API key; anything else is 401. Bearer failures answer the v1 shape,
    /// API-key and missing-credential failures the gateway (v2) shape: the 401 body is not
    /// captured anywhere (`docs/keap-api.md`), so clients must go by the status.
    pub(super) fn authenticate(&self, h: &HeaderMap, now: Instant) -> Result<Cred, Reply> {
        if h.contains_key(AUTHORIZATION) {
            let expiry = auth_param(h, "bearer").and_then(|t| self.access.get(t));
            // Strict: an API key sent as Bearer is not accepted (`docs/keap-api.md`).
            return match expiry {
                Some(e) if e.is_none_or(|e| now < e) => Ok(Cred::OAuth),
                _ => Err(msg(401, "Invalid Access Token")),
            };
        }
        let unauthorized = |text| v2_error(401, json!(401), text, "Unauthorized");
        match header(h, "x-keap-api-key") {
            Some(k) if self.api_keys.contains(k) => Ok(Cred::Key(k.to_owned())),
            Some(_) => Err(unauthorized("Invalid API Key")),
            None => Err(unauthorized("Missing credentials")),
        }
    }
}
