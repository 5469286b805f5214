//! The binary as an operator meets it: bad configuration fails fast with one clear line,
//! `migrate` is idempotent, and a daemon killed with SIGKILL mid-batch loses and duplicates
//! nothing after a restart.

use std::process::{Command, Output};
use std::time::Duration;

use keap_sync_testkit::app::{self, spawn_app_with, Options, API_KEY};
use keap_sync_testkit::fake::{FaultAction, FaultRule, Route};

fn keap_sync(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_keap-sync"));
    cmd.args(args).env_clear().env("PATH", std::env::var("PATH").unwrap_or_default());
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.output().expect("run keap-sync")
}

/// Exits non-zero and prints exactly one line on stderr, which contains every `needle`.
fn assert_one_line_error(out: &Output, needles: &[&str]) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "should fail; stderr: {stderr}");
    let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "exactly one line on stderr, got: {stderr}");
    for n in needles {
        assert!(lines[0].contains(n), "{:?} should mention {n:?}", lines[0]);
    }
    assert!(lines[0].starts_with("error: "), "{}", lines[0]);
}

fn temp_config(text: &str) -> std::path::PathBuf {
    let dir =
        std::env::temp_dir().join(format!("keap-sync-cli-{}-{}", std::process::id(), app::rand_suffix()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("keap-sync.toml");
    std::fs::write(&path, text).unwrap();
    path
}

#[test]
fn an_unknown_key_is_named() {
    let path = temp_config("[delivery]\nconcurrency = 4\nbatch_sise = 10\n");
    let out = keap_sync(&["--config", path.to_str().unwrap(), "run"], &[("KEAP_API_KEY", "k")]);
    assert_one_line_error(&out, &["batch_sise"]);
    assert_eq!(out.status.code(), Some(2));
}

#[test]
fn a_missing_database_url_says_how_to_set_it() {
    let out = keap_sync(&["run"], &[("KEAP_API_KEY", "k")]);
    assert_one_line_error(&out, &["DATABASE_URL"]);
}

#[test]
fn a_missing_credential_says_how_to_set_it() {
    let out = keap_sync(&["run"], &[("DATABASE_URL", "host=127.0.0.1 port=1 user=x")]);
    assert_one_line_error(&out, &["KEAP_API_KEY", "KEAP_CLIENT_ID"]);
}

#[test]
fn an_unreachable_database_is_one_line_without_the_password() {
    let out = keap_sync(
        &["run"],
        &[
            ("DATABASE_URL", "postgresql://app:hunter2@127.0.0.1:1/crm?connect_timeout=2"),
            ("KEAP_API_KEY", "k"),
        ],
    );
    assert_one_line_error(&out, &["cannot connect to the database", "127.0.0.1", "port 1"]);
    assert!(!String::from_utf8_lossy(&out.stderr).contains("hunter2"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_table_or_column_is_named() {
    let app = spawn_app_with(Options { start_daemon: false, ..Options::default() }).await;
    let env = [("DATABASE_URL", app.conninfo.as_str()), ("KEAP_API_KEY", API_KEY)];

    let path = temp_config("[users]\ntable = \"public.members\"\n");
    let out = keap_sync(&["--config", path.to_str().unwrap(), "migrate"], &env);
    assert_one_line_error(&out, &["public.members", "does not exist"]);

    let path = temp_config("[users]\nfamily_name = \"surname\"\n");
    let out = keap_sync(&["--config", path.to_str().unwrap(), "migrate"], &env);
    assert_one_line_error(&out, &["surname", "family_name"]);

    // The daemon refuses a table it was not migrated for, too.
    let out = keap_sync(&["--config", path.to_str().unwrap(), "run"], &env);
    assert_one_line_error(&out, &["surname"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migrate_twice_is_a_no_op_and_uninstall_removes_the_trigger() {
    let app = spawn_app_with(Options { start_daemon: false, ..Options::default() }).await;
    let env = [("DATABASE_URL", app.conninfo.as_str())];
    let out = keap_sync(&["migrate"], &env);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).contains("up to date"));
    let applied = app.count("select count(*) from keap_sync.schema_migrations").await;
    let files = std::fs::read_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/sql"))
        .unwrap()
        .filter(|e| e.as_ref().unwrap().file_name().to_string_lossy().starts_with(char::is_numeric))
        .count();
    assert_eq!(applied, files as i64, "one applied migration per sql/NNNN_*.sql file");

    // Capture writes the change log (and the outbox for a key change or a truncate); count both.
    let captured = "select (select count(*) from keap_sync.change) + (select count(*) from keap_sync.outbox)";
    // A positive control first: installed, every kind of write is captured.
    app.exec("insert into users (email) values ('before@example.com')").await;
    assert!(app.count(captured).await > 0, "an insert is captured while the triggers are installed");
    app.exec("delete from keap_sync.change; delete from keap_sync.outbox").await;

    let out = keap_sync(&["uninstall"], &env);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let triggers =
        "select count(*) from pg_trigger where tgrelid = 'public.users'::regclass and not tgisinternal";
    assert_eq!(app.count(triggers).await, 0, "uninstall leaves no trigger on users");
    app.exec("insert into users (email) values ('after@example.com')").await;
    app.exec("update users set first_name = 'Renamed'").await;
    app.exec("update users set id = id + 1000 where email = 'after@example.com'").await;
    app.exec("delete from users where email = 'before@example.com'").await;
    app.exec("truncate users").await;
    assert_eq!(
        app.count(captured).await,
        0,
        "no capture after uninstall: insert, update, key change, delete, truncate"
    );

    let out = keap_sync(&["uninstall", "--drop-schema"], &env);
    assert!(out.status.success());
    assert_eq!(app.count("select count(*) from pg_namespace where nspname = 'keap_sync'").await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_mid_batch_then_restart_delivers_everything_once() {
    let app = spawn_app_with(Options { start_daemon: false, ..Options::default() }).await;
    // Slow Keap, so the kill lands while calls are in flight; and now and then a reply lost
    // after Keap committed the write, which only an idempotent upsert survives.
    app.fake.set_latency(Duration::from_millis(30));
    app.fake.inject(FaultRule::new(Route::Contacts, FaultAction::DropAfterCommit).probability(0.05));
    let config = app.write_config_file("", "");
    app.exec(
        "insert into users (email, first_name, last_name)
         select 'kill' || g || '@example.com', 'F' || g, 'L' || g from generate_series(1, 300) g",
    )
    .await;

    let mut daemon = app.spawn_process(&config);
    app::eventually(Duration::from_secs(30), "a third of the users delivered", || async {
        app.contact_calls("PUT") >= 100
    })
    .await;
    daemon.kill();
    let at_kill = app.contact_calls("PUT");
    let leased = app.count("select count(*) from keap_sync.outbox where lease_until > now()").await;
    eprintln!("killed after {at_kill} upserts with {leased} claims held");

    // Changes keep coming while it is down.
    app.exec("update users set last_name = 'after-kill' where id % 5 = 0").await;

    let _daemon = app.spawn_process(&config);
    app.wait_idle_for(Duration::from_secs(60)).await;
    app.assert_keap_matches_users().await;
    assert_eq!(app.fake.contacts().len(), 300);
}

/// A killed daemon's claims have no task behind them: the instance that takes the delivery lock
/// after it releases them, so its work resumes at once instead of after the lease (two minutes
/// here, as in production; the test waits far less).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_daemons_claims_resume_at_once_after_a_restart() {
    let app = spawn_app_with(Options::stopped()).await;
    // Slow Keap, so claims are held when the kill lands.
    app.fake.set_latency(Duration::from_millis(400));
    let config = app.write_config_file("", "");
    let text = std::fs::read_to_string(&config).unwrap();
    assert!(text.contains("lease_secs = 10"), "the test config sets the lease");
    std::fs::write(&config, text.replace("lease_secs = 10", "lease_secs = 120")).unwrap();
    app.insert_users(100).await;

    let mut daemon = app.spawn_process(&config);
    app::eventually(Duration::from_secs(30), "claims held by the first daemon", || async {
        app.count("select count(*) from keap_sync.outbox where lease_until > now() + interval '60 seconds'")
            .await
            > 0
    })
    .await;
    daemon.kill();
    let _ = daemon.child.wait();
    let held = app.count("select count(*) from keap_sync.outbox where lease_until > now()").await;
    assert!(held > 0, "the kill left claims leased");

    app.fake.set_latency(Duration::ZERO);
    let restarted = app.spawn_process(&config);
    // Well inside the 120 s lease: only a release by the new instance gets there in time.
    app::eventually(Duration::from_secs(20), "every user delivered after the restart", || async {
        app.count("select count(*) from keap_sync.outbox").await == 0
    })
    .await;
    app.assert_keap_matches_users().await;
    assert!(
        restarted.log_text().contains("released the claims of an instance that is gone"),
        "the log says why: {}",
        restarted.log_text()
    );
}

/// The README's first command: the demo runs on its own throwaway Postgres and fake Keap, and
/// its narration shows what the product does: `preview`'s plan before the first sync (a phone
/// and a plan tag mapped), the calls each step cost as the fake counted them, and `reconcile`
/// finding exactly the hand edits made in the fake, which `--apply` then repairs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_demo_runs_end_to_end() {
    // What `cargo run --release --example demo` runs, in-process (cargo test builds the example
    // itself too, so its few lines of `main` are compiled).
    let mut narration = Vec::new();
    let result = keap_sync_testkit::demo::run(&mut narration, false).await;
    let stdout = String::from_utf8_lossy(&narration);
    assert!(result.is_ok(), "{result:?}\nnarration:\n{stdout}");
    let between = |from: &str, to: &str| -> Vec<String> {
        let start = stdout.find(from).unwrap_or_else(|| panic!("no {from:?} in:\n{stdout}"));
        let rest = &stdout[start..];
        let end = rest.find(to).unwrap_or_else(|| panic!("no {to:?} after {from:?} in:\n{stdout}"));
        rest[..end].lines().skip(1).map(str::trim).filter(|l| !l.is_empty()).map(str::to_owned).collect()
    };

    let preview = between("3. keap-sync preview", "4. keap-sync run");
    for line in [
        "user 1: create-or-update",
        "PUT /v1/contacts",
        r#"{"duplicate_option":"Email","email_addresses":[{"email":"linus@example.com","field":"EMAIL1"}],"family_name":"Pauling","given_name":"Linus","phone_numbers":[{"field":"PHONE1","number":"+1 555 0100"}]}"#,
        "POST /v1/contacts/{new}/tags",
        r#"{"tagIds":["Plan: pro"]}"#,
        "note: tag Plan: pro does not exist in Keap; it would be created",
        "user 2: create-or-update",
        r#"{"tagIds":["Plan: free"]}"#,
        "preview itself made 2 calls: 2 read tags; it writes nothing to Keap and records nothing.",
    ] {
        assert!(preview.iter().any(|l| l == line), "preview lacks {line:?}:\n{preview:#?}");
    }

    let backfill = between("4. keap-sync run", "5. The app inserts");
    // The calls counted, up to the first full stop: one create and one tag per user, no lookup.
    let counted = backfill[0].split_once('.').map_or("", |(calls, _)| calls);
    assert!(counted.ends_with("2 create contact, 2 apply tag"), "{backfill:#?}");
    assert!(!counted.contains("lookup by email") && !counted.contains("answered 429"), "{backfill:#?}");
    assert!(
        backfill[1].ends_with("Linus Pauling <linus@example.com>  +1 555 0100  [Plan: pro]"),
        "{backfill:#?}"
    );
    // Two creates and a tag each; Grace's contact is linked from the mirror at no call. (The
    // daemon may refresh the mirror first if its last look is over 10 s old: a list call.)
    assert!(stdout.contains("2 create contact, 3 apply tag (Grace's contact"), "{stdout}");
    assert!(stdout.contains("50 changes cost 1 call: 1 update contact."), "{stdout}");
    assert!(
        stdout.contains("4 calls: 1 read contact, 1 update contact, 1 apply tag, 1 remove tag:"),
        "{stdout}"
    );

    // Exactly the two hand edits, each named by user, class and property; nothing else.
    let drift = between("10. keap-sync reconcile", "keap-sync reconcile --apply");
    let shape: Vec<String> = drift
        .iter()
        .map(|l| {
            match l.split_once(" (contact ").and_then(|(user, rest)| Some((user, rest.split_once("): ")?.1)))
            {
                Some((user, what)) => format!("{user}: {what}"),
                None => l.clone(),
            }
        })
        .collect();
    assert_eq!(
        shape,
        [
            "user 1: differs: given_name",
            r#"user 2: differs: tag "Plan: free""#,
            "5 users: 3 in sync, 2 not; 1 call: 1 list contacts",
        ],
        "{stdout}"
    );
    let repaired = between("2 users queued;", "In all keap-sync made");
    assert!(
        repaired[0].ends_with("Linus Pauling <linus@example.com>  +1 555 0100  [Plan: pro]"),
        "{repaired:#?}"
    );
    assert!(
        repaired[1].ends_with("Margaret Hamilton <margaret@example.com>  no phone  [Plan: free]"),
        "{repaired:#?}"
    );
    assert!(stdout.contains("holds 5 contacts for 5 users"), "{stdout}");
    // The narration's own words for a throttled call; a bare "429" may be part of the port.
    assert!(!stdout.contains("answered 429"), "no call was throttled: {stdout}");
}

/// A log file or pipe gets plain text: no ANSI colour codes unless standard error is a terminal.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_log_file_gets_no_colour_codes() {
    let app = spawn_app_with(Options { start_daemon: false, ..Options::default() }).await;
    app.exec("insert into users (email) values ('plain@example.com')").await;
    let config = app.write_config_file("", "");
    let daemon = app.spawn_process(&config);
    app.wait_idle().await;
    app::eventually(Duration::from_secs(10), "the start-up line in the log", || async {
        daemon.log_text().contains("keap-sync started")
    })
    .await;
    let log = daemon.log_text();
    assert!(!log.contains('\u{1b}'), "escape codes in a log file:\n{log:?}");
}

/// A migration whose file changed after it was applied is refused with the fix (invariant 9:
/// forward-only, checksummed). The edit is played by the recorded checksum no longer matching.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_edited_migration_is_refused_naming_it() {
    let app = spawn_app_with(Options::stopped()).await;
    let env = [("DATABASE_URL", app.conninfo.as_str())];
    app.exec("update keap_sync.schema_migrations set checksum = 'edited' where version = 3").await;
    let out = keap_sync(&["migrate"], &env);
    assert_one_line_error(&out, &["migration 0003", "changed after it was applied", "add a new one"]);
    // Nothing was applied or installed meanwhile: the refusal rolled back the whole attempt.
    assert_eq!(
        app.count("select count(*) from keap_sync.schema_migrations where checksum = 'edited'").await,
        1
    );
}

/// A fresh database holding the users table only, and its conninfo.
async fn bare_database(app: &keap_sync_testkit::app::TestApp) -> (tokio_postgres::Client, String) {
    let conninfo = app.cluster().fresh_database("bare").await.expect("a fresh database");
    let db = app::connect(&conninfo).await;
    db.batch_execute(app::USERS_DDL).await.expect("users table");
    (db, conninfo)
}

/// Every migration runs in one transaction: one that fails leaves nothing of the others, not
/// even the bookkeeping table (invariant 9).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migrations_run_in_one_transaction() {
    let app = spawn_app_with(Options::stopped()).await;
    let (db, conninfo) = bare_database(&app).await;
    // An object in the way of a later migration (0007 creates keap_sync.quota_usage).
    db.batch_execute("create schema keap_sync; create table keap_sync.quota_usage (x int)").await.unwrap();
    let out = keap_sync(&["migrate"], &[("DATABASE_URL", conninfo.as_str())]);
    assert!(!out.status.success(), "migrate must fail: {}", String::from_utf8_lossy(&out.stdout));
    let left = "select count(*) from pg_class c join pg_namespace n on n.oid = c.relnamespace
                 where n.nspname = 'keap_sync' and c.relname <> 'quota_usage'";
    let left: i64 = db.query_one(left, &[]).await.unwrap().get(0);
    assert_eq!(left, 0, "nothing of migrations 0001-0006 (nor schema_migrations) is left");
    let triggers: i64 = db
        .query_one("select count(*) from pg_trigger where tgrelid = 'public.users'::regclass", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(triggers, 0, "no trigger installed");
    // With the obstacle gone it applies everything.
    db.batch_execute("drop table keap_sync.quota_usage").await.unwrap();
    let out = keap_sync(&["migrate"], &[("DATABASE_URL", conninfo.as_str())]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
}

/// Migrations run under the advisory lock: while another session holds it, `migrate` waits
/// (says so) and applies nothing; it goes ahead once the lock is free (invariant 9).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migrate_waits_for_the_advisory_lock() {
    /// `schema::MIGRATION_LOCK`: "keapsync" in ASCII.
    const MIGRATION_LOCK: i64 = 0x6b65_6170_7379_6e63;
    let app = spawn_app_with(Options::stopped()).await;
    let (db, conninfo) = bare_database(&app).await;
    let holder = app::connect(&conninfo).await;
    holder.execute("select pg_advisory_lock($1)", &[&MIGRATION_LOCK]).await.unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_keap-sync"))
        .arg("migrate")
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("DATABASE_URL", &conninfo)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawn migrate");
    let waiting = "select count(*) from pg_locks where locktype = 'advisory' and not granted
                    and database = (select oid from pg_database where datname = current_database())";
    app::eventually(Duration::from_secs(10), "migrate waiting on the advisory lock", || async {
        db.query_one(waiting, &[]).await.unwrap().get::<_, i64>(0) == 1
    })
    .await;
    let applied: bool = db
        .query_one("select to_regclass('keap_sync.schema_migrations') is not null", &[])
        .await
        .unwrap()
        .get(0);
    assert!(!applied, "nothing is visible while migrate waits for the lock");
    assert!(child.try_wait().unwrap().is_none(), "migrate waits");
    holder.execute("select pg_advisory_unlock($1)", &[&MIGRATION_LOCK]).await.unwrap();
    let out = tokio::task::spawn_blocking(move || child.wait_with_output()).await.unwrap().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let applied: bool = db
        .query_one("select to_regclass('keap_sync.schema_migrations') is not null", &[])
        .await
        .unwrap()
        .get(0);
    assert!(applied, "applied once the lock was free");
}

/// The completions and the man page the package ships come from the binary's own arguments,
/// and need no configuration or database.
#[test]
fn completions_and_the_man_page_name_every_command() {
    for shell in ["bash", "zsh", "fish"] {
        let out = keap_sync(&["completions", shell], &[]);
        assert!(out.status.success(), "{shell}: {}", String::from_utf8_lossy(&out.stderr));
        let script = String::from_utf8_lossy(&out.stdout);
        for command in ["migrate", "run", "preview", "reconcile", "backfill", "status", "auth", "failures"] {
            assert!(script.contains(command), "{shell} completion lacks {command}");
        }
    }
    let man = keap_sync(&["manpage"], &[]);
    assert!(man.status.success());
    let page = String::from_utf8_lossy(&man.stdout);
    assert!(page.contains(".TH keap-sync 1") && page.contains("reconcile"), "{page}");
    let unknown = keap_sync(&["completions", "tcsh"], &[]);
    assert!(!unknown.status.success(), "an unknown shell is refused");
}
