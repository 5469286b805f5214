//! The `spawn_app()` harness: a real Postgres (one throwaway cluster per test process, a fresh
//! database per test), the fake Keap, and the real daemon — in-process via
//! [`TestApp::start_daemon`], or as a child process via [`TestApp::spawn_process`] when a test
//! needs to SIGKILL it.
//!
//! Nothing here sleeps to synchronise: tests wait for a condition with a deadline
//! ([`TestApp::wait_idle`], [`eventually`]).

use std::collections::HashMap;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Mutex, Once, OnceLock};
use std::time::Duration;

use keap_sync::config::Config;
use keap_sync::{Daemon, RunError, RunOptions};

use crate::fake::{FakeKeap, FakeOptions, TokenGrant};
use crate::pg::{Cluster, TlsOptions};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tokio_postgres::{Client, NoTls};

/// The API key the test configuration sends and the fake accepts.
pub const API_KEY: &str = "test-api-key-0123456789";

/// The hook receiver's secret path in every test's environment (`KEAP_SYNC_HOOK_PATH`), read
/// only when a test's config has `[hooks] listen`.
pub const HOOK_PATH: &str = "test-hook-path-0123456789abcdef";

/// The application's table as a typical app has it: `plan` is not synced.
pub const USERS_DDL: &str = "create table public.users (
    id          bigserial primary key,
    email       text,
    first_name  text,
    last_name   text,
    plan        text not null default 'free'
)";

/// Test settings: fast retries, a lease short enough for crash tests, limits out of the way.
pub const TEST_TOML: &str = r#"
[keap]
request_timeout_secs = 3
connect_timeout_secs = 1
refresh_margin_secs = 1

[delivery]
lease_secs = 10
poll_interval_ms = 500
retry_base_ms = 50
retry_max_secs = 1
shutdown_grace_secs = 5

[limits]
per_second = 5000
per_minute = 300000
per_day = 10000000
"#;

/// The cluster every test of this process shares (started on first use).
pub fn cluster() -> &'static Cluster {
    static CLUSTER: OnceLock<Cluster> = OnceLock::new();
    CLUSTER
        .get_or_init(|| Cluster::start().unwrap_or_else(|e| panic!("cannot start the test PostgreSQL: {e}")))
}

/// Every log line of this test process, at debug level, so tests can grep them for secrets.
/// Lines are also printed when `KEAP_SYNC_LOG` is set.
static LOGS: Mutex<Vec<u8>> = Mutex::new(Vec::new());

/// Every log line captured so far in this test process, for tests that grep the log.
pub fn captured_logs() -> String {
    String::from_utf8_lossy(&LOGS.lock().unwrap_or_else(|e| e.into_inner())).into_owned()
}

struct Capture;

impl std::io::Write for Capture {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        LOGS.lock().unwrap_or_else(|e| e.into_inner()).extend_from_slice(buf);
        if std::env::var_os("KEAP_SYNC_LOG").is_some() {
            eprint!("{}", String::from_utf8_lossy(buf));
        }
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn init_tracing() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::new("debug"))
            .with_ansi(false)
            .with_writer(|| Capture)
            .try_init();
    });
}

/// The fake as tests use it: Keap's strictest behaviour, except its limits, which are lifted
/// out of the way: a per-minute limit far above what a test sends, no spike arrest and no
/// tenant limit. (The fake reports its per-minute limits in `x-keap-product-throttle-limit` and
/// `x-keap-tenant-throttle-limit`, as Keap does, and the daemon adopts a lower reported limit:
/// an API key's real 10/s and 240/min would make every bulk test take minutes.) The tests of the
/// limits set them on the fake explicitly; `limits::the_fakes_default_limits_...` runs the
/// daemon's own defaults against the fake's.
pub fn fake_options() -> FakeOptions {
    FakeOptions {
        per_minute_limit: Some(10_000_000),
        documented_limits: false,
        tenant_minute_limit: None,
        ..FakeOptions::default()
    }
}

/// How [`spawn_app_with`] sets up a test: the fake's options, the credential kind, the tables and config.
pub struct Options {
    /// The fake Keap's behaviour ([`fake_options`] by default).
    pub fake: FakeOptions,
    /// Whether an in-process daemon is started before the app is returned.
    pub start_daemon: bool,
    /// OAuth client credentials (and a grant imported before start) instead of an API key.
    pub oauth: bool,
    /// Appended to [`TEST_TOML`]'s values by editing the loaded config.
    pub tweak: fn(&mut Config),
    /// A cluster of the test's own instead of the shared one, for a test that stops and
    /// restarts Postgres (the other tests of the process share theirs).
    pub private_cluster: bool,
    /// A private cluster that also accepts TLS over TCP ([`Cluster::start_tls`]); the app's own
    /// connection and `DATABASE_URL` still use the Unix socket, and a test connects over TLS
    /// with [`TestApp::tcp_conninfo`] and [`TestApp::config_with_database`].
    pub tls: Option<TlsOptions>,
    /// The application's tables, created before `migrate` ([`USERS_DDL`] by default).
    pub users_ddl: &'static str,
    /// TOML appended to [`TEST_TOML`]: `[users]`, `[contact]`, `[tags]` sections of a test.
    pub toml: &'static str,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            fake: fake_options(),
            start_daemon: true,
            oauth: false,
            tweak: |_| {},
            private_cluster: false,
            tls: None,
            users_ddl: USERS_DDL,
            toml: "",
        }
    }
}

impl Options {
    /// The defaults, but no daemon started: the test starts it when its set-up is done.
    pub fn stopped() -> Options {
        Options { start_daemon: false, ..Options::default() }
    }
}

/// An in-process daemon and the way to stop it.
struct RunningDaemon {
    stop: oneshot::Sender<()>,
    handle: JoinHandle<Result<(), RunError>>,
}

/// One test's world: a fresh database migrated for keap-sync, a fake Keap and the daemons started on them.
pub struct TestApp {
    /// The application's own connection (plays the app writing `users`).
    pub db: Client,
    /// The libpq connection string of the test's database.
    pub conninfo: String,
    /// The fake Keap server the daemon's configuration points at.
    pub fake: FakeKeap,
    /// Whether the app uses OAuth (a stored grant) rather than an API key.
    pub oauth: bool,
    tweak: fn(&mut Config),
    toml: &'static str,
    daemons: Vec<RunningDaemon>,
    /// Set with [`Options::private_cluster`]; see [`TestApp::cluster`].
    private_cluster: Option<&'static Cluster>,
}

/// A test app with the default [`Options`]: the users table, an API key and a running daemon.
pub async fn spawn_app() -> TestApp {
    spawn_app_with(Options::default()).await
}

/// A test app set up as `options` say: database, migrations, fake Keap and (unless stopped) a daemon.
pub async fn spawn_app_with(options: Options) -> TestApp {
    init_tracing();
    let private_cluster = (options.private_cluster || options.tls.is_some()).then(|| {
        let started = match options.tls {
            Some(tls) => Cluster::start_tls(tls),
            None => Cluster::start(),
        };
        // Leaked: it lives as long as the test process, like the shared one, and its watchdog
        // removes it when the process ends.
        &*Box::leak(Box::new(
            started.unwrap_or_else(|e| panic!("cannot start a private test PostgreSQL: {e}")),
        ))
    });
    let cluster = private_cluster.unwrap_or_else(cluster);
    let conninfo = cluster.fresh_database("t").await.expect("fresh database");
    let fake = FakeKeap::start(options.fake).await.expect("fake Keap");
    fake.add_api_key(API_KEY);
    let mut db = connect(&conninfo).await;
    db.batch_execute(options.users_ddl).await.expect("users table");
    let mut app = TestApp {
        db: connect(&conninfo).await,
        conninfo,
        fake,
        oauth: options.oauth,
        tweak: options.tweak,
        toml: options.toml,
        daemons: Vec::new(),
        private_cluster,
    };
    keap_sync::migrate(&mut db, &app.config().users).await.expect("migrate");
    if app.oauth {
        let grant = app.fake.issue_grant();
        app.import_grant(&grant).await;
    }
    if options.start_daemon {
        app.start_daemon().await;
    }
    app
}

/// A plain Postgres connection, its connection task spawned; panics if it cannot connect.
pub async fn connect(conninfo: &str) -> Client {
    let (client, connection) = tokio_postgres::connect(conninfo, NoTls).await.expect("connect");
    tokio::spawn(async move {
        let _ = connection.await;
    });
    client
}

impl TestApp {
    /// The environment the daemon sees.
    pub fn env(&self) -> HashMap<String, String> {
        let mut env = HashMap::from([
            ("DATABASE_URL".to_owned(), self.conninfo.clone()),
            ("KEAP_API_URL".to_owned(), self.fake.api_url()),
            ("KEAP_TOKEN_URL".to_owned(), self.fake.token_url()),
            ("KEAP_SYNC_HOOK_PATH".to_owned(), HOOK_PATH.to_owned()),
        ]);
        if self.oauth {
            let opts = FakeOptions::default();
            env.insert("KEAP_CLIENT_ID".to_owned(), opts.client_id);
            env.insert("KEAP_CLIENT_SECRET".to_owned(), opts.client_secret);
        } else {
            env.insert("KEAP_API_KEY".to_owned(), API_KEY.to_owned());
        }
        env
    }

    /// The cluster this app's database lives in.
    pub fn cluster(&self) -> &'static Cluster {
        self.private_cluster.unwrap_or_else(cluster)
    }

    /// Stores a grant as `keap-sync auth import` does. The fake's grant crosses into the
    /// daemon as the token endpoint's JSON, the way a real grant would.
    pub async fn import_grant(&self, grant: &TokenGrant) {
        let json = serde_json::to_string(grant).expect("grant as JSON");
        keap_sync::import_grant(&self.db, &json).await.expect("store grant");
    }

    /// The daemon configuration of this app: the test TOML, its secrets from the environment, then `tweak`.
    pub fn config(&self) -> Config {
        let env = self.env();
        let text = format!("{TEST_TOML}\n{}", self.toml);
        let mut config =
            Config::from_toml(&text, &|k| env.get(k).cloned()).unwrap_or_else(|e| panic!("test config: {e}"));
        (self.tweak)(&mut config);
        config
    }

    /// The configuration of [`TestApp::config`], but with `database` (TOML keys: `url`,
    /// `ca_file`, …) as its `[database]` section instead of `DATABASE_URL`; an error if that
    /// section does not load.
    pub fn config_with_database(&self, database: &str) -> Result<Config, keap_sync::config::ConfigError> {
        let mut env = self.env();
        env.remove("DATABASE_URL");
        let text = format!("[database]\n{database}\n{TEST_TOML}\n{}", self.toml);
        let mut config = Config::from_toml(&text, &|k| env.get(k).cloned())?;
        (self.tweak)(&mut config);
        Ok(config)
    }

    /// This app's database over TCP on a TLS cluster ([`Cluster::tcp_conninfo`]: host
    /// `localhost`, the password, no `sslmode`); panics unless the app has [`Options::tls`].
    pub fn tcp_conninfo(&self) -> String {
        let parsed: tokio_postgres::Config = self.conninfo.parse().expect("the app's conninfo parses");
        let dbname = parsed.get_dbname().expect("the app's conninfo names its database");
        self.cluster().tcp_conninfo(dbname).expect("a TLS cluster: set Options::tls")
    }

    /// Starts one more in-process daemon with [`TestApp::config`].
    pub async fn start_daemon(&mut self) {
        self.start_daemon_with(self.config()).await;
    }

    /// Starts one more in-process daemon (several may run, as several instances would).
    pub async fn start_daemon_with(&mut self, config: Config) {
        self.start_daemon_with_options(config, RunOptions::default()).await;
    }

    /// Starts one more in-process daemon with `config` and run options (a backfill, say).
    #[expect(
        clippy::unused_async,
        reason = "async like the other starts, and only callable inside the Tokio runtime it spawns the daemon on"
    )]
    pub async fn start_daemon_with_options(&mut self, config: Config, options: RunOptions) {
        let (stop, stopped) = oneshot::channel::<()>();
        let handle = tokio::spawn(async move {
            Daemon::build(config, options)
                .await?
                .run(async {
                    let _ = stopped.await;
                })
                .await
        });
        self.daemons.push(RunningDaemon { stop, handle });
    }

    /// Gracefully stops the `index`-th daemon started (0-based) and leaves the others running.
    pub async fn stop_one(&mut self, index: usize) {
        let daemon = self.daemons.remove(index);
        let _ = daemon.stop.send(());
        tokio::time::timeout(Duration::from_secs(30), daemon.handle)
            .await
            .expect("daemon stops within 30 s")
            .expect("daemon task")
            .expect("daemon ran without error");
    }

    /// Inserts `n` users `u1@example.com`, … (first and last names `F1`/`L1`, …), captured as
    /// the application's writes are.
    pub async fn insert_users(&self, n: usize) {
        self.exec(&format!(
            "insert into users (email, first_name, last_name)
             select 'u' || g || '@example.com', 'F' || g, 'L' || g from generate_series(1, {n}) g"
        ))
        .await;
    }

    /// Inserts `n` users with the capture trigger disabled: users that existed before
    /// keap-sync was installed.
    pub async fn insert_preexisting_users(&self, n: usize) {
        self.exec(&format!(
            "alter table users disable trigger keap_sync_capture;
             insert into users (email, first_name, last_name)
             select 'pre' || g || '@example.com', 'F' || g, 'L' || g from generate_series(1, {n}) g;
             alter table users enable always trigger keap_sync_capture;"
        ))
        .await;
    }

    /// Runs the binary with this app's environment and returns its output.
    pub fn run_cli(&self, args: &[&str]) -> std::process::Output {
        Command::new(keap_sync_binary())
            .args(args)
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .envs(self.env())
            .output()
            .expect("run keap-sync")
    }

    /// True while every started daemon is still running.
    pub fn daemons_running(&self) -> bool {
        !self.daemons.is_empty() && self.daemons.iter().all(|d| !d.handle.is_finished())
    }

    /// Graceful stop of every daemon; panics if one failed.
    pub async fn stop_daemon(&mut self) {
        assert!(!self.daemons.is_empty(), "no daemon running");
        while !self.daemons.is_empty() {
            self.stop_one(0).await;
        }
    }

    /// Waits until every change is delivered (the outbox is empty), or panics with the
    /// outbox's contents after `timeout`.
    pub async fn wait_idle_for(&self, timeout: Duration) {
        if wait_until_empty(&self.db, timeout).await {
            return;
        }
        let rows = self
            .db
            .query(
                "select user_key, version, attempts, lease_until is not null, parked_at is not null, last_error
                   from keap_sync.outbox order by user_key limit 10",
                &[],
            )
            .await
            .expect("outbox dump");
        let dump: Vec<String> = rows
            .iter()
            .map(|r| {
                format!(
                    "{} v{} attempts={} leased={} parked={} error={:?}",
                    r.get::<_, String>(0),
                    r.get::<_, i64>(1),
                    r.get::<_, i32>(2),
                    r.get::<_, bool>(3),
                    r.get::<_, bool>(4),
                    r.get::<_, Option<String>>(5)
                )
            })
            .collect();
        panic!("outbox not empty after {timeout:?}:\n{}", dump.join("\n"));
    }

    /// Waits up to 30 s until the change log and the outbox are empty; panics with a dump otherwise.
    pub async fn wait_idle(&self) {
        self.wait_idle_for(Duration::from_secs(30)).await;
    }

    /// Runs `sql` (one or more statements) as the application; panics with the server's message on error.
    pub async fn exec(&self, sql: &str) {
        self.db.batch_execute(sql).await.unwrap_or_else(|e| {
            panic!("{sql}: {e}: {:?}", e.as_db_error().map(|d| (d.message(), d.where_())))
        });
    }

    /// The first column of the one row `sql` returns, as an `i64` (a `count(*)`, typically).
    pub async fn count(&self, sql: &str) -> i64 {
        self.db.query_one(sql, &[]).await.unwrap_or_else(|e| panic!("{sql}: {e}")).get(0)
    }

    /// Folds the whole change log into the outbox, as the running daemon does on every
    /// notification: for tests that look at the outbox while the daemon is stopped. Returns how
    /// many captured changes it moved.
    pub async fn fold(&self) -> i64 {
        let row = self
            .db
            .query_one("select taken, held from keap_sync.fold_changes(2147483647)", &[])
            .await
            .unwrap_or_else(|e| panic!("fold: {e}: {:?}", e.as_db_error().map(|d| d.message())));
        let (taken, held): (i32, i32) = (row.get(0), row.get(1));
        assert_eq!(held, 0, "an open transaction held back some changes from the fold");
        taken.into()
    }

    /// Contact calls the fake has seen (PUT/PATCH/DELETE/GET under /v1/contacts).
    pub fn contact_calls(&self, method: &str) -> usize {
        self.fake.count(|r| r.method == method && r.path.starts_with("/crm/rest/v1/contacts"))
    }

    /// Asserts that Keap holds exactly one contact per user, equal to the user's row.
    pub async fn assert_keap_matches_users(&self) {
        let rows = self
            .db
            .query(
                "select u.id, u.email, u.first_name, u.last_name, m.contact_id
                   from users u left join keap_sync.contact_map m on m.user_key = u.id::text
                  where u.email is not null order by u.id",
                &[],
            )
            .await
            .expect("users");
        let contacts = self.fake.contacts();
        assert_eq!(contacts.len(), rows.len(), "one contact per user with an email");
        let mut seen = std::collections::HashSet::new();
        for row in rows {
            let id: i64 = row.get(0);
            let email: String = row.get(1);
            let contact_id: Option<i64> = row.get(4);
            let contact_id = contact_id.unwrap_or_else(|| panic!("user {id} has no contact mapping"));
            assert!(seen.insert(contact_id), "contact {contact_id} mapped twice");
            let c = self.fake.contact(contact_id).unwrap_or_else(|| panic!("contact {contact_id} missing"));
            assert_eq!(c.email1(), Some(email.as_str()), "user {id} email");
            // A name the user does not have is sent as "" on PATCH (to clear it) and left out on
            // create; either way Keap holds no name.
            let name = |v: Option<String>| v.filter(|s| !s.is_empty());
            assert_eq!(name(c.given_name), name(row.get(2)), "user {id} given name");
            assert_eq!(name(c.family_name), name(row.get(3)), "user {id} family name");
            assert_eq!(self.fake.contacts_with_email(&email).len(), 1, "no duplicate for {email}");
        }
    }

    /// Writes the test configuration (with database and fake URLs) to a file for a child
    /// process; the API key goes through the environment.
    pub fn write_config_file(&self, keap_extra: &str, extra: &str) -> PathBuf {
        let dir =
            std::env::temp_dir().join(format!("keap-sync-test-{}-{}", std::process::id(), rand_suffix()));
        std::fs::create_dir_all(&dir).expect("config dir");
        let path = dir.join("keap-sync.toml");
        let text = format!(
            "{}\n{}\n{}",
            TEST_TOML.replacen(
                "[keap]",
                &format!(
                    "[keap]\napi_url = \"{}\"\ntoken_url = \"{}\"\n{keap_extra}",
                    self.fake.api_url(),
                    self.fake.token_url()
                ),
                1
            ),
            extra,
            self.toml
        );
        std::fs::write(&path, format!("[database]\nurl = \"{}\"\n{text}", self.conninfo))
            .expect("write config");
        path
    }

    /// Starts `keap-sync run` as a child process. Killed when the guard drops.
    pub fn spawn_process(&self, config: &std::path::Path) -> ChildDaemon {
        self.spawn_command(config, &["run"])
    }

    /// Starts `keap-sync <args>` as a child process. Killed when the guard drops.
    pub fn spawn_command(&self, config: &std::path::Path, args: &[&str]) -> ChildDaemon {
        let log = config.with_extension(format!("log.{}", rand_suffix()));
        let stderr = std::fs::File::create(&log).expect("log file");
        let child = Command::new(keap_sync_binary())
            .args(["--config", config.to_str().expect("utf-8 path")])
            .args(args)
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .envs(self.env())
            .env("KEAP_SYNC_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn()
            .expect("spawn keap-sync");
        ChildDaemon { child, log }
    }
}

impl Drop for TestApp {
    fn drop(&mut self) {
        for d in self.daemons.drain(..) {
            d.handle.abort();
        }
    }
}

/// A `keap-sync run` child process; SIGKILLed on drop so a failing test leaves nothing behind.
pub struct ChildDaemon {
    /// The `keap-sync run` process.
    pub child: Child,
    /// The file its standard output and error go to.
    pub log: PathBuf,
}

impl ChildDaemon {
    /// SIGKILL: no chance to release claims or finish calls.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Everything the child has logged so far (empty if the file cannot be read).
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for ChildDaemon {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A number unlikely to repeat within the process, to make names (databases, roles) unique.
pub fn rand_suffix() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos() as u64)
        .unwrap_or(0);
    t ^ (N.fetch_add(1, Ordering::Relaxed) << 32)
}

/// Polls `condition` every 10 ms until it holds or `timeout` passes; panics with `what`.
pub async fn eventually<F, Fut>(timeout: Duration, what: &str, mut condition: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if condition().await {
            return;
        }
        assert!(tokio::time::Instant::now() < deadline, "timed out after {timeout:?} waiting for {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Waits until the change log and the outbox are empty (every change folded, then delivered or
/// skipped; a parked change keeps the outbox non-empty), looking every 20 ms. The outbox row
/// outlives its delivery, so "empty" also means "nothing in flight". Returns false if `timeout`
/// passes first.
pub async fn wait_until_empty(db: &Client, timeout: Duration) -> bool {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let pending: i64 = db
            .query_one(
                "select (select count(*) from keap_sync.outbox) + (select count(*) from keap_sync.change)",
                &[],
            )
            .await
            .expect("outbox query")
            .get(0);
        if pending == 0 {
            return true;
        }
        if tokio::time::Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The `keap-sync` binary cargo built beside the running test or benchmark: tests run from
/// `target/<profile>/deps/`, and cargo builds a package's binaries before its integration tests
/// and benches.
pub fn keap_sync_binary() -> PathBuf {
    let exe = std::env::current_exe().expect("the test's own path");
    let profile_dir = exe.parent().and_then(|deps| deps.parent()).expect("target/<profile>/deps");
    let bin = profile_dir.join("keap-sync");
    assert!(bin.exists(), "{} is missing: run the tests with cargo, which builds it", bin.display());
    bin
}
