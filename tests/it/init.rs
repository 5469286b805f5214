//! `keap-sync init` as an operator runs it: the binary reads a live table of the test's
//! Postgres and writes a configuration that `run` accepts as written and that syncs a user to
//! the fake Keap, for a typical `public.users` and for `"App"."Accounts"` with a uuid key and
//! mixed-case names; and it never overwrites a file without `--force`.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use keap_sync::config::Config;
use keap_sync_testkit::app::{self, eventually, spawn_app_with, Options, TestApp};

/// A users table as applications have them: names, a phone, an address, consent, a plan, a
/// password hash and a timestamp.
const TYPICAL: &str = "create table public.users (
    id                bigserial primary key,
    email             text not null,
    first_name        text,
    last_name         text,
    phone             text,
    street            text,
    city              text,
    state             text,
    zip               text,
    country           char(3),
    marketing_consent boolean not null default false,
    birth_date        date,
    plan              text not null default 'free',
    password_hash     text,
    created_at        timestamptz not null default now()
)";

/// `keap-sync args` with only `env` (and `PATH`) in its environment.
fn keap_sync(args: &[&str], env: &[(&str, &str)]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_keap-sync"))
        .args(args)
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .envs(env.iter().copied())
        .output()
        .expect("run keap-sync")
}

/// Panics with the command's output unless it succeeded.
fn assert_success(out: &Output, what: &str) {
    assert!(
        out.status.success(),
        "{what}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A fresh directory for the file `init` writes.
fn out_path() -> PathBuf {
    let dir =
        std::env::temp_dir().join(format!("keap-sync-init-{}-{}", std::process::id(), app::rand_suffix()));
    std::fs::create_dir_all(&dir).unwrap();
    dir.join("keap-sync.toml")
}

/// The written file loaded as `run` loads it, with the app's environment (the fake's URLs and
/// API key, the database URL).
fn load(app: &TestApp, path: &Path) -> Config {
    let env = app.env();
    Config::load(Some(path), &|k| env.get(k).cloned())
        .unwrap_or_else(|e| panic!("the written config loads: {e}"))
}

/// `migrate` with the written file, as the table's owner, then a daemon on it.
async fn migrate_and_start(app: &mut TestApp, path: &Path) {
    let env: Vec<(String, String)> = app.env().into_iter().collect();
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    assert_success(&keap_sync(&["--config", path.to_str().unwrap(), "migrate"], &env), "migrate");
    let config = load(app, path);
    app.start_daemon_with(config).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_typical_table_gets_a_config_run_accepts_that_syncs_a_user() {
    let mut app = spawn_app_with(Options { users_ddl: TYPICAL, ..Options::stopped() }).await;
    let path = out_path();
    let out = keap_sync(&["init", "--database-url", &app.conninfo, "--out", path.to_str().unwrap()], &[]);
    assert_success(&out, "init");
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("opt_in_reason"),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );

    let text = std::fs::read_to_string(&path).unwrap();
    for line in [
        "email = \"email\"",
        "given_name = \"first_name\"",
        "[contact.phone_numbers.PHONE1]",
        "number = \"phone\"",
        "[contact.addresses.BILLING]",
        "country_code = \"country\"",
        "zip_code = \"zip\"",
        "opt_in_reason = { sql = \"case when \\\"marketing_consent\\\" then 'Consented in the application' end\" }",
        "# value = \"plan\"",
        "# password_hash (text): holds a secret",
    ] {
        assert!(text.contains(line), "{line:?} in:\n{text}");
    }
    let guesses = text.lines().filter(|l| l.starts_with("# guess: ")).count();
    let assignments = text.lines().filter(|l| !l.starts_with('#') && l.contains(" = ")).count();
    assert_eq!(guesses, assignments - 3, "every key but url, table and key is marked a guess:\n{text}");

    migrate_and_start(&mut app, &path).await;
    app.exec(
        "insert into users (email, first_name, last_name, phone, street, city, state, zip, country,
                            marketing_consent, birth_date, password_hash)
         values ('ada@example.com', 'Ada', 'Lovelace', '+1 602 555 0100', '1 Main St', 'Phoenix', 'Arizona',
                 '85001', 'USA', true, '1815-12-10', 'not-for-keap')",
    )
    .await;
    app.wait_idle().await;
    let contact = app.fake.contacts_with_email("ada@example.com");
    assert_eq!(contact.len(), 1, "one contact");
    let json = app.fake.contact_json(contact[0].id).unwrap();
    assert_eq!(json["given_name"], "Ada");
    assert_eq!(json["phone_numbers"][0]["number"], "+1 602 555 0100");
    assert_eq!(json["addresses"][0]["locality"], "Phoenix");
    assert_eq!(json["addresses"][0]["country_code"], "USA");
    assert_eq!(json["birthday"].as_str().map(|b| &b[..10]), Some("1815-12-10"));
    assert!(!json.to_string().contains("not-for-keap"), "the password hash is never sent: {json}");
    app.stop_daemon().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mixed_case_table_with_a_uuid_key_gets_a_config_that_syncs() {
    let mut app = spawn_app_with(Options::stopped()).await;
    // This database syncs "App"."Accounts" instead of public.users.
    app.exec(
        r#"drop schema keap_sync cascade;
           create schema "App";
           create table "App"."Accounts" (
               "Id"           uuid primary key default gen_random_uuid(),
               "EmailAddress" text,
               "FirstName"    text,
               "LastName"     text,
               "IsSubscribed" boolean not null default false,
               "CreatedAt"    timestamptz not null default now()
           )"#,
    )
    .await;
    let path = out_path();
    // The URL from the environment, as an operator with a password in it would give it.
    let out = keap_sync(
        &["init", "--table", "App.Accounts", "--out", path.to_str().unwrap()],
        &[("DATABASE_URL", &app.conninfo)],
    );
    assert_success(&out, "init");
    let text = std::fs::read_to_string(&path).unwrap();
    for line in
        ["table = \"App.Accounts\"", "key = \"Id\"", "email = \"EmailAddress\"", "family_name = \"LastName\""]
    {
        assert!(text.contains(line), "{line:?} in:\n{text}");
    }
    assert!(text.contains("# [[contact.custom_fields]]   # CreatedAt"), "{text}");

    migrate_and_start(&mut app, &path).await;
    app.exec(r#"insert into "App"."Accounts" ("EmailAddress", "FirstName", "IsSubscribed") values ('grace@example.com', 'Grace', true)"#)
        .await;
    eventually(Duration::from_secs(30), "the account reaches Keap", || async {
        app.fake.contacts_with_email("grace@example.com").len() == 1
    })
    .await;
    app.wait_idle().await;
    let key: String =
        app.db.query_one(r#"select "Id"::text from "App"."Accounts""#, &[]).await.unwrap().get(0);
    let mapped =
        app.count(&format!("select count(*) from keap_sync.contact_map where user_key = '{key}'")).await;
    assert_eq!(mapped, 1, "the uuid key maps the contact");
    app.stop_daemon().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn init_never_overwrites_a_file_without_force() {
    let app = spawn_app_with(Options::stopped()).await;
    let path = out_path();
    std::fs::write(&path, "# mine\n").unwrap();
    let args = ["init", "--database-url", &app.conninfo, "--out", path.to_str().unwrap()];

    let out = keap_sync(&args, &[]);
    assert!(!out.status.success(), "refused");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains(path.to_str().unwrap()) && stderr.contains("--force"), "{stderr}");
    assert_eq!(std::fs::read_to_string(&path).unwrap(), "# mine\n", "the file is untouched");

    let out = keap_sync(&[args.as_slice(), &["--force"]].concat(), &[]);
    assert_success(&out, "init --force");
    let config = load(&app, &path);
    assert_eq!((config.users.table.as_str(), config.users.key.as_str()), ("public.users", "id"));
}
