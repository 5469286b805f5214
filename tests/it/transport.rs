//! Credentials travel safely (ARCHITECTURE.md, invariant 16): no redirect is followed with a
//! credential attached, Keap URLs must be https (loopback excepted), and no reply body is read
//! past 1 MiB. Each redirect test points the fake's answer at an [`OtherHost`] that records
//! whatever reaches it; nothing may.

use std::io::Write;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use keap_sync_testkit::app::{self, spawn_app_with, Options, TestApp, API_KEY};
use keap_sync_testkit::fake::{FakeOptions, FaultAction, FaultRule, OtherHost, Route};

/// An OAuth app whose imported access token is due for refresh at once (the test
/// configuration refreshes 1 s before expiry), so the first delivery refreshes.
fn oauth_due_for_refresh() -> Options {
    Options {
        oauth: true,
        start_daemon: false,
        fake: FakeOptions { access_token_lifetime: Duration::from_secs(1), ..app::fake_options() },
        ..Options::default()
    }
}

/// A reply body of 2 MiB: twice the cap.
fn oversized(json_head: &str) -> String {
    format!(r#"{json_head}"padding":"{}"}}"#, "x".repeat(2 << 20))
}

/// `(attempts, last_error, parked)` of the outbox row of the user with `email`, if queued.
async fn outbox_row(app: &TestApp, email: &str) -> Option<(i32, Option<String>, bool)> {
    let row = app
        .db
        .query_opt(
            "select o.attempts, o.last_error, o.parked_at is not null
               from keap_sync.outbox o join users u on o.user_key = u.id::text
              where u.email = $1",
            &[&email],
        )
        .await
        .expect("outbox row");
    row.map(|r| (r.get(0), r.get(1), r.get(2)))
}

/// Waits until the change of `email` has failed at least twice with an error containing
/// `needle` (so it was retried, not dropped), and returns that error.
async fn retried_with(app: &TestApp, email: &str, needle: &str) -> String {
    let what = format!("the change of {email} retried after an error mentioning {needle:?}");
    app::eventually(Duration::from_secs(15), &what, || async {
        matches!(outbox_row(app, email).await,
                 Some((attempts, Some(error), false)) if attempts >= 2 && error.contains(needle))
    })
    .await;
    outbox_row(app, email).await.and_then(|(_, error, _)| error).unwrap_or_default()
}

/// Waits until the fake has answered at least two requests under `path` with the redirect
/// `status`: the daemon met it, and tried again.
async fn redirected_twice(app: &TestApp, status: u16, path: &str) {
    let what = format!("two requests under {path} answered {status}");
    app::eventually(Duration::from_secs(15), &what, || async {
        app.fake.count(|r| r.status == status && r.path.starts_with(path)) >= 2
    })
    .await;
}

async fn insert_user(app: &TestApp, email: &str) {
    app.db
        .execute("insert into users (email, first_name) values ($1, 'T')", &[&email])
        .await
        .expect("insert");
}

async fn grant_state(app: &TestApp) -> String {
    app.db.query_one("select state from keap_sync.oauth_token", &[]).await.expect("grant").get(0)
}

fn assert_no_secret_in(app: &TestApp, text: &str) {
    assert!(!text.contains(API_KEY), "the API key appears in {text:?}");
    for secret in app.fake.issued_secrets() {
        assert!(!text.contains(&secret), "a secret appears in an error");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redirected_contact_call_is_not_followed_and_the_change_is_retried() {
    // An API key: the header reqwest's redirect handling would carry to another host.
    let app = spawn_app_with(Options::default()).await;
    let other = OtherHost::start().await.expect("other host");
    for status in [307u16, 302] {
        let location = other.url("/crm/rest/v1/contacts");
        app.fake.inject(FaultRule::new(Route::Contacts, FaultAction::Redirect(location, status)));
        let email = format!("moved{status}@example.com");
        insert_user(&app, &email).await;
        redirected_twice(&app, status, "/crm/rest").await;
        assert_eq!(other.arrivals(), vec![], "a {status} redirect was followed to the other host");

        let error = retried_with(&app, &email, "redirect").await;
        assert!(error.contains(&status.to_string()), "names the status: {error}");
        assert!(error.contains(&other.origin()), "names where it pointed: {error}");
        assert_no_secret_in(&app, &error);
        eprintln!("{status}: recorded as {error:?}");

        // Transient, not parked: once the endpoint answers again the change goes through.
        app.fake.clear_faults();
        app.wait_idle().await;
    }
    app.assert_keap_matches_users().await;
    assert_eq!(other.arrivals(), vec![]);
    assert!(app.daemons_running());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redirected_token_refresh_is_not_followed_and_the_grant_is_kept() {
    let mut app = spawn_app_with(oauth_due_for_refresh()).await;
    let other = OtherHost::start().await.expect("other host");
    // A 307 would have the form, refresh token included, sent again to the other host.
    app.fake.inject(FaultRule::new(Route::Token, FaultAction::Redirect(other.url("/token"), 307)));
    insert_user(&app, "refresh@example.com").await;
    app.start_daemon().await;
    redirected_twice(&app, 307, "/token").await;
    assert_eq!(other.arrivals(), vec![], "the refresh was followed to the other host");

    let error = retried_with(&app, "refresh@example.com", "307").await;
    assert!(error.contains(&other.origin()), "names where it pointed: {error}");
    assert_no_secret_in(&app, &error);
    assert_eq!(grant_state(&app).await, "ok", "a redirect is no reason to give up the grant");
    assert_eq!(app.fake.refresh_count(), 0);

    app.fake.clear_faults();
    app.wait_idle().await;
    app.assert_keap_matches_users().await;
    assert!(app.fake.refresh_count() >= 1);
    assert_eq!(app.fake.spent_refresh_reuse_count(), 0);
    assert_eq!(grant_state(&app).await, "ok");
    assert_eq!(other.arrivals(), vec![]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auth_login_does_not_follow_a_redirected_code_exchange() {
    let app = spawn_app_with(oauth_due_for_refresh()).await;
    app.exec("delete from keap_sync.oauth_token").await;
    let other = OtherHost::start().await.expect("other host");
    app.fake.inject(FaultRule::new(Route::Token, FaultAction::Redirect(other.url("/token"), 307)));
    let redirect_uri = "https://app.example.com/keap/callback";
    let config = app.write_config_file(
        &format!("redirect_uri = \"{redirect_uri}\"\nauthorize_url = \"{}\"", app.fake.authorize_url()),
        "",
    );
    let code = app.fake.issue_code(redirect_uri);
    let mut child = Command::new(app::keap_sync_binary())
        .arg("--config")
        .arg(&config)
        .args(["auth", "login"])
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .envs(app.env())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("auth login");
    // The bare code is accepted at the prompt.
    child.stdin.take().expect("stdin").write_all(format!("{code}\n").as_bytes()).expect("answer");
    let out = tokio::task::spawn_blocking(move || child.wait_with_output()).await.unwrap().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();

    assert_eq!(other.arrivals(), vec![], "the code exchange (client secret, code) was followed");
    assert!(!out.status.success(), "{stderr}");
    assert!(stderr.contains("307") && stderr.contains(&other.origin()), "{stderr}");
    assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
    assert_no_secret_in(&app, &stderr);
    assert_eq!(app.count("select count(*) from keap_sync.oauth_token").await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oversized_contact_reply_is_not_read_past_the_cap_and_the_change_is_retried() {
    let app = spawn_app_with(Options::default()).await;
    // A 200 that would parse as a contact if read whole.
    let big = oversized(r#"{"id":4242,"#);
    app.fake.inject(FaultRule::new(Route::Contacts, FaultAction::Status(200, big)));
    insert_user(&app, "big@example.com").await;
    let error = retried_with(&app, "big@example.com", "larger than 1 MiB").await;
    eprintln!("recorded as {error:?}");
    assert!(app::captured_logs().contains("larger than 1 MiB"), "the log says so too");
    assert!(app.daemons_running());

    app.fake.clear_faults();
    app.wait_idle().await;
    app.assert_keap_matches_users().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oversized_token_reply_is_a_transient_failure_and_the_grant_is_kept() {
    let mut app = spawn_app_with(oauth_due_for_refresh()).await;
    // A 200 that would parse as a (bogus) token pair if read whole.
    let big =
        oversized(r#"{"access_token":"oversized-at","refresh_token":"oversized-rt","expires_in":3600,"#);
    app.fake.inject(FaultRule::new(Route::Token, FaultAction::Status(200, big)));
    insert_user(&app, "bigtoken@example.com").await;
    app.start_daemon().await;
    let error = retried_with(&app, "bigtoken@example.com", "larger than 1 MiB").await;
    eprintln!("recorded as {error:?}");
    assert_eq!(grant_state(&app).await, "ok");
    assert!(app.daemons_running());

    app.fake.clear_faults();
    app.wait_idle().await;
    app.assert_keap_matches_users().await;
    assert_eq!(app.fake.spent_refresh_reuse_count(), 0);
    assert_eq!(grant_state(&app).await, "ok");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plain_http_keap_url_is_refused_at_start_with_the_fix() {
    let app = spawn_app_with(Options { start_daemon: false, ..Options::default() }).await;
    let config = app.write_config_file("", "");
    let mut child = Command::new(app::keap_sync_binary())
        .arg("--config")
        .arg(&config)
        .arg("run")
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .envs(app.env())
        .env("KEAP_API_URL", "http://api.example.com/crm/rest")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("keap-sync run");
    let started = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait") {
            break status;
        }
        if started.elapsed() > Duration::from_secs(10) {
            let _ = child.kill();
            let _ = child.wait();
            panic!("`keap-sync run` started with an http:// Keap URL instead of refusing it");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let stderr = std::io::read_to_string(child.stderr.take().expect("stderr")).expect("stderr text");
    assert!(!status.success(), "{stderr}");
    assert!(stderr.contains("keap.api_url") && stderr.contains("KEAP_API_URL"), "names the key: {stderr}");
    assert!(stderr.contains("https://"), "says the fix: {stderr}");
    assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
}
