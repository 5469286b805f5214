//! `keap-sync doctor` as an operator runs it: the binary, against the test's own Postgres and
//! the fake Keap, as the daemon's least-privilege role of `sql/role.example.sql`. A good install
//! passes every check; each broken prerequisite fails exactly its own check (the checks that
//! need it are skipped, the others still pass), with a fix that works: the test applies the
//! fix and doctor passes again. No output ever holds a secret.

use std::collections::BTreeMap;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use keap_sync_testkit::app::{self, spawn_app_with, Options, TestApp, API_KEY, TEST_TOML};
use keap_sync_testkit::fake::FakeOptions;
use keap_sync_testkit::pg::TlsOptions;

/// Every check doctor reports, in order.
const CHECKS: [&str; 10] = [
    "config",
    "database",
    "users table",
    "privileges",
    "schema",
    "capture triggers",
    "keap credential",
    "keap",
    "keap names",
    "queue",
];

/// The columns `sql/role.example.sql` grants for the test kit's users table.
const SYNCED: &str = "id, email, first_name, last_name";

/// One run of `keap-sync doctor --json`.
struct Run {
    output: Output,
    /// Each check's (status, detail, fix), by name.
    checks: BTreeMap<String, (String, String, Option<String>)>,
}

impl Run {
    fn stdout(&self) -> String {
        String::from_utf8_lossy(&self.output.stdout).into_owned()
    }

    fn stderr(&self) -> String {
        String::from_utf8_lossy(&self.output.stderr).into_owned()
    }

    /// The check's (status, detail, fix).
    fn check(&self, name: &str) -> &(String, String, Option<String>) {
        self.checks.get(name).unwrap_or_else(|| panic!("no check {name:?} in {}", self.stdout()))
    }

    /// The check's fix; panics if it has none.
    fn fix(&self, name: &str) -> &str {
        self.check(name).2.as_deref().unwrap_or_else(|| panic!("{name} has no fix: {}", self.stdout()))
    }

    /// Every check is `ok` except those in `expected` (name, status); the exit code is 0
    /// unless one failed.
    fn assert_statuses(&self, expected: &[(&str, &str)]) {
        let names: Vec<&str> = self.checks.keys().map(String::as_str).collect();
        let mut all: Vec<&str> = CHECKS.to_vec();
        all.sort_unstable();
        assert_eq!(names, all, "every check is reported once");
        for name in CHECKS {
            let want = expected.iter().find(|(n, _)| *n == name).map_or("ok", |(_, s)| *s);
            let (status, detail, _) = self.check(name);
            assert_eq!(status, want, "{name}: {detail}\n{}", self.stdout());
        }
        let failed = expected.iter().any(|(_, s)| *s == "fail");
        assert_eq!(self.output.status.success(), !failed, "exit status; stderr: {}", self.stderr());
    }

    /// Neither output holds any of `secrets`.
    fn assert_no_secret(&self, secrets: &[String]) {
        let (out, err) = (self.stdout(), self.stderr());
        for s in secrets.iter().filter(|s| !s.is_empty()) {
            assert!(
                !out.contains(s.as_str()) && !err.contains(s.as_str()),
                "a secret in the output: {out}{err}"
            );
        }
    }
}

/// `keap-sync [--config FILE] doctor --json` with only `env` (and `PATH`) in its environment.
fn doctor(config: Option<&Path>, env: &BTreeMap<String, String>) -> Run {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_keap-sync"));
    if let Some(path) = config {
        cmd.arg("--config").arg(path);
    }
    let output = cmd
        .args(["doctor", "--json"])
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .envs(env)
        .output()
        .expect("run keap-sync doctor");
    let json: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap_or_else(|e| {
        panic!(
            "doctor --json printed no JSON ({e}): {}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        )
    });
    let checks = json["checks"]
        .as_array()
        .expect("checks")
        .iter()
        .map(|c| {
            let text = |k: &str| c[k].as_str().map(str::to_owned);
            (text("name").unwrap(), (text("status").unwrap(), text("detail").unwrap(), text("fix")))
        })
        .collect();
    assert_eq!(
        json["passed"],
        serde_json::json!(output.status.success()),
        "passed agrees with the exit status"
    );
    Run { output, checks }
}

/// `keap-sync args` with `env`, `stdin` piped in; panics unless it succeeds.
fn keap_sync(args: &[&str], env: &BTreeMap<String, String>, stdin: &str) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_keap-sync"))
        .args(args)
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .envs(env)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run keap-sync");
    child.stdin.take().expect("stdin").write_all(stdin.as_bytes()).expect("write stdin");
    let out = child.wait_with_output().expect("keap-sync ends");
    assert!(out.status.success(), "keap-sync {args:?}: {}", String::from_utf8_lossy(&out.stderr));
}

/// Creates a login role with the grants of `sql/role.example.sql`: the use of keap_sync (also
/// of the tables later migrations add, which the test's `postgres` creates) and `SELECT` on
/// `columns` of the users table. Returns its name.
async fn daemon_role(app: &TestApp, columns: &str, password: Option<&str>) -> String {
    let role = format!("ks_doctor_{}", app::rand_suffix());
    let password = password.map(|p| format!(" password '{p}'")).unwrap_or_default();
    app.exec(&format!(
        "create role {role} login{password};
         grant usage on schema keap_sync to {role};
         grant select, insert, update, delete on all tables in schema keap_sync to {role};
         grant usage, select on all sequences in schema keap_sync to {role};
         revoke insert, update, delete on keap_sync.schema_migrations from {role};
         alter default privileges for role postgres in schema keap_sync
             grant select, insert, update, delete on tables to {role};
         alter default privileges for role postgres in schema keap_sync
             grant usage, select on sequences to {role};
         grant usage on schema public to {role};
         grant select ({columns}) on public.users to {role};"
    ))
    .await;
    role
}

/// The app's environment (its fake Keap and credential) with the database as `role`.
fn env_as(app: &TestApp, role: &str) -> BTreeMap<String, String> {
    let mut env: BTreeMap<String, String> = app.env().into_iter().collect();
    env.insert("DATABASE_URL".into(), format!("{} user={role}", app.conninfo));
    env
}

/// The app's environment as the owner of the users table (`postgres`), for `migrate`.
fn env_as_owner(app: &TestApp) -> BTreeMap<String, String> {
    app.env().into_iter().collect()
}

/// A stopped app on the shared cluster with `toml` and `ddl`.
async fn stopped_app(toml: &'static str, users_ddl: &'static str, oauth: bool) -> TestApp {
    spawn_app_with(Options { toml, users_ddl, oauth, ..Options::stopped() }).await
}

/// The secrets a run must never print: the API key, the OAuth client secret, every token the
/// fake issued.
fn secrets(app: &TestApp) -> Vec<String> {
    let mut all = vec![API_KEY.to_owned(), FakeOptions::default().client_secret];
    all.extend(app.fake.issued_secrets());
    all
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn doctor_passes_on_a_good_install() {
    let toml = "[tags]\non_create = [\"Signed up via app\"]\n";
    let app = stopped_app(toml, app::USERS_DDL, false).await;
    app.fake.create_tag("Signed up via app");
    let role = daemon_role(&app, SYNCED, None).await;
    app.insert_users(2).await;
    let config = app.write_config_file("", "");

    let run = doctor(Some(&config), &env_as(&app, &role));
    run.assert_statuses(&[]);
    let detail = |name: &str| run.check(name).1.clone();
    assert!(detail("config").contains(config.to_str().unwrap()), "{}", detail("config"));
    assert!(detail("database").contains("PostgreSQL") && detail("database").contains("Unix socket"));
    assert!(detail("privileges").contains(&role) && detail("privileges").contains("nothing more"));
    assert!(
        detail("capture triggers").contains("email, first_name, last_name"),
        "{}",
        detail("capture triggers")
    );
    assert!(detail("keap credential").contains("API key"));
    assert!(detail("keap").contains("limits in force"), "{}", detail("keap"));
    assert!(detail("keap names").contains("the tag the mapping names"), "{}", detail("keap names"));
    assert!(detail("queue").contains("2 captured"), "{}", detail("queue"));
    run.assert_no_secret(&secrets(&app));
    assert_eq!(app.fake.count(|r| r.method != "GET"), 0, "doctor makes read-only calls");

    // The text form: one line per check, each marked met.
    let out = Command::new(env!("CARGO_BIN_EXE_keap-sync"))
        .args(["--config", config.to_str().unwrap(), "doctor"])
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .envs(env_as(&app, &role))
        .output()
        .expect("run keap-sync doctor");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}{}", String::from_utf8_lossy(&out.stderr));
    let marked: Vec<&str> = text.lines().filter(|l| l.starts_with("✓ ")).collect();
    assert_eq!(marked.len(), CHECKS.len(), "{text}");
}

/// Writes a configuration file whose `[database]` section is `database`, with the fake's URLs.
fn config_with_database(app: &TestApp, database: &str) -> PathBuf {
    let dir =
        std::env::temp_dir().join(format!("keap-sync-doctor-{}-{}", std::process::id(), app::rand_suffix()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("keap-sync.toml");
    let keap =
        format!("[keap]\napi_url = \"{}\"\ntoken_url = \"{}\"", app.fake.api_url(), app.fake.token_url());
    std::fs::write(&path, format!("[database]\n{database}\n{}", TEST_TOML.replacen("[keap]", &keap, 1)))
        .unwrap();
    path
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_database_password_fails_the_database_check_and_the_right_one_passes() {
    let app =
        spawn_app_with(Options { tls: Some(TlsOptions { reject_plaintext: true }), ..Options::stopped() })
            .await;
    let right = format!("right-{}", app::rand_suffix());
    let role = daemon_role(&app, SYNCED, Some(&right)).await;
    let tcp: tokio_postgres::Config = app.tcp_conninfo().parse().unwrap();
    let ca = app.cluster().ca_file().expect("a TLS cluster").display().to_string();
    let section = |password: &str| {
        format!(
            "url = 'host=localhost hostaddr=127.0.0.1 port={} user={role} password={password} dbname={} sslmode=require'\nca_file = '{ca}'",
            tcp.get_ports()[0],
            tcp.get_dbname().unwrap()
        )
    };
    let mut env = env_as(&app, &role);
    env.remove("DATABASE_URL");

    let wrong = format!("wrong-{}", app::rand_suffix());
    let run = doctor(Some(&config_with_database(&app, &section(&wrong))), &env);
    let mut expected = vec![("database", "fail")];
    expected.extend(CHECKS[2..].iter().map(|name| (*name, "skipped")));
    run.assert_statuses(&expected);
    assert!(run.fix("database").contains("password"), "{}", run.fix("database"));
    assert!(run.check("users table").1.contains("the database was not reached"));
    run.assert_no_secret(&[wrong, right.clone()]);

    // The fix: the role's password.
    let run = doctor(Some(&config_with_database(&app, &section(&right))), &env);
    run.assert_statuses(&[]);
    assert!(run.check("database").1.contains("TLS in use"), "{}", run.check("database").1);
    run.assert_no_secret(&[right]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_grant_stored_fails_the_credential_check_and_auth_import_fixes_it() {
    let app = stopped_app("", app::USERS_DDL, true).await;
    let role = daemon_role(&app, SYNCED, None).await;
    app.exec("delete from keap_sync.oauth_token").await;
    let env = env_as(&app, &role);

    let run = doctor(None, &env);
    run.assert_statuses(&[("keap credential", "fail"), ("keap", "skipped"), ("keap names", "skipped")]);
    assert!(run.check("keap credential").1.contains("no grant is stored"));
    let fix = run.fix("keap credential");
    assert!(fix.contains("keap-sync auth import"), "{fix}");

    // The fix: a token response piped into `keap-sync auth import`.
    let grant = serde_json::to_string(&app.fake.issue_grant()).unwrap();
    keap_sync(&["auth", "import"], &env, &grant);
    let run = doctor(None, &env);
    run.assert_statuses(&[]);
    assert!(run.check("keap credential").1.contains("OAuth client"), "{}", run.check("keap credential").1);
    run.assert_no_secret(&secrets(&app));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_disabled_trigger_fails_the_capture_check_and_migrate_fixes_it() {
    let app = stopped_app("", app::USERS_DDL, false).await;
    let role = daemon_role(&app, SYNCED, None).await;
    app.exec("alter table users disable trigger keap_sync_capture_update").await;
    let env = env_as(&app, &role);

    let run = doctor(None, &env);
    run.assert_statuses(&[("capture triggers", "fail")]);
    assert!(run.check("capture triggers").1.contains("keap_sync_capture_update"));
    assert!(run.check("capture triggers").1.contains("disabled"));
    assert!(run.fix("capture triggers").contains("keap-sync migrate` as the owner of public.users"));

    // The fix: `keap-sync migrate` as the table's owner.
    keap_sync(&["migrate"], &env_as_owner(&app), "");
    doctor(None, &env).assert_statuses(&[]);
}

/// The statements a fix gives after "as the owner of …: ".
fn statements_in(fix: &str) -> String {
    let (_, sql) = fix.split_once(": ").unwrap_or_else(|| panic!("no statement in the fix: {fix}"));
    sql.to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mapped_column_without_select_fails_the_privileges_check_and_the_grant_fixes_it() {
    let app = stopped_app("", app::USERS_DDL, false).await;
    let role = daemon_role(&app, "id, email, first_name", None).await;
    let env = env_as(&app, &role);

    let run = doctor(None, &env);
    run.assert_statuses(&[("privileges", "fail")]);
    assert!(
        run.check("privileges").1.contains("cannot read column last_name"),
        "{}",
        run.check("privileges").1
    );

    // The fix, as doctor words it, run as the table's owner.
    let fix = run.fix("privileges");
    assert!(fix.contains(&format!("to \"{role}\"")), "{fix}");
    app.exec(&statements_in(fix)).await;
    doctor(None, &env).assert_statuses(&[]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unknown_custom_field_fails_the_names_check_and_creating_it_fixes_it() {
    let ddl = "create table public.users (id bigserial primary key, email text, first_name text, last_name text, seats integer)";
    let toml = "[[contact.custom_fields]]\nname = \"Seats\"\nvalue = \"seats\"\n";
    let app = stopped_app(toml, ddl, false).await;
    let role = daemon_role(&app, "id, email, first_name, last_name, seats", None).await;
    let config = app.write_config_file("", "");
    let env = env_as(&app, &role);

    let run = doctor(Some(&config), &env);
    run.assert_statuses(&[("keap names", "fail")]);
    assert!(run.check("keap names").1.contains("\"Seats\""), "{}", run.check("keap names").1);
    assert!(run.fix("keap names").contains("create the custom field in Keap"));

    // The fix: the field created in Keap.
    app.fake.add_custom_field("Seats", "WholeNumber");
    let run = doctor(Some(&config), &env);
    run.assert_statuses(&[]);
    assert!(run.check("keap names").1.contains("every mapped custom field"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_superuser_daemon_role_is_a_warning_and_doctor_still_passes() {
    let app = stopped_app("", app::USERS_DDL, false).await;

    let run = doctor(None, &env_as_owner(&app));
    run.assert_statuses(&[("privileges", "warn")]);
    assert!(run.check("privileges").1.contains("superuser"), "{}", run.check("privileges").1);
    assert!(run.fix("privileges").contains("sql/role.example.sql"));

    // The fix: the daemon runs as a role with only those grants.
    let role = daemon_role(&app, SYNCED, None).await;
    doctor(None, &env_as(&app, &role)).assert_statuses(&[]);
}

/// Replaces schema keap_sync with one at the migration before the newest: every file of
/// `sql/` but the last applied and recorded as `migrate` records them. The triggers go with it.
async fn one_migration_behind(app: &TestApp) {
    use sha2::Digest as _;
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("sql");
    let mut files: Vec<String> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|n| n.ends_with(".sql") && n.as_bytes()[0].is_ascii_digit())
        .collect();
    files.sort();
    files.pop();
    app.exec(
        "drop schema keap_sync cascade;
         create schema keap_sync;
         create table keap_sync.schema_migrations (version integer primary key, name text not null,
             checksum text not null, applied_at timestamptz not null default now());",
    )
    .await;
    for (i, name) in files.iter().enumerate() {
        let sql = std::fs::read_to_string(dir.join(name)).unwrap();
        app.exec(&sql).await;
        let sum: String = sha2::Sha256::digest(sql.as_bytes()).iter().map(|b| format!("{b:02x}")).collect();
        app.db
            .execute(
                "insert into keap_sync.schema_migrations (version, name, checksum) values ($1, $2, $3)",
                &[&(i as i32 + 1), name, &sum],
            )
            .await
            .unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_schema_one_migration_behind_fails_the_schema_check_and_migrate_fixes_it() {
    let app = stopped_app("", app::USERS_DDL, false).await;
    one_migration_behind(&app).await;
    let role = daemon_role(&app, SYNCED, None).await;
    let env = env_as(&app, &role);

    let run = doctor(None, &env);
    let after: Vec<(&str, &str)> = CHECKS[5..].iter().map(|name| (*name, "skipped")).collect();
    run.assert_statuses(&[[("schema", "fail")].as_slice(), &after].concat());
    assert!(run.check("schema").1.contains("this binary needs"), "{}", run.check("schema").1);
    assert!(run.fix("schema").contains("keap-sync migrate` as the owner of public.users"));

    // The fix: `keap-sync migrate` as the table's owner.
    keap_sync(&["migrate"], &env_as_owner(&app), "");
    doctor(None, &env).assert_statuses(&[]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_inbound_column_without_update_fails_the_privileges_check_and_the_grant_fixes_it() {
    const DDL: &str = "create table public.users (
        id bigserial primary key, email text, first_name text, last_name text,
        marketing_opt_out boolean, job text)";
    let toml = "[inbound]\nemail_opt_out = \"marketing_opt_out\"\n\
                [contact]\njob_title = { column = \"job\", owner = \"shared\", prefer = \"app\" }\n";
    let app = stopped_app(toml, DDL, false).await;
    let role = daemon_role(&app, &format!("{SYNCED}, job"), None).await;
    let env = env_as(&app, &role);
    let config = app.write_config_file("", "");

    let run = doctor(Some(&config), &env);
    run.assert_statuses(&[("privileges", "fail")]);
    let detail = &run.check("privileges").1;
    assert!(detail.contains("cannot read and write column marketing_opt_out, job"), "{detail}");
    let fix = run.fix("privileges");
    assert!(
        fix.contains(r#"grant select ("marketing_opt_out", "job"), update ("marketing_opt_out", "job")"#),
        "{fix}"
    );
    app.exec(&statements_in(fix)).await;
    let run = doctor(Some(&config), &env);
    run.assert_statuses(&[]);
    assert!(run.check("privileges").1.contains("writes the 2 columns"), "{}", run.check("privileges").1);
}
