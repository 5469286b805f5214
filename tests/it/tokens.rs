//! The OAuth grant keeps itself alive: refresh before expiry and on 401, rotation safe across
//! two instances, a lost grant pauses (not loses) deliveries until new tokens are imported,
//! the authorization-code login, and no secret in any log line or error.

use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use keap_sync::RunOptions;
use keap_sync_testkit::app::{self, spawn_app_with, Options, TestApp};
use keap_sync_testkit::fake::{FakeOptions, FaultAction, FaultRule, Route, TokenGrant, FAKE_ACCOUNT};

const REDIRECT: &str = "https://app.example.com/keap/callback";

fn oauth(lifetime: Duration) -> Options {
    Options {
        oauth: true,
        fake: FakeOptions { access_token_lifetime: lifetime, ..app::fake_options() },
        ..Options::default()
    }
}

fn bin(app: &TestApp, config: &std::path::Path, args: &[&str]) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_keap-sync"));
    cmd.arg("--config")
        .arg(config)
        .args(args)
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .envs(app.env());
    cmd
}

/// Every secret the fake ever issued, and the client secret, is absent from every log line of
/// this process and from `extra` (child process output, error messages).
fn assert_no_secrets(app: &TestApp, extra: &str) {
    let logs = app::captured_logs();
    assert!(!logs.is_empty(), "logs were captured");
    for secret in app.fake.issued_secrets() {
        assert!(secret.len() >= 8, "secret long enough to grep: {}", secret.len());
        assert!(!logs.contains(&secret), "a secret appears in the logs");
        assert!(!extra.contains(&secret), "a secret appears in command output or errors");
    }
}

/// Inserts users at a steady pace for `duration`; returns how many.
async fn steady_stream(app: &TestApp, duration: Duration) -> usize {
    let started = Instant::now();
    let mut n = 0;
    while started.elapsed() < duration {
        n += 1;
        app.db
            .execute(
                "insert into users (email, first_name) values ($1, 'Stream')",
                &[&format!("stream{n}@example.com")],
            )
            .await
            .expect("insert");
        // Pacing the load generator, not synchronisation: the assertions wait on conditions.
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    n
}

fn unauthorized_contact_calls(app: &TestApp) -> usize {
    app.fake.count(|r| r.status == 401 && r.path.starts_with("/crm/rest/v1/contacts"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn short_lived_tokens_are_refreshed_under_a_steady_stream() {
    let app = spawn_app_with(oauth(Duration::from_secs(2))).await;
    let started = Instant::now();
    let users = steady_stream(&app, Duration::from_secs(10)).await;
    app.wait_idle().await;
    let elapsed = started.elapsed().as_secs_f64();

    app.assert_keap_matches_users().await;
    assert_eq!(app.fake.contacts().len(), users);
    let refreshes = app.fake.refresh_count();
    let rejected = unauthorized_contact_calls(&app);
    eprintln!(
        "{users} users in {elapsed:.1} s: {refreshes} refreshes, {rejected} contact calls answered 401"
    );
    assert!(refreshes >= 4, "tokens were refreshed ({refreshes})");
    // Refreshed ahead of expiry (refresh_margin_secs = 1 of a 2 s token), never after Keap
    // refused one: a daemon that refreshed only on a 401 would meet one per expiry.
    assert_eq!(rejected, 0, "no contact call was answered 401 ({refreshes} refreshes in {elapsed:.1} s)");
    assert_eq!(app.fake.spent_refresh_reuse_count(), 0);
    assert_no_secrets(&app, "");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_instances_refresh_once_per_expiry_and_never_reuse_a_refresh_token() {
    let mut app = spawn_app_with(oauth(Duration::from_secs(2))).await;
    app.start_daemon().await; // a second instance on the same database
                              // A slow token endpoint widens the race: while one refresh is in flight, deliveries of
                              // both instances find the old token near expiry and queue up for the row lock.
    app.fake.inject(FaultRule::new(Route::Token, FaultAction::Delay(Duration::from_millis(300))));
    let started = Instant::now();
    let users = steady_stream(&app, Duration::from_secs(8)).await;
    app.wait_idle().await;
    let elapsed = started.elapsed().as_secs_f64();

    // A token is refreshed when 1 s of its 2 s is left, so one refresh per second is one per
    // expiry; two instances refreshing independently would double it.
    let refreshes = app.fake.refresh_count();
    let per_expiry_bound = elapsed.ceil() as usize + 1;
    eprintln!(
        "two instances, {users} users in {elapsed:.1} s: {refreshes} refreshes (bound {per_expiry_bound})"
    );
    assert!(refreshes >= 3, "tokens were refreshed ({refreshes})");
    assert!(refreshes <= per_expiry_bound, "{refreshes} refreshes > {per_expiry_bound}");
    assert_eq!(app.fake.spent_refresh_reuse_count(), 0, "a spent refresh token was sent");
    assert_eq!(app.contact_calls("PUT"), users, "each user delivered once");
    app.assert_keap_matches_users().await;
    assert!(app.daemons_running());
    assert_no_secrets(&app, "");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_grant_pauses_deliveries_until_a_new_grant_is_imported() {
    let app = spawn_app_with(Options {
        tweak: |c| c.delivery.poll_interval = Duration::from_millis(200),
        ..oauth(Duration::from_secs(3600))
    })
    .await;
    app.exec("insert into users (email) values ('before@example.com')").await;
    app.wait_idle().await;

    app.fake.revoke_all_grants();
    app.exec("insert into users (email) select 'during' || g || '@example.com' from generate_series(1, 5) g")
        .await;
    app::eventually(Duration::from_secs(10), "re-authorisation needed", || async {
        app.count("select count(*) from keap_sync.oauth_token where state = 'reauthorization_needed'").await
            == 1
    })
    .await;
    let calls = app.fake.requests().len();
    let token_calls = app.fake.count(|r| r.path == "/token");
    assert!(token_calls <= 1, "one refresh attempt, then none: {token_calls}");

    // Paused, not stopped: changes queue up and no call is made. Observe several poll cycles.
    app.exec("insert into users (email) select 'paused' || g || '@example.com' from generate_series(1, 5) g")
        .await;
    let observe_until = Instant::now() + Duration::from_millis(1500);
    while Instant::now() < observe_until {
        assert_eq!(app.fake.requests().len(), calls, "no call while paused");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(app.count("select count(*) from keap_sync.outbox").await, 10, "every change queued");
    assert!(app.daemons_running(), "the daemon keeps running");

    let config = app.write_config_file("", "");
    let status = bin(&app, &config, &["auth", "status"]).output().expect("auth status");
    let status_text = String::from_utf8_lossy(&status.stdout).into_owned();
    assert!(status.status.success(), "{}", String::from_utf8_lossy(&status.stderr));
    assert!(status_text.contains("re-authorisation needed"), "{status_text}");
    assert!(status_text.contains("keap-sync auth login"), "says what to run: {status_text}");

    let grant = app.fake.issue_grant();
    let mut import =
        bin(&app, &config, &["auth", "import"]).stdin(Stdio::piped()).stdout(Stdio::piped()).spawn().unwrap();
    import.stdin.take().unwrap().write_all(serde_json::to_string(&grant).unwrap().as_bytes()).unwrap();
    let imported = import.wait_with_output().unwrap();
    assert!(imported.status.success());

    app.wait_idle_for(Duration::from_secs(15)).await;
    app.assert_keap_matches_users().await;
    assert!(app.daemons_running(), "resumed without a restart");
    assert_no_secrets(&app, &format!("{status_text}{}", String::from_utf8_lossy(&imported.stdout)));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_401_with_a_valid_looking_token_refreshes_once_and_retries() {
    let app = spawn_app_with(oauth(Duration::from_secs(3600))).await;
    app.exec("insert into users (email, first_name) values ('r@example.com', 'A')").await;
    app.wait_idle().await;
    assert_eq!(app.fake.refresh_count(), 0);

    app.fake.expire_access_tokens();
    app.exec("update users set first_name = 'B'").await;
    app.wait_idle().await;

    assert_eq!(unauthorized_contact_calls(&app), 1);
    assert_eq!(app.fake.refresh_count(), 1);
    assert_eq!(app.fake.contacts()[0].given_name.as_deref(), Some("B"));
    assert_no_secrets(&app, "");
}

/// Runs `auth login`, answers its prompt with `answer(state)`, returns (success, stdout, stderr).
fn login(app: &TestApp, answer: impl Fn(&str) -> String) -> (bool, String, String) {
    login_with(app, &[], answer)
}

/// [`login`] with more arguments after `auth login`.
fn login_with(app: &TestApp, extra: &[&str], answer: impl Fn(&str) -> String) -> (bool, String, String) {
    let config = app.write_config_file(
        &format!("redirect_uri = \"{REDIRECT}\"\nauthorize_url = \"{}\"", app.fake.authorize_url()),
        "",
    );
    let args: Vec<&str> = ["auth", "login"].iter().chain(extra).copied().collect();
    let mut child = bin(app, &config, &args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("auth login");
    let mut stdout = BufReader::new(child.stdout.take().unwrap());
    let mut printed = String::new();
    let state = loop {
        let mut line = String::new();
        assert!(stdout.read_line(&mut line).unwrap() > 0, "login ended before printing the URL: {printed}");
        printed.push_str(&line);
        if let Some(url) = line.trim().strip_prefix("http") {
            let url = reqwest::Url::parse(&format!("http{url}")).expect("authorize URL");
            let q: std::collections::HashMap<_, _> = url.query_pairs().into_owned().collect();
            assert_eq!(q.get("response_type").map(String::as_str), Some("code"));
            assert_eq!(q.get("scope").map(String::as_str), Some("full"));
            assert_eq!(q.get("redirect_uri").map(String::as_str), Some(REDIRECT));
            assert_eq!(
                q.get("client_id").map(String::as_str),
                Some(FakeOptions::default().client_id.as_str())
            );
            break q.get("state").cloned().expect("state");
        }
    };
    child.stdin.take().unwrap().write_all(format!("{}\n", answer(&state)).as_bytes()).unwrap();
    // The rest of standard output is in the reader (the child's handle was taken from it).
    std::io::Read::read_to_string(&mut stdout, &mut printed).unwrap();
    let out = child.wait_with_output().unwrap();
    (out.status.success(), printed, String::from_utf8_lossy(&out.stderr).into_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auth_login_exchanges_the_code_and_checks_state() {
    let mut app = spawn_app_with(Options { start_daemon: false, ..oauth(Duration::from_secs(3600)) }).await;
    app.exec("delete from keap_sync.oauth_token").await;

    // A redirect carrying another login's state is refused, and nothing is stored.
    let code = app.fake.issue_code(REDIRECT);
    let (ok, _, stderr) = login(&app, |_| format!("{REDIRECT}?code={code}&state=forged"));
    assert!(!ok);
    assert!(stderr.contains("state does not match"), "{stderr}");
    assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
    assert_eq!(app.count("select count(*) from keap_sync.oauth_token").await, 0);

    let code = app.fake.issue_code(REDIRECT);
    let (ok, stdout, stderr) = login(&app, |state| {
        format!("{REDIRECT}?code={code}&scope=full%7Cfake123.infusionsoft.com&state={state}")
    });
    assert!(ok, "{stderr}");
    assert_eq!(app.count("select count(*) from keap_sync.oauth_token where state = 'ok'").await, 1);

    // The stored grant works.
    app.start_daemon().await;
    app.exec("insert into users (email) values ('login@example.com')").await;
    app.wait_idle().await;
    assert_eq!(app.fake.contacts().len(), 1);
    assert_no_secrets(&app, &format!("{stdout}{stderr}"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auth_login_can_receive_the_redirect_on_a_loopback_listener() {
    let app = spawn_app_with(Options { start_daemon: false, ..oauth(Duration::from_secs(3600)) }).await;
    app.exec("delete from keap_sync.oauth_token").await;
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let config = app.write_config_file(
        &format!("redirect_uri = \"{REDIRECT}\"\nauthorize_url = \"{}\"", app.fake.authorize_url()),
        "",
    );
    let listen = format!("127.0.0.1:{port}");
    let mut child = bin(&app, &config, &["auth", "login", "--listen", &listen])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdout = BufReader::new(child.stdout.take().unwrap());
    let state = loop {
        let mut line = String::new();
        assert!(stdout.read_line(&mut line).unwrap() > 0, "no URL printed");
        if let Some(rest) = line.trim().strip_prefix("http") {
            let url = reqwest::Url::parse(&format!("http{rest}")).unwrap();
            break url.query_pairs().find(|(k, _)| k == "state").unwrap().1.into_owned();
        }
    };
    let code = app.fake.issue_code(REDIRECT);
    keap_sync_testkit::install_crypto_provider();
    let http = reqwest::Client::new();
    let target = format!("http://{listen}/keap/callback?code={code}&state={state}");
    // The listener is bound before the URL is printed.
    let answer = http.get(&target).send().await.expect("the listener is up");
    assert_eq!(answer.status(), 200);
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(app.count("select count(*) from keap_sync.oauth_token where state = 'ok'").await, 1);
    assert_no_secrets(&app, &String::from_utf8_lossy(&out.stderr));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_api_key_pauses_instead_of_hammering_keap() {
    let mut app = spawn_app_with(Options { start_daemon: false, ..Options::default() }).await;
    let mut config = app.config();
    config.keap.credential =
        Some(keap_sync::config::Credential::ApiKey(keap_sync::Secret::new("revoked-key-0000")));
    config.delivery.poll_interval = Duration::from_millis(100);
    app.start_daemon_with(config).await;
    app.exec("insert into users (email) select 'k' || g || '@example.com' from generate_series(1, 20) g")
        .await;
    app::eventually(Duration::from_secs(10), "paused for the API key", || async {
        app.count("select count(*) from keap_sync.instances where paused_reason like '%API key%'").await == 1
    })
    .await;
    // At most the calls that were in flight when the key was refused, then none: an API key
    // Keap refuses needs a person, and the daemon retries once a minute, not on the 5 s probe
    // schedule of a refused OAuth token. Observed past that 5 s (the assertion is that nothing
    // happens, so this waits on the clock), with the loop polling every 100 ms and 20 changes due.
    let in_flight = unauthorized_contact_calls(&app);
    assert!((1..=4).contains(&in_flight), "{in_flight} calls with a refused key before the pause");
    tokio::time::sleep(Duration::from_secs(6)).await;
    let refused = unauthorized_contact_calls(&app);
    assert_eq!(refused, in_flight, "no call in the 6 s after the pause began");
    assert_eq!(app.count("select count(*) from keap_sync.outbox").await, 20, "every change stays queued");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_daemon_refreshes_a_grant_before_its_refresh_token_lapses() {
    let mut app = spawn_app_with(Options { start_daemon: false, ..oauth(Duration::from_secs(86_400)) }).await;
    // The access token is fresh, but the refresh token is 31 days old (Keap's lapse: 45).
    app.exec("update keap_sync.oauth_token set refresh_token_issued_at = now() - interval '31 days'").await;
    app.start_daemon().await;
    // Wait for the new pair in the database: the fake counts the refresh before the daemon
    // has committed what it returned.
    app::eventually(Duration::from_secs(10), "a new refresh token stored, with no change to deliver", || async {
        let age: f64 = app
            .db
            .query_one(
                "select extract(epoch from now() - refresh_token_issued_at)::float8 from keap_sync.oauth_token",
                &[],
            )
            .await
            .unwrap()
            .get(0);
        age < 60.0
    })
    .await;
    assert_eq!(app.fake.refresh_count(), 1);
    assert_eq!(app.fake.count(|r| r.path.starts_with("/crm/rest")), 0, "no contact call was needed");
    assert_no_secrets(&app, "");
}

/// A Keap app other than the fake's default one ([`FAKE_ACCOUNT`]).
const OTHER_APP: &str = "other456.infusionsoft.com";

/// Stores a refresh token of a grant for [`OTHER_APP`]: Keap's next refresh answers for that app.
async fn refresh_leads_to_another_app(app: &TestApp) {
    let other = app.fake.issue_grant_for(OTHER_APP);
    app.db
        .execute("update keap_sync.oauth_token set refresh_token = $1", &[&other.refresh_token])
        .await
        .unwrap();
}

/// Pipes `grant` into `auth import` (plus `extra` arguments); returns (success, stdout, stderr).
fn import(app: &TestApp, grant: &TokenGrant, extra: &[&str]) -> (bool, String, String) {
    let config = app.write_config_file("", "");
    let args: Vec<&str> = ["auth", "import"].iter().chain(extra).copied().collect();
    let mut child = bin(app, &config, &args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("auth import");
    child.stdin.take().unwrap().write_all(serde_json::to_string(grant).unwrap().as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
    (out.status.success(), text(&out.stdout), text(&out.stderr))
}

/// The stored access token (compared, never printed: it is a secret).
async fn stored_access_token(app: &TestApp) -> String {
    app.db.query_one("select access_token from keap_sync.oauth_token", &[]).await.unwrap().get(0)
}

/// (account, previous_account) of the stored grant.
async fn stored_accounts(app: &TestApp) -> (Option<String>, Option<String>) {
    let row =
        app.db.query_one("select account, previous_account from keap_sync.oauth_token", &[]).await.unwrap();
    (row.get(0), row.get(1))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_grant_for_another_keap_app_is_refused_unless_the_switch_is_explicit() {
    let mut app = spawn_app_with(oauth(Duration::from_secs(3600))).await;
    app.exec("insert into users (email, first_name) values ('linked@example.com', 'A')").await;
    app.wait_idle().await;
    assert_eq!(app.count("select count(*) from keap_sync.contact_map").await, 1);
    let before = stored_access_token(&app).await;

    // Another app's grant would send every mapped user's changes to an unrelated contact id.
    let other = app.fake.issue_grant_for(OTHER_APP);
    let (ok, stdout, stderr) = import(&app, &other, &[]);
    assert!(!ok, "a grant for another Keap app was accepted: {stdout}");
    for needle in [FAKE_ACCOUNT, OTHER_APP, "--switch-account", "keap-sync auth login"] {
        assert!(stderr.contains(needle), "the refusal names {needle}: {stderr}");
    }
    assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
    assert!(stored_access_token(&app).await == before, "the stored grant is unchanged");
    assert_eq!(app.count("select count(*) from keap_sync.contact_map").await, 1);

    // The same app again is a routine re-authorisation.
    let (ok, stdout, stderr) = import(&app, &app.fake.issue_grant(), &[]);
    assert!(ok, "{stderr}");
    assert!(stdout.contains(FAKE_ACCOUNT), "names the app: {stdout}");
    assert!(stored_access_token(&app).await != before, "the new grant is stored");

    // Switching while a daemon delivers could write to an old contact id in the new app.
    let (ok, _, stderr) = import(&app, &other, &["--switch-account"]);
    assert!(!ok, "switched while a daemon was delivering");
    assert!(stderr.contains("stop"), "says to stop the daemon: {stderr}");
    assert_eq!(stored_accounts(&app).await, (Some(FAKE_ACCOUNT.into()), None));

    app.stop_daemon().await;
    keap_sync::refresh_mirror(&app.config()).await.expect("the old app's contacts in the mirror");
    let (ok, stdout, stderr) = import(&app, &other, &["--switch-account"]);
    assert!(ok, "{stderr}");
    for needle in [FAKE_ACCOUNT, OTHER_APP, "keap-sync backfill --restart"] {
        assert!(stdout.contains(needle), "the switch report names {needle}: {stdout}");
    }
    assert_eq!(stored_accounts(&app).await, (Some(OTHER_APP.into()), Some(FAKE_ACCOUNT.into())));
    assert_eq!(
        app.count("select count(*) from keap_sync.contact_map").await,
        0,
        "links to the old app forgotten"
    );
    assert!(stderr.contains("switched the Keap app"), "the switch is logged: {stderr}");
    assert_eq!(
        app.count(
            "select (select count(*) from keap_sync.mirror) + (select count(watermark) from keap_sync.mirror_state)"
        )
        .await,
        0,
        "the old app's picture forgotten"
    );

    let config = app.write_config_file("", "");
    let auth_status = bin(&app, &config, &["auth", "status"]).output().unwrap();
    let auth_text = String::from_utf8_lossy(&auth_status.stdout).into_owned();
    assert!(auth_text.contains(&format!("account: {OTHER_APP}")), "{auth_text}");
    assert!(auth_text.contains(FAKE_ACCOUNT), "auth status shows the switch: {auth_text}");
    let status = bin(&app, &config, &["status"]).output().unwrap();
    let status_text = String::from_utf8_lossy(&status.stdout).into_owned();
    assert!(status_text.contains(OTHER_APP), "{status_text}");

    // The backfill the report asks for finds the user in the new app by email (a listing of
    // the new app's contacts first, then a read of the one the listing showed with its
    // address), never by an id of the old app.
    let old_contact = app.fake.contacts()[0].id;
    app.fake.delete_contact(old_contact);
    let new_contact = app
        .fake
        .seed_contact_json(
            serde_json::json!({"email_addresses": [{"field": "EMAIL1", "email": "linked@example.com"}]}),
        )
        .id;
    let seen = app.fake.requests().len();
    let options = RunOptions { backfill: Some(keap_sync::BackfillMode::Restart), ..RunOptions::default() };
    app.start_daemon_with_options(app.config(), options).await;
    app::eventually(Duration::from_secs(15), "the user linked again", || async {
        app.count("select count(*) from keap_sync.contact_map").await == 1
    })
    .await;
    let after: Vec<_> = app.fake.requests().into_iter().skip(seen).collect();
    assert!(
        after.iter().any(|r| r.method == "GET" && r.path.ends_with("/v2/contacts")),
        "the new app's contacts listed: {after:?}"
    );
    assert!(
        !after.iter().any(|r| r.path.ends_with(&format!("/v1/contacts/{old_contact}"))),
        "no call by a contact id of the old app: {after:?}"
    );
    assert_eq!(
        app.db.query_one("select contact_id from keap_sync.contact_map", &[]).await.unwrap().get::<_, i64>(0),
        new_contact
    );
    assert_no_secrets(&app, &format!("{stdout}{stderr}{auth_text}{status_text}"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refresh_that_answers_for_another_keap_app_pauses_instead_of_switching() {
    let app = spawn_app_with(oauth(Duration::from_secs(3600))).await;
    app.exec("insert into users (email, first_name) values ('r@example.com', 'A')").await;
    app.wait_idle().await;

    // Keap answering a refresh for another app: the stored refresh token leads to one.
    refresh_leads_to_another_app(&app).await;
    app.fake.expire_access_tokens();
    app.exec("update users set first_name = 'B'").await;
    app::eventually(Duration::from_secs(10), "re-authorisation needed", || async {
        app.count("select count(*) from keap_sync.oauth_token where state = 'reauthorization_needed'").await
            == 1
    })
    .await;
    let detail: String =
        app.db.query_one("select state_detail from keap_sync.oauth_token", &[]).await.unwrap().get(0);
    assert!(detail.contains(FAKE_ACCOUNT) && detail.contains(OTHER_APP), "{detail}");
    assert_eq!(stored_accounts(&app).await.0.as_deref(), Some(FAKE_ACCOUNT));
    assert_eq!(app.count("select count(*) from keap_sync.outbox").await, 1, "the change stays queued");
    assert_eq!(app.fake.contacts()[0].given_name.as_deref(), Some("A"));

    // A grant for the right app resumes deliveries.
    app.import_grant(&app.fake.issue_grant()).await;
    app.wait_idle_for(Duration::from_secs(15)).await;
    assert_eq!(app.fake.contacts()[0].given_name.as_deref(), Some("B"));
    assert_no_secrets(&app, &detail);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auth_login_to_another_keap_app_is_refused_unless_switching() {
    let app = spawn_app_with(Options { start_daemon: false, ..oauth(Duration::from_secs(3600)) }).await;
    let before = stored_access_token(&app).await;

    let code = app.fake.issue_code_for(REDIRECT, OTHER_APP);
    let (ok, stdout, stderr) = login(&app, |state| format!("{REDIRECT}?code={code}&state={state}"));
    assert!(!ok, "a login to another Keap app was accepted: {stdout}");
    assert!(stderr.contains(OTHER_APP) && stderr.contains("--switch-account"), "{stderr}");
    assert!(stored_access_token(&app).await == before, "the stored grant is unchanged");

    let code = app.fake.issue_code_for(REDIRECT, OTHER_APP);
    let (ok, stdout, stderr) =
        login_with(&app, &["--switch-account"], |state| format!("{REDIRECT}?code={code}&state={state}"));
    assert!(ok, "{stderr}");
    assert!(stdout.contains(OTHER_APP), "{stdout}");
    assert_eq!(stored_accounts(&app).await, (Some(OTHER_APP.into()), Some(FAKE_ACCOUNT.into())));
    assert_no_secrets(&app, &format!("{stdout}{stderr}"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_grant_that_names_no_keap_app_is_accepted_and_says_so() {
    let app = spawn_app_with(Options { start_daemon: false, ..oauth(Duration::from_secs(3600)) }).await;
    let mut grant = app.fake.issue_grant();
    grant.scope = String::new();
    let (ok, stdout, stderr) = import(&app, &grant, &[]);
    assert!(ok, "{stderr}");
    assert!(stdout.contains("names no Keap app"), "{stdout}");
    assert_eq!(stored_accounts(&app).await.0.as_deref(), Some(FAKE_ACCOUNT), "keeps the known app");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_grant_stored_before_the_upgrade_gets_its_account_from_its_scope() {
    let conninfo = app::cluster().fresh_database("acct").await.unwrap();
    let db = app::connect(&conninfo).await;
    crate::migrate_up_to(
        &db,
        "_grant_account.sql",
        "insert into keap_sync.oauth_token (access_token, refresh_token, expires_at, scope)
         values ('a', 'r', now(), 'full|ABC123.infusionsoft.com')",
    )
    .await;
    let account: Option<String> =
        db.query_one("select account from keap_sync.oauth_token", &[]).await.unwrap().get(0);
    assert_eq!(account.as_deref(), Some("abc123.infusionsoft.com"));
    // The same reading as `src/token/store.rs` (`account_from_scope`), case by case.
    for (scope, want) in [
        ("full|abc123.infusionsoft.com", Some("abc123.infusionsoft.com")),
        (" full| Abc123.Infusionsoft.com ", Some("abc123.infusionsoft.com")),
        ("|abc123.infusionsoft.com", Some("abc123.infusionsoft.com")),
        ("full", None),
        ("", None),
        ("full|", None),
        ("full|  ", None),
        ("full|a|b", None),
        ("full|abc 123", None),
        ("full|abc123.infusionsoft.com openid", None),
        ("full|...", None),
        ("full|abc/../x", None),
        ("full|äbc.infusionsoft.com", None),
    ] {
        let got: Option<String> =
            db.query_one("select keap_sync.grant_account($1)", &[&scope]).await.unwrap().get(0);
        assert_eq!(got.as_deref(), want, "scope {scope:?}");
    }
}

/// The pair in `keap_sync.oauth_token`, as (access token, refresh token).
async fn stored_pair(app: &TestApp) -> (String, String) {
    let row = app
        .db
        .query_one("select access_token, refresh_token from keap_sync.oauth_token where id = 1", &[])
        .await
        .expect("stored grant");
    (row.get(0), row.get(1))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refresh_in_flight_at_shutdown_still_stores_the_new_pair() {
    let mut app = spawn_app_with(Options {
        // Deliveries get no grace at all: the one waiting on the refresh is aborted at once.
        tweak: |c| c.delivery.shutdown_grace = Duration::ZERO,
        ..oauth(Duration::from_secs(3600))
    })
    .await;
    app.exec("insert into users (email, first_name) values ('cut@example.com', 'A')").await;
    app.wait_idle().await;

    // The next call gets a 401 and refreshes; Keap takes 2 s to answer the refresh (within the
    // 3 s request timeout), and the daemon is stopped while it waits.
    app.fake.inject(FaultRule::new(Route::Token, FaultAction::Delay(Duration::from_secs(2))));
    app.fake.expire_access_tokens();
    app.exec("update users set first_name = 'B'").await;
    app::eventually(Duration::from_secs(10), "the refresh sent to Keap", || async {
        app.fake.count(|r| r.path == "/token") == 1
    })
    .await;
    app.stop_daemon().await;

    // Keap rotated the pair (the fake finishes a token request the client gave up on): the
    // new pair must be the one stored, and its refresh token unspent.
    app::eventually(Duration::from_secs(5), "Keap rotated the pair", || async {
        app.fake.refresh_count() == 1
    })
    .await;
    let (access, refresh) = stored_pair(&app).await;
    let (last_access, last_refresh) = app.fake.last_issued_pair().expect("pairs issued");
    assert!(
        access == last_access && refresh == last_refresh,
        "the stored pair is not the one Keap issued last: the rotated pair was lost at shutdown"
    );
    assert!(app.fake.refresh_token_is_live(&refresh), "the stored refresh token is still usable");

    // A daemon started afterwards delivers with it, without re-authorisation.
    app.fake.clear_faults();
    app.start_daemon().await;
    app.wait_idle().await;
    assert_eq!(app.fake.contacts()[0].given_name.as_deref(), Some("B"));
    assert_eq!(
        app.count("select count(*) from keap_sync.oauth_token where state = 'reauthorization_needed'").await,
        0
    );
    assert_eq!(app.fake.spent_refresh_reuse_count(), 0, "a spent refresh token was sent");
    assert_no_secrets(&app, "");
}

/// The answer kept aside, if any. A secret: compared, never printed.
async fn held(app: &TestApp) -> (Option<String>,) {
    let row =
        app.db.query_one("select held_answer from keap_sync.oauth_token", &[]).await.expect("stored grant");
    (row.get(0),)
}

/// Waits until the grant needs re-authorisation, then checks that the answer Keap rotated the
/// pair with is kept aside (its refresh token unspent, the last Keap issued) and that the state
/// says so, naming the way to use it. Returns the kept answer and the detail.
async fn refused_answer_kept(app: &TestApp) -> (TokenGrant, String) {
    app::eventually(Duration::from_secs(15), "re-authorisation needed", || async {
        app.count("select count(*) from keap_sync.oauth_token where state = 'reauthorization_needed'").await
            == 1
    })
    .await;
    let detail: String = app
        .db
        .query_one("select coalesce(state_detail, '') from keap_sync.oauth_token", &[])
        .await
        .unwrap()
        .get(0);
    for needle in ["kept aside", "held_answer", "keap-sync auth import"] {
        assert!(detail.contains(needle), "the state says the answer was kept ({needle}): {detail}");
    }
    let answer = held(app).await.0;
    let answer: TokenGrant =
        serde_json::from_str(&answer.expect("the answer is kept")).expect("a token answer");
    let (_, last_refresh) = app.fake.last_issued_pair().expect("pairs issued");
    assert!(answer.refresh_token == last_refresh, "the kept refresh token is the one Keap issued last");
    assert!(app.fake.refresh_token_is_live(&answer.refresh_token), "the kept refresh token is unspent");
    (answer, detail)
}

/// A refresh Keap answered 200 (so the pair is rotated and the old refresh token spent) but
/// keap-sync refuses — a field it cannot accept, or another Keap app — keeps the answer aside
/// instead of throwing it away, says so, and the kept grant can then be stored by `auth import`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rotated_pair_the_daemon_refuses_is_kept_aside() {
    let mut app = spawn_app_with(oauth(Duration::from_secs(3600))).await;
    app.exec("insert into users (email, first_name) values ('held@example.com', 'A')").await;
    app.wait_idle().await;

    // 1. Keap rotates the pair but answers an expires_in keap-sync cannot use.
    app.fake.inject(
        FaultRule::new(Route::Token, FaultAction::EditAnswer(serde_json::json!({"expires_in": 0}))).times(1),
    );
    app.fake.expire_access_tokens();
    app.exec("update users set first_name = 'B'").await;
    let (_, first_detail) = refused_answer_kept(&app).await;
    assert_eq!(app.fake.spent_refresh_reuse_count(), 0, "the spent refresh token was sent again");

    // A new grant clears what was kept.
    app.import_grant(&app.fake.issue_grant()).await;
    app.wait_idle_for(Duration::from_secs(15)).await;
    assert!(held(&app).await.0.is_none(), "a new grant clears the kept answer");

    // 2. Keap answers the refresh for another app.
    refresh_leads_to_another_app(&app).await;
    app.fake.expire_access_tokens();
    app.exec("update users set first_name = 'C'").await;
    let (kept, detail) = refused_answer_kept(&app).await;
    assert!(detail.contains(OTHER_APP) && detail.contains("--switch-account"), "{detail}");

    // The grant is not lost: the operator can move the sync to that app with it.
    app.stop_daemon().await;
    let (ok, stdout, stderr) = import(&app, &kept, &["--switch-account"]);
    assert!(ok, "{stderr}");
    assert_eq!(stored_accounts(&app).await.0.as_deref(), Some(OTHER_APP));
    assert_no_secrets(&app, &format!("{first_detail}{detail}{stdout}{stderr}"));
}

/// A spent or revoked refresh token is answered `invalid_request` "Invalid Refresh Token" by
/// Keap's newer gateway (API notes §2.4, §11.1) and `invalid_grant` by the older one: either
/// way the grant is lost, deliveries pause and say what to run, and nothing is retried blindly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn both_answers_to_a_spent_refresh_token_ask_for_re_authorisation() {
    use keap_sync_testkit::fake::SpentRefreshError;
    for answer in [SpentRefreshError::InvalidRequest, SpentRefreshError::InvalidGrant] {
        let app = spawn_app_with(Options {
            fake: FakeOptions { spent_refresh_error: answer, ..app::fake_options() },
            ..oauth(Duration::from_secs(3600))
        })
        .await;
        app.fake.revoke_all_grants();
        app.exec("insert into users (email) values ('after@example.com')").await;
        app::eventually(Duration::from_secs(10), "re-authorisation needed", || async {
            app.count("select count(*) from keap_sync.oauth_token where state = 'reauthorization_needed'")
                .await
                == 1
        })
        .await;
        let refreshes = app.fake.count(|r| r.path == "/token");
        assert_eq!(refreshes, 1, "{answer:?}: one refresh attempt, not retried");
        assert_eq!(app.count("select count(*) from keap_sync.outbox where parked_at is null").await, 1);
    }
}
