//! Postgres over TLS (ARCHITECTURE.md, invariant 11), on a cluster of the test's own with
//! `ssl = on` and a certificate signed by a throwaway CA (`Cluster::start_tls`): the daemon
//! trusts that CA through `[database] ca_file`, the server confirms that the daemon's sessions
//! are encrypted, an unknown CA is refused with advice naming `ca_file`, and a server that
//! refuses plaintext is reached over TLS.

use std::process::{Command, Output};
use std::time::Duration;

use keap_sync::config::Config;
use keap_sync::{Daemon, RunOptions};
use keap_sync_testkit::app::{self, eventually, spawn_app_with, Options, TestApp, API_KEY};
use keap_sync_testkit::pg::TlsOptions;

/// A stopped app on a TLS cluster of its own.
async fn tls_app(reject_plaintext: bool) -> TestApp {
    spawn_app_with(Options { tls: Some(TlsOptions { reject_plaintext }), ..Options::stopped() }).await
}

/// The CA that signed the app's server certificate.
fn ca_file(app: &TestApp) -> String {
    app.cluster().ca_file().expect("a TLS cluster").display().to_string()
}

/// `url` and `ca_file` as a `[database]` section (TOML literal strings: neither holds a `'`).
fn database(url: &str, ca_file: Option<&str>) -> String {
    match ca_file {
        Some(ca) => format!("url = '{url}'\nca_file = '{ca}'"),
        None => format!("url = '{url}'"),
    }
}

/// The password in the app's TCP connection string, to grep for.
fn password(app: &TestApp) -> String {
    let parsed: tokio_postgres::Config = app.tcp_conninfo().parse().unwrap();
    String::from_utf8(parsed.get_password().expect("a password").to_vec()).unwrap()
}

/// Starts the daemon on `config`, inserts a user and waits until Keap has it; a daemon that
/// stops instead (it could not connect) fails the test with its error.
async fn sync_one_user(app: &mut TestApp, config: Config, email: &str) {
    app.start_daemon_with(config).await;
    app.exec(&format!("insert into users (email, first_name) values ('{email}', 'Tee')")).await;
    eventually(Duration::from_secs(30), "the user reaches Keap, or the daemon stops", || async {
        !app.daemons_running() || app.fake.contacts_with_email(email).len() == 1
    })
    .await;
    if !app.daemons_running() {
        app.stop_daemon().await; // panics with the daemon's error
    }
    app.wait_idle().await;
    app.assert_keap_matches_users().await;
}

/// The daemon's sessions as the server sees them: (encrypted, over TCP) for each session
/// named `keap-sync` (the application name the daemon sets) in the app's database.
async fn daemon_sessions(app: &TestApp) -> Vec<(bool, bool)> {
    app.db
        .query(
            "select s.ssl, a.client_addr is not null
               from pg_stat_activity a join pg_stat_ssl s using (pid)
              where a.application_name = 'keap-sync' and a.datname = current_database()",
            &[],
        )
        .await
        .expect("pg_stat_ssl")
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect()
}

/// Asserts that the server sees at least the daemon's LISTEN connection and its session's
/// connection, every one over TCP and encrypted.
async fn assert_daemon_encrypted(app: &TestApp) {
    let sessions = daemon_sessions(app).await;
    assert!(sessions.len() >= 2, "the daemon's LISTEN and session connections: {sessions:?}");
    assert!(sessions.iter().all(|&(ssl, tcp)| ssl && tcp), "(ssl, tcp) of each daemon session: {sessions:?}");
}

/// `keap-sync args` with only `env` (and `PATH`) in its environment.
fn keap_sync(args: &[&str], env: &[(&str, &str)]) -> Output {
    Command::new(app::keap_sync_binary())
        .args(args)
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .envs(env.iter().copied())
        .output()
        .expect("run keap-sync")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_sslmode_require_and_the_ca_file_the_daemon_syncs_over_tls() {
    let mut app = tls_app(false).await;
    let url = format!("{} sslmode=require", app.tcp_conninfo());
    let config =
        app.config_with_database(&database(&url, Some(&ca_file(&app)))).expect("config with ca_file");
    sync_one_user(&mut app, config, "tls@example.com").await;
    assert_daemon_encrypted(&app).await;
    app.stop_daemon().await;
    let password = password(&app);
    assert!(!app::captured_logs().contains(&password), "the database password is in the log");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unknown_ca_is_refused_with_advice_to_set_ca_file() {
    let app = tls_app(false).await;
    let url = format!("{} sslmode=require", app.tcp_conninfo());
    let password = password(&app);
    let config = app.config_with_database(&database(&url, None)).expect("config without ca_file");
    let error = match Daemon::build(config, RunOptions::default()).await {
        Ok(_) => panic!("the daemon connected to a server whose certificate no trusted CA signed"),
        Err(e) => e.to_string(),
    };
    for needle in [
        "cannot connect to the database",
        "certificate is not trusted",
        "`ca_file` under [database]",
        "UnknownIssuer",
    ] {
        assert!(error.contains(needle), "{error:?} should say {needle:?}");
    }
    assert!(!error.contains(&password), "the password is in the error: {error}");

    // The command line says the same, on one line.
    let out = keap_sync(&["status"], &[("DATABASE_URL", &url), ("KEAP_API_KEY", API_KEY)]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "status connected: {stderr}");
    let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "one line: {stderr}");
    assert!(lines[0].contains("certificate is not trusted") && lines[0].contains("ca_file"), "{stderr}");
    assert!(!stderr.contains(&password), "the password is in the error: {stderr}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_that_refuses_plaintext_is_reached_over_tls() {
    let mut app = tls_app(true).await;
    let ca = ca_file(&app);
    // The server does refuse a session without TLS.
    let plain = format!("{} sslmode=disable", app.tcp_conninfo());
    let config = app.config_with_database(&database(&plain, Some(&ca))).expect("config");
    let error = match Daemon::build(config, RunOptions::default()).await {
        Ok(_) => panic!("the server accepted a session without TLS"),
        Err(e) => e.to_string(),
    };
    assert!(error.contains("pg_hba.conf rejects connection") && error.contains("no encryption"), "{error}");

    // With no sslmode in the URL (libpq's default, prefer) the daemon negotiates TLS.
    let url = app.tcp_conninfo();
    let config = app.config_with_database(&database(&url, Some(&ca))).expect("config with ca_file");
    sync_one_user(&mut app, config, "tls-only@example.com").await;
    assert_daemon_encrypted(&app).await;
    app.stop_daemon().await;

    // And so do the commands: `status` with a config file whose ca_file is relative to it.
    let dir =
        std::env::temp_dir().join(format!("keap-sync-tls-{}-{}", std::process::id(), app::rand_suffix()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::copy(&ca, dir.join("ca.pem")).unwrap();
    let path = dir.join("keap-sync.toml");
    std::fs::write(&path, format!("[database]\n{}\n", database(&url, Some("ca.pem")))).unwrap();
    let out = keap_sync(&["--config", path.to_str().unwrap(), "status"], &[("KEAP_API_KEY", API_KEY)]);
    assert!(out.status.success(), "status over TLS: {}", String::from_utf8_lossy(&out.stderr));
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn a_ca_file_that_cannot_be_read_stops_a_command_with_one_line_naming_it() {
    let dir =
        std::env::temp_dir().join(format!("keap-sync-tls-{}-{}", std::process::id(), app::rand_suffix()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("keap-sync.toml");
    std::fs::write(&path, "[database]\nurl = 'host=localhost'\nca_file = 'no-such-ca.pem'\n").unwrap();
    let out = keap_sync(&["--config", path.to_str().unwrap(), "status"], &[("KEAP_API_KEY", API_KEY)]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "one line: {stderr}");
    let expected = dir.join("no-such-ca.pem");
    assert!(
        lines[0].contains("database.ca_file") && lines[0].contains(expected.to_str().unwrap()),
        "names the key and the file: {stderr}"
    );
    assert!(lines[0].contains("set database.ca_file to a PEM file"), "says the fix: {stderr}");
    std::fs::remove_dir_all(&dir).ok();
}
