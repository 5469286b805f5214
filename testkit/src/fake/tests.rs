//! Unit tests of the fake over real HTTP: contacts, tokens, limits, faults, tags.

use std::collections::BTreeSet;
use std::io;

use reqwest::{RequestBuilder, Response as HttpResponse};
use serde::Deserialize;
use serde_json::{json, Value};

use super::*;
use super::{contacts::*, http::*};

/// The fake's error answers, read leniently: v1 `{"message"}`, the gateway's
/// `{"code","message","status","details"}` and the token endpoint's
/// `{"error","error_description"}`. Only the fields the tests look at.
#[derive(Debug, Default, Deserialize)]
struct ErrorReply {
    message: Option<String>,
    code: Option<Value>,
    error: Option<String>,
    error_description: Option<String>,
}

/// A started fake, a plain-HTTP client (no proxy from the environment) and a live token.
struct Kit {
    fake: FakeKeap,
    http: reqwest::Client,
    token: String,
}

impl Kit {
    async fn new(opts: FakeOptions) -> Kit {
        let fake = FakeKeap::start(opts).await.expect("start");
        let token = fake.issue_grant().access_token;
        Kit { fake, http: client(), token }
    }
    fn url(&self, rest: &str) -> String {
        format!("{}/v1/contacts{rest}", self.fake.api_url())
    }
    fn get(&self, rest: &str) -> RequestBuilder {
        self.http.get(self.url(rest)).bearer_auth(&self.token)
    }
    fn put(&self, body: &Value) -> RequestBuilder {
        self.http.put(self.url("")).bearer_auth(&self.token).json(body)
    }
    fn refresh(&self, rt: &str, secret: &str) -> RequestBuilder {
        let form = [("grant_type", "refresh_token"), ("refresh_token", rt)];
        let req = self.http.post(self.fake.token_url()).form(&form);
        req.basic_auth("fake-client-id", Some(secret))
    }
}

fn client() -> reqwest::Client {
    // reqwest is built without a rustls provider; same as `crate::install_crypto_provider`.
    let _ = rustls::crypto::ring::default_provider().install_default();
    reqwest::Client::builder().no_proxy().build().expect("client")
}

async fn send(req: RequestBuilder) -> HttpResponse {
    req.send().await.expect("send")
}

async fn status(req: RequestBuilder) -> u16 {
    send(req).await.status().as_u16()
}

async fn error(req: RequestBuilder) -> ErrorReply {
    send(req).await.json().await.expect("error body")
}

async fn contact(req: RequestBuilder) -> Contact {
    send(req).await.json().await.expect("contact")
}

fn upsert(email: &str, given: &str) -> Value {
    let emails = json!([{"email": email, "field": "EMAIL1"}]);
    json!({"given_name": given, "email_addresses": emails, "duplicate_option": "Email"})
}

#[test]
fn handle_is_send_sync_and_clone() {
    fn check<T: Send + Sync + Clone>() {}
    check::<FakeKeap>();
}

#[tokio::test]
async fn upsert_creates_then_updates_the_same_contact() {
    let k = Kit::new(FakeOptions::default()).await;
    let created = contact(k.put(&upsert("Ada@Example.com", "Ada"))).await;
    assert!(created.id >= FIRST_ID);
    let updated = contact(k.put(&upsert("ada@example.COM", "Ada L."))).await;
    assert_eq!(updated.id, created.id);
    assert_eq!(updated.given_name.as_deref(), Some("Ada L."));
    assert_eq!(updated.email1(), Some("ada@example.COM"));
    assert_eq!(k.fake.contacts().len(), 1);
    // EmailAndName with another name finds no duplicate: a second contact.
    let mut other = upsert("ada@example.com", "Bob");
    other["duplicate_option"] = json!("EmailAndName");
    assert_ne!(contact(k.put(&other)).await.id, created.id);
    assert_eq!(k.fake.contacts_with_email("ADA@example.com").len(), 2);
    // POST always creates, with 201.
    let body = json!({"email_addresses": [{"email": "ada@example.com", "field": "EMAIL1"}]});
    let post = k.http.post(k.url("")).bearer_auth(&k.token).json(&body);
    assert_eq!(status(post).await, 201);
    assert_eq!(k.fake.contacts().len(), 3);
}

#[tokio::test]
async fn get_list_and_delete() {
    let k = Kit::new(FakeOptions::default()).await;
    let email = EmailAddress { email: Some("x@y.io".into()), field: EmailField::Email2 };
    let w = ContactWrite { email_addresses: Some(vec![email]), ..ContactWrite::default() };
    let seeded = k.fake.seed_contact(w);
    assert!(k.fake.requests().is_empty(), "seeding is not logged");
    let list: ContactList = send(k.get("").query(&[("email", "X@Y.IO")])).await.json().await.unwrap();
    assert_eq!((list.count, list.contacts[0].id), (1, seeded.id));
    let one = format!("/{}", seeded.id);
    assert_eq!(status(k.get(&one)).await, 200);
    assert_eq!(status(k.http.delete(k.url(&one)).bearer_auth(&k.token)).await, 204);
    assert_eq!(status(k.get(&one)).await, 404);
    assert_eq!(status(k.get("/abc")).await, 400);
}

#[tokio::test]
async fn patch_honours_update_mask() {
    let k = Kit::new(FakeOptions::default()).await;
    let id = contact(k.put(&upsert("p@q.io", "Old"))).await.id;
    let patch = |mask: &[&str]| {
        let query: Vec<(&str, &str)> = mask.iter().map(|m| ("update_mask", *m)).collect();
        let body = json!({"given_name": "New", "family_name": "Fam"});
        k.http.patch(k.url(&format!("/{id}"))).bearer_auth(&k.token).query(&query).json(&body)
    };
    assert_eq!(status(patch(&["family_name"])).await, 200);
    let after = k.fake.contact(id).unwrap();
    assert_eq!((after.given_name.as_deref(), after.family_name.as_deref()), (Some("Old"), Some("Fam")));
    assert_eq!(status(patch(&["family_name", "given_name"])).await, 200);
    assert_eq!(k.fake.contact(id).unwrap().given_name.as_deref(), Some("New"));
    assert_eq!(status(patch(&["given_name,family_name"])).await, 400);
    let missing = k.http.patch(k.url("/999999")).bearer_auth(&k.token).json(&json!({}));
    assert_eq!(status(missing).await, 404);
}

#[tokio::test]
async fn a_refresh_the_client_gave_up_on_still_rotates_the_pair() {
    let k = Kit::new(FakeOptions::default()).await;
    let grant = k.fake.issue_grant();
    k.fake.inject(FaultRule::new(Route::Token, FaultAction::Delay(Duration::from_millis(300))));
    let gave_up = k.refresh(&grant.refresh_token, "fake-client-secret").timeout(Duration::from_millis(50));
    assert!(gave_up.send().await.is_err(), "the client hung up before the answer");
    // Strict: the token endpoint finishes the request anyway (looked at every 20 ms, 5 s at most).
    for _ in 0..250 {
        if k.fake.refresh_count() == 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(k.fake.refresh_count(), 1, "the refresh token was spent");
    assert!(!k.fake.refresh_token_is_live(&grant.refresh_token));
    let (_, newest) = k.fake.last_issued_pair().expect("a pair");
    assert!(newest != grant.refresh_token && k.fake.refresh_token_is_live(&newest));
}

#[tokio::test]
async fn calls_without_valid_credentials_get_401() {
    let k = Kit::new(FakeOptions::default()).await;
    let resp = send(k.http.get(k.url(""))).await;
    assert_eq!(resp.status(), 401);
    assert!(resp.headers().get("x-keap-product-throttle-limit").is_none());
    assert_eq!(resp.json::<ErrorReply>().await.unwrap().code, Some(json!(401)));
    let err = error(k.http.get(k.url("")).bearer_auth("nope")).await;
    assert_eq!(err.message.as_deref(), Some("Invalid Access Token"));
    assert_eq!(status(k.http.get(k.url("")).bearer_auth("k1")).await, 401);
    k.fake.add_api_key("k1");
    let resp = send(k.http.get(k.url("")).header("X-Keap-API-Key", "k1")).await;
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["x-keap-product-throttle-limit"], "240");
    let auths: Vec<AuthKind> = k.fake.requests().iter().map(|r| r.auth).collect();
    assert_eq!(auths, [AuthKind::None, AuthKind::Bearer, AuthKind::Bearer, AuthKind::ApiKey]);
}

#[tokio::test]
async fn refresh_tokens_rotate_and_are_single_use() {
    let k = Kit::new(FakeOptions::default()).await;
    let grant = k.fake.issue_grant();
    let next: TokenGrant =
        send(k.refresh(&grant.refresh_token, "fake-client-secret")).await.json().await.unwrap();
    assert_ne!(next.refresh_token, grant.refresh_token);
    assert_eq!((next.token_type.as_str(), next.expires_in), ("bearer", 86_400));
    assert_eq!(next.scope, FAKE_SCOPE);
    let reuse = send(k.refresh(&grant.refresh_token, "fake-client-secret")).await;
    assert_eq!(reuse.status(), 400);
    let reuse = reuse.json::<ErrorReply>().await.unwrap();
    assert_eq!(reuse.error.as_deref(), Some("invalid_request"), "the newer gateway's answer by default");
    assert_eq!(reuse.error_description.as_deref(), Some("Invalid Refresh Token"));
    assert_eq!((k.fake.refresh_count(), k.fake.spent_refresh_reuse_count()), (1, 1));
    // The old access token lives until its own expiry; the new one works too.
    for t in [&grant.access_token, &next.access_token] {
        assert_eq!(status(k.http.get(k.url("")).bearer_auth(t)).await, 200);
    }
    let err = error(k.refresh(&next.refresh_token, "wrong")).await;
    assert_eq!(err.error.as_deref(), Some("invalid_client"));
    let json_body = json!({"grant_type": "refresh_token", "refresh_token": next.refresh_token});
    let as_json = k.http.post(k.fake.token_url()).basic_auth("fake-client-id", Some("fake-client-secret"));
    let err = error(as_json.json(&json_body)).await;
    assert_eq!(err.error_description.as_deref(), Some("response_type or grant_type is required"));

    k.fake.revoke_all_grants();
    assert_eq!(status(k.refresh(&next.refresh_token, "fake-client-secret")).await, 400);
    assert_eq!(status(k.http.get(k.url("")).bearer_auth(&next.access_token)).await, 401);
    assert_eq!(k.fake.spent_refresh_reuse_count(), 1, "revoked is not reuse");
    let log = format!("{:?}", k.fake.requests());
    assert!(
        log.contains(REDACTED) && !log.contains(&grant.refresh_token) && !log.contains(&next.access_token)
    );
}

#[tokio::test]
async fn authorization_code_grant_is_single_use_and_checks_redirect() {
    let k = Kit::new(FakeOptions::default()).await;
    let code = k.fake.issue_code("https://app.example/cb");
    let exchange = |redirect: &str| {
        let form = [
            ("grant_type", "authorization_code"),
            ("code", &code),
            ("client_id", "fake-client-id"),
            ("client_secret", "fake-client-secret"),
            ("redirect_uri", redirect),
        ];
        k.http.post(k.fake.token_url()).form(&form)
    };
    assert_eq!(status(exchange("https://evil.example/cb")).await, 400);
    let grant: TokenGrant = send(exchange("https://app.example/cb")).await.json().await.unwrap();
    assert_eq!(status(k.http.get(k.url("")).bearer_auth(&grant.access_token)).await, 200);
    let err = error(exchange("https://app.example/cb")).await;
    assert_eq!(err.error.as_deref(), Some("invalid_grant"));
}

#[tokio::test]
async fn a_grant_for_another_app_keeps_naming_it_through_refreshes_and_codes() {
    let k = Kit::new(FakeOptions::default()).await;
    let other = "other456.infusionsoft.com";
    let grant = k.fake.issue_grant_for(other);
    assert_eq!(grant.scope, format!("full|{other}"));
    let next: TokenGrant =
        send(k.refresh(&grant.refresh_token, "fake-client-secret")).await.json().await.unwrap();
    assert_eq!(next.scope, format!("full|{other}"), "a refresh answers for the same app");
    let default: TokenGrant = send(k.refresh(&k.fake.issue_grant().refresh_token, "fake-client-secret"))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(default.scope, FAKE_SCOPE);
    assert_eq!(FAKE_SCOPE.split_once('|').map(|(_, a)| a), Some(FAKE_ACCOUNT));

    let code = k.fake.issue_code_for("https://app.example/cb", other);
    let form = [
        ("grant_type", "authorization_code"),
        ("code", code.as_str()),
        ("client_id", "fake-client-id"),
        ("client_secret", "fake-client-secret"),
        ("redirect_uri", "https://app.example/cb"),
    ];
    let exchanged: TokenGrant = send(k.http.post(k.fake.token_url()).form(&form)).await.json().await.unwrap();
    assert_eq!(exchanged.scope, format!("full|{other}"));
}

#[tokio::test]
async fn expired_access_tokens_get_401() {
    let k = Kit::new(FakeOptions::default()).await;
    k.fake.expire_access_tokens();
    assert_eq!(status(k.get("")).await, 401);
    k.fake.set_access_token_lifetime(Duration::from_millis(300));
    let grant = k.fake.issue_grant();
    assert_eq!(grant.expires_in, 1, "expires_in is at least one second");
    assert_eq!(status(k.http.get(k.url("")).bearer_auth(&grant.access_token)).await, 200);
    // The lifetime passes: the token turns 401 on its own (looked at every 20 ms, 5 s at most).
    let deadline = Instant::now() + Duration::from_secs(5);
    while status(k.http.get(k.url("")).bearer_auth(&grant.access_token)).await != 401 {
        assert!(Instant::now() < deadline, "a 300 ms token still accepted after 5 s");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn over_the_limit_answers_429_with_keap_headers() {
    let k = Kit::new(FakeOptions { per_second_limit: Some(2), ..FakeOptions::default() }).await;
    assert_eq!(status(k.get("")).await, 200);
    assert_eq!(status(k.get("")).await, 200);
    let resp = send(k.get("")).await;
    assert_eq!(resp.status(), 429);
    let h = resp.headers();
    assert!(h.get("retry-after").is_none());
    for (name, want) in [
        ("throttle-limit", "1500"),
        ("throttle-used", "2"),
        ("throttle-available", "1498"),
        ("throttle-time-unit", "minute"),
        ("throttle-interval", "1"),
        ("quota-used", "2"),
        ("quota-limit", "150000"),
    ] {
        assert_eq!(h[format!("x-keap-product-{name}").as_str()], want, "{name}");
    }
    let expiry: u64 = h["x-keap-product-quota-expiry-time"].to_str().unwrap().parse().unwrap();
    assert_eq!(expiry % DAY_MS, 0);
    assert!(expiry > unix_ms() && expiry <= unix_ms() + DAY_MS);
    let body: Value = resp.json().await.unwrap();
    assert_eq!(
        body,
        json!({"code":"429","message":"Quota Exceeded","status":"Request Throttled","details":null})
    );
    assert_eq!((k.fake.throttled_count(), k.fake.count(|r| r.status == 429)), (1, 1));
    k.fake.set_limits(None, Some(2));
    assert_eq!(status(k.get("")).await, 429, "the minute window still holds two requests");
}

#[tokio::test]
async fn drop_closes_the_connection_and_other_faults() {
    let k = Kit::new(FakeOptions::default()).await;
    k.fake.inject(FaultRule::new(Route::Contacts, FaultAction::Drop).times(1));
    assert!(k.put(&upsert("d@e.io", "D")).send().await.is_err(), "no answer");
    assert!(k.fake.contacts().is_empty(), "not performed");
    assert_eq!(k.fake.requests()[0].status, 0);
    k.fake.inject(FaultRule::new(Route::Contacts, FaultAction::DropAfterCommit).times(1));
    assert!(k.put(&upsert("d@e.io", "D")).send().await.is_err());
    assert_eq!(k.fake.contacts().len(), 1, "a lost reply still commits");
    k.fake.inject(FaultRule::new(Route::Any, FaultAction::Status(503, "busy".into())).times(1));
    k.fake.inject(FaultRule::new(Route::Token, FaultAction::Status(500, "{}".into())));
    k.fake.inject(FaultRule::new(Route::Contacts, FaultAction::Drop).probability(0.0));
    assert_eq!(status(k.put(&upsert("d@e.io", "D"))).await, 503);
    assert_eq!(status(k.put(&upsert("d@e.io", "D"))).await, 200);
    assert_eq!(status(k.refresh("x", "y")).await, 500);
    k.fake.clear_faults();
    k.fake.inject(FaultRule::new(Route::Contacts, FaultAction::Delay(Duration::from_millis(50))));
    let t0 = Instant::now();
    assert_eq!(status(k.get("")).await, 200);
    assert!(t0.elapsed() >= Duration::from_millis(50));
}

#[tokio::test]
async fn set_down_refuses_connections_until_back_up_on_the_same_port() {
    let k = Kit::new(FakeOptions::default()).await;
    let addr = k.fake.addr();
    assert_eq!(status(k.get("")).await, 200);
    k.fake.set_down(true);
    let refused = tokio::net::TcpStream::connect(addr).await.err().map(|e| e.kind());
    assert_eq!(refused, Some(io::ErrorKind::ConnectionRefused));
    assert!(k.get("").send().await.is_err(), "the keep-alive connection was cut too");
    k.fake.set_down(false);
    assert_eq!(k.fake.addr(), addr);
    assert_eq!(status(k.get("")).await, 200);
    assert_eq!(status(client().get(k.url("")).bearer_auth(&k.token)).await, 200);
}

#[tokio::test]
async fn shutdown_stops_the_server() {
    let k = Kit::new(FakeOptions::default()).await;
    let addr = k.fake.addr();
    k.fake.shutdown().await;
    assert!(tokio::net::TcpStream::connect(addr).await.is_err());
}

#[tokio::test]
async fn invalid_bodies_get_400_with_a_v1_message() {
    let k = Kit::new(FakeOptions::default()).await;
    let (long_name, long_email) = ("x".repeat(41), format!("{}@b.io", "x".repeat(72)));
    let item = |field: &str| json!({"email_addresses": [{"email": "a@b.io", "field": field}], "duplicate_option": "Email"});
    let cases = [
        (upsert("not-an-email", "A"), "Email address is invalid"),
        (upsert("a@b", "A"), "Email address is invalid"),
        (upsert("a@b.io", &long_name), "given_name must be at most 40 characters"),
        (upsert(&long_email, "A"), "Email address is too long (at most 75 characters)"),
        (
            json!({"email_addresses": [{"email": "a@b.io"}], "duplicate_option": "Email"}),
            "Email field must be one of EMAIL1, EMAIL2, EMAIL3",
        ),
        (item("EMAIL4"), "Email field must be one of EMAIL1, EMAIL2, EMAIL3"),
        (
            json!({"email_addresses": [{"email": "a@b.io", "field": "EMAIL1"}]}),
            "duplicate_option is required",
        ),
        (json!({"given_name": "A", "duplicate_option": "Email"}), "At least one email"),
        (json!({"given_name": "A", "nickname": "B", "duplicate_option": "Email"}), "Unrecognized field"),
        (
            json!({"given_name": "A", "duplicate_option": "EmailAndNameAndCompany"}),
            "duplicate_option must be",
        ),
        (
            json!({"phone_numbers": [{"number": "1", "field": "PHONE1", "kind": "x"}], "duplicate_option": "Email"}),
            "Unrecognized field \"kind\" in phone_numbers",
        ),
        (json!([1, 2]), BAD_INPUT),
    ];
    for (body, want) in cases {
        let resp = send(k.put(&body)).await;
        assert_eq!(resp.status(), 400, "{body}");
        assert!(resp.headers().contains_key("x-keap-product-quota-limit"));
        let text = resp.json::<ErrorReply>().await.unwrap().message.unwrap_or_default();
        assert!(text.starts_with(want), "{body}: {text}");
    }
    let broken = k.http.put(k.url("")).bearer_auth(&k.token).header("content-type", "application/json");
    assert_eq!(status(broken.body("{oops")).await, 400);
    assert_eq!(status(k.http.put(k.url("")).bearer_auth(&k.token).body("{}")).await, 415);
    // v2: only the listing is played; a write there is refused, as is a filter it cannot read.
    let v2 = format!("{}/v2/contacts", k.fake.api_url());
    assert_eq!(
        status(k.http.put(&v2).bearer_auth(&k.token).header("content-type", "application/json").body("{}"))
            .await,
        405
    );
    assert_eq!(status(k.http.get(format!("{v2}?filter=nickname%3D%3Dx")).bearer_auth(&k.token)).await, 400);
    assert_eq!(status(k.http.get(format!("{v2}?page_size=1001")).bearer_auth(&k.token)).await, 400);
    assert_eq!(status(k.http.get(&v2).bearer_auth(&k.token)).await, 200);
    assert!(k.fake.contacts().is_empty());
}

#[tokio::test]
async fn the_whole_contact_tags_model_and_opt_out() {
    let k = Kit::new(FakeOptions::default()).await;
    let seats = k.fake.add_custom_field("Seats", "WholeNumber");
    let body = json!({"duplicate_option": "Email", "given_name": "A", "job_title": "CTO", "owner_id": 9,
        "email_addresses": [{"email": "a@b.io", "field": "EMAIL1"}],
        "phone_numbers": [{"number": "1", "field": "PHONE1", "type": "Work"}, {"number": "2", "field": "PHONE2"}],
        "addresses": [{"field": "BILLING", "locality": "Paris", "country_code": "FRA"}],
        "custom_fields": [{"id": seats, "content": 3}], "opt_in_reason": "Asked"});
    let c = contact(k.put(&body)).await;
    // Optional properties only when asked for.
    let plain: Value = send(k.get(&format!("/{}", c.id))).await.json().await.unwrap();
    assert!(plain.get("job_title").is_none() && plain.get("custom_fields").is_none());
    assert_eq!(plain["owner_id"], 9);
    assert_eq!(plain["email_opted_in"], true);
    let asked: Value = send(k.get(&format!("/{}?optional_properties=job_title,custom_fields", c.id)))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(
        (asked["job_title"].clone(), asked["custom_fields"][0]["content"].clone()),
        (json!("CTO"), json!(3))
    );
    // Arrays are replaced: a PATCH of PHONE1 alone removes PHONE2; a mask without
    // phone_numbers keeps both.
    let patch =
        |q: &str, b: Value| k.http.patch(k.url(&format!("/{}{q}", c.id))).bearer_auth(&k.token).json(&b);
    let kept = send(patch("?update_mask=given_name", json!({"given_name": "B", "phone_numbers": []}))).await;
    assert_eq!(kept.status(), 200);
    assert_eq!(k.fake.contact_json(c.id).unwrap()["phone_numbers"].as_array().unwrap().len(), 2);
    assert_eq!(status(patch("", json!({"phone_numbers": [{"number": "3", "field": "PHONE1"}]}))).await, 200);
    assert_eq!(
        k.fake.contact_json(c.id).unwrap()["phone_numbers"],
        json!([{"number": "3", "field": "PHONE1"}])
    );
    // The model.
    let model: Value = send(k.get("/model")).await.json().await.unwrap();
    assert_eq!(model["custom_fields"][0]["field_type"], "WholeNumber");
    // Tags: a contains-filter catalogue, apply with per-id answers, remove by a %2C list.
    let tags_url = format!("{}/v1/tags", k.fake.api_url());
    let created: Value = send(k.http.post(&tags_url).bearer_auth(&k.token).json(&json!({"name": "VIP"})))
        .await
        .json()
        .await
        .unwrap();
    let vip = created["id"].as_i64().unwrap();
    let other = k.fake.create_tag("VIP customer");
    let found: Value =
        send(k.http.get(format!("{tags_url}?name=VIP")).bearer_auth(&k.token)).await.json().await.unwrap();
    assert_eq!(found["tags"].as_array().unwrap().len(), 2, "Keap's filter is not exact: {found}");
    let tags_of = format!("{}/{}/tags", k.url(""), c.id);
    let apply = |ids: Value| k.http.post(&tags_of).bearer_auth(&k.token).json(&json!({"tagIds": ids}));
    let answer: Value = send(apply(json!([vip, 999]))).await.json().await.unwrap();
    assert_eq!(answer, json!({vip.to_string(): "SUCCESS", "999": "TAG_ID_NOT_FOUND"}));
    let again: Value = send(apply(json!([vip, other]))).await.json().await.unwrap();
    assert_eq!(again[vip.to_string()], "DUPLICATE");
    assert_eq!(k.fake.contact_tags(c.id), BTreeSet::from([vip, other]));
    let remove = k.http.delete(format!("{tags_of}?ids={vip}%2C{other}")).bearer_auth(&k.token);
    assert_eq!(status(remove).await, 204);
    assert!(k.fake.contact_tags(c.id).is_empty());
    // Opt-out: exactly {opted_in, reason}; an unknown address is 404.
    let opt = |email: &str, b: Value| {
        let url = format!("{}/v1/emailAddresses/{email}", k.fake.api_url());
        k.http.put(url).bearer_auth(&k.token).json(&b)
    };
    assert_eq!(status(opt("a%40b.io", json!({"opted_in": false}))).await, 400);
    assert_eq!(status(opt("x%40b.io", json!({"opted_in": false, "reason": "r"}))).await, 404);
    assert_eq!(status(opt("a%40b.io", json!({"opted_in": false, "reason": "Gone"}))).await, 200);
    assert_eq!(k.fake.email_opt_status("A@b.io"), Some((false, "Gone".into())));
}

#[test]
fn helpers() {
    assert_eq!(rfc3339_ms(1_723_680_000_123), "2024-08-15T00:00:00.123Z");
    assert_eq!(rfc3339_ms(951_782_400_000), "2000-02-29T00:00:00.000Z");
    assert_eq!(url_decode("a%20b+c%7C"), Some("a b c|".into()));
    for bad in ["%zz", "%+5", "%4", "%FF"] {
        assert_eq!(url_decode(bad), None, "{bad}");
    }
    assert!(email_is_valid("first.last+tag@sub.example.co"));
    for bad in ["", "a", "@b.io", "a@b", "a@.io", "a b@c.io", "a@b.c", "a..b@c.io", "é@c.io", "a@b.i1"] {
        assert!(!email_is_valid(bad), "{bad}");
    }
    assert!(format!("{:?}", FakeOptions::default()).contains(REDACTED));
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let remote = FakeKeap::start_on("10.0.0.1:0".parse().unwrap(), FakeOptions::default());
    assert!(rt.block_on(remote).is_err(), "never listens beyond loopback");
}

#[tokio::test]
async fn a_spent_refresh_token_can_answer_invalid_grant_as_before() {
    let opts = FakeOptions { spent_refresh_error: SpentRefreshError::InvalidGrant, ..FakeOptions::default() };
    let k = Kit::new(opts).await;
    let grant = k.fake.issue_grant();
    assert_eq!(status(k.refresh(&grant.refresh_token, "fake-client-secret")).await, 200);
    let reuse = error(k.refresh(&grant.refresh_token, "fake-client-secret")).await;
    assert_eq!(reuse.error.as_deref(), Some("invalid_grant"));
}

#[tokio::test]
async fn the_email_filter_matches_part_of_an_address_unless_exact() {
    for (filter, want) in [(EmailFilter::Partial, 3), (EmailFilter::Exact, 1)] {
        let k = Kit::new(FakeOptions { email_filter: filter, ..FakeOptions::default() }).await;
        for email in ["ann@example.com", "joann@example.com", "ann@example.com.au", "bob@example.com"] {
            assert_eq!(status(k.put(&upsert(email, "X"))).await, 201, "{email} created");
        }
        let list: ContactList = send(k.get("?email=ANN%40example.com")).await.json().await.unwrap();
        assert_eq!(list.contacts.len(), want, "{filter:?}: {list:?}");
    }
}

#[tokio::test]
async fn an_upsert_answers_201_when_it_creates_and_200_when_it_updates() {
    let k = Kit::new(FakeOptions::default()).await;
    assert_eq!(status(k.put(&upsert("new@example.com", "A"))).await, 201);
    assert_eq!(status(k.put(&upsert("new@example.com", "B"))).await, 200);
}

#[tokio::test]
async fn keaps_documented_limits_and_a_tenant_limit_hold_by_default() {
    let k = Kit::new(FakeOptions::default()).await;
    k.fake.add_api_key("key-1");
    let get = || k.http.get(k.url("")).header("X-Keap-API-Key", "key-1");
    let mut answers = Vec::new();
    for _ in 0..11 {
        answers.push(status(get()).await);
    }
    // An API key's spike arrest is 10/s: eleven requests within a second, the last refused.
    assert_eq!(answers.iter().filter(|s| **s == 429).count(), 1, "{answers:?}");
    let h = send(get()).await;
    let h = h.headers();
    assert_eq!(h["x-keap-product-throttle-limit"], "240");
    assert_eq!(h["x-keap-tenant-throttle-limit"], "5000");
    assert_eq!(h["x-keap-tenant-throttle-time-unit"], "minute");
    assert!(h.contains_key("x-keap-tenant-throttle-available"));
    // The tenant limit counts every credential.
    let k = Kit::new(FakeOptions { tenant_minute_limit: Some(3), ..FakeOptions::default() }).await;
    k.fake.add_api_key("key-2");
    assert_eq!(status(k.get("")).await, 200);
    assert_eq!(status(k.get("")).await, 200);
    assert_eq!(status(k.http.get(k.url("")).header("X-Keap-API-Key", "key-2")).await, 200);
    assert_eq!(status(k.get("")).await, 429, "the tenant's minute is spent, whatever the credential");
}

#[tokio::test]
async fn opt_in_reason_lifts_only_the_statuses_the_v1_spec_names() {
    let k = Kit::new(FakeOptions::default()).await;
    for (email, status_before, lifted) in [
        ("fresh@example.com", None, true),
        ("manual@example.com", Some("Manual"), true),
        ("nonmarketable@example.com", Some("NonMarketable"), true),
        ("unsubscribed@example.com", Some("ListUnsubscribe"), false),
        ("bounced@example.com", Some("HardBounce"), false),
    ] {
        assert_eq!(status(k.put(&upsert(email, "X"))).await, 201);
        if let Some(s) = status_before {
            k.fake.set_email_status(email, s);
        }
        let mut body = upsert(email, "Y");
        body["opt_in_reason"] = json!("Consented");
        assert_eq!(status(k.put(&body)).await, 200);
        let after = k.fake.email_status(email);
        assert_eq!(after == "UnconfirmedMarketable", lifted, "{email}: {after}");
    }
    let lenient = Kit::new(FakeOptions { opt_in_from_any_status: true, ..FakeOptions::default() }).await;
    assert_eq!(status(lenient.put(&upsert("u@example.com", "X"))).await, 201);
    lenient.fake.set_email_status("u@example.com", "ListUnsubscribe");
    let mut body = upsert("u@example.com", "Y");
    body["opt_in_reason"] = json!("Consented");
    assert_eq!(status(lenient.put(&body)).await, 200);
    assert_eq!(lenient.fake.email_status("u@example.com"), "UnconfirmedMarketable");
}

#[tokio::test]
async fn contacts_seeded_in_bulk_get_consecutive_ids_and_are_listed_and_found() {
    let k = Kit::new(FakeOptions::default()).await;
    let before =
        k.fake.seed_contact(ContactWrite { given_name: Some("First".into()), ..ContactWrite::default() });
    let email =
        |i: i64| EmailAddress { email: Some(format!("bulk{i}@example.com")), field: EmailField::Email1 };
    let ids = k.fake.seed_contacts((0..3).map(|i| ContactWrite {
        family_name: Some(format!("Bulk{i}")),
        email_addresses: Some(vec![email(i)]),
        ..ContactWrite::default()
    }));
    assert_eq!(ids, before.id + 1..before.id + 4);
    assert_eq!(k.fake.contacts_with_email("BULK1@example.com")[0].id, ids.start + 1);
    assert_eq!(k.fake.contact(ids.start + 2).unwrap().family_name.as_deref(), Some("Bulk2"));
    let page: Value =
        send(k.http.get(format!("{}/v2/contacts?page_size=2", k.fake.api_url())).bearer_auth(&k.token))
            .await
            .json()
            .await
            .unwrap();
    let listed: Vec<&str> =
        page["contacts"].as_array().unwrap().iter().filter_map(|c| c["id"].as_str()).collect();
    assert_eq!(listed, [before.id.to_string(), ids.start.to_string()]);
    assert!(k.fake.requests().iter().all(|r| r.path.starts_with("/crm/rest/v2")), "seeding is not logged");
}
