//! What each change costs, in one table: capture, drain, latency, coalescing, crash recovery, and
//! a reconcile of a million users.
//!
//! ```sh
//! cargo bench --bench perf                        # the full run (about 2 minutes on 2 cores, and
//!                                                 # 1–2 more for the reconcile of 1,000,000 users)
//! cargo bench --bench perf -- --quick             # a smoke run: 2,000 changes, fewer rows and commits
//! cargo bench --bench perf -- --only drain,kill   # some scenarios: capture drain latency coalesce kill reconcile
//! cargo bench --bench perf -- --changes 50000     # a bigger drain backlog (also used by latency and kill)
//! cargo bench --bench perf -- --only reconcile --users 1000000   # the reconcile alone (its default size)
//! cargo bench --bench perf -- --only reconcile --unlinked   # … with no user linked yet (before a first sync)
//! cargo bench --bench perf -- --only reconcile --unlinked --json   # … its report printed as JSON
//! cargo bench --bench perf -- --profile DIR       # also: pg_stat_statements and `perf record -g` of each
//!                                                 # drain's daemon and of the machine into DIR (the
//!                                                 # figures then include the profilers' overhead)
//! ```
//!
//! On a throwaway PostgreSQL cluster (Unix socket) and the fake Keap (127.0.0.1), with the daemon
//! as a child process (`keap-sync run`, the release build) so that its CPU (utime + stime of
//! `/proc/<pid>/stat`) and peak RSS (`VmHWM`) are its own. Postgres CPU is the sum over the
//! cluster's processes (`/proc/<pid>/stat`, the postmaster's children) between two readings; in
//! the drains, less the bench's own connection that looks every 5 ms whether the outbox is
//! empty yet (printed apart: a look walks the outbox's dead rows, and it is the bench's cost).
//! Limits are lifted unless stated: `[limits] per_second = 1000000`, `[delivery] concurrency =
//! 32`, `settle_ms = 0`; the fake enforces no limit and reports per-minute and daily limits far
//! above the run's calls.
//!
//! Scenarios, in order:
//! - **capture** (no daemon): insert rows/s into `users` without and with the capture triggers,
//!   in 100-row statements (one transaction each) and single-row autocommit statements, the two
//!   settings interleaved in rounds (`bench::insert_rates`). The fold of the change log into the
//!   outbox is the daemon's side of capture and is inside the drain figures.
//! - **drain**: `--changes` users (20,000) inserted while no daemon runs, then the daemon is
//!   started and the time from its start to an empty change log and outbox is taken (first sync: a lookup by
//!   email and a create per user); then every user is updated in one statement and drained
//!   again (one PATCH each); then Keap's contacts are listed into the mirror and `--changes`
//!   new users drained (first sync by the mirror: one create per user, lookups answered by the
//!   mirror). Deliveries/s, calls per user, daemon and Postgres CPU per delivery.
//! - **latency**: 500 single-row commits (updates of synced users) at 50/s to a running daemon;
//!   commit (as the client saw it return) → `keap_sync.contact_map.synced_at`, p50/p95/p99/max.
//! - **coalesce**: Keap's OAuth limits (the daemon with OAuth credentials and no `[limits]`: 25/s,
//!   1,500/min; the fake enforcing 25 per rolling second and 1,500 per rolling minute). 100 users
//!   are synced, then updated 50 times each (5,000 single-row autocommit updates, round-robin);
//!   the Keap calls those updates cost, 429s, and how many users Keap holds right at the end.
//! - **kill**: every user updated while no daemon runs; the daemon is started, SIGKILLed once a
//!   quarter of the changes are delivered, and a new one is started as soon as the fake has seen
//!   the killed one's connections close: the time from that start to its first Keap request,
//!   and the users whose final row Keap does not hold once the outbox is empty (lost changes).
//! - **reconcile**: `--users` users (1,000,000; 2,000 with `--quick`) after a prior sync,
//!   against a fake holding as many contacts, then `keap-sync reconcile` (the release build,
//!   as a child process, so its peak RSS is its own and not the fake's): wall time, list calls,
//!   the report's counts and the reconcile's peak RSS and CPU (the "daemon" columns). Users are
//!   inserted with one `generate_series` statement with capture off (a prior sync left nothing
//!   queued); the contacts are put in the fake directly (`FakeKeap::seed_contacts`, no HTTP);
//!   the links are written into `keap_sync.contact_map` as a delivery records them. Of every
//!   100 users, 99 are linked to a contact holding their email and names, and one has no
//!   contact (its would-be contact holds another address: a lead of Keap's own); one user in
//!   1,000 has its given name edited in Keap. So the report must count 98.9 % in sync, 1 % no
//!   contact and 0.1 % differing; the bench checks the in-sync count, and that `preview` plans
//!   no call for users 1 and 2 (so the links are what a delivery records). With `--unlinked`
//!   no user is linked (as before a first sync or backfill): every user is reported, 99 % as
//!   unlinked and 1 % as no contact, and none in sync. Its peak RSS is the `ru_maxrss` that
//!   GNU time (`/usr/bin/time`) reports for it, to its last moment (`bench::run_to_end` says
//!   why; `VmHWM` polled every 5 ms is printed beside it, and is the fallback without GNU
//!   time); its Postgres CPU includes its own backends, which end with it (the postmaster's
//!   reaped children's CPU).
//!
//! Every wait polls a condition with a deadline. The table is printed as Markdown, with the
//! date, the load average before and after, and the number of cores; README.md's "Benchmarks"
//! holds the latest run.

#![allow(
    clippy::disallowed_methods,
    reason = "tests, benches and the demo own the servers and daemons they spawn, which end with them"
)]
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime};

use keap_sync_testkit::bench::{self, ChildDaemon, ServerCpu};
use keap_sync_testkit::fake::{ContactWrite, EmailAddress, EmailField, EmailFilter, FakeKeap, FakeOptions};
use keap_sync_testkit::pg::Cluster;
use tokio_postgres::Client;

const API_KEY: &str = "bench-api-key";
const BINARY: &str = env!("CARGO_BIN_EXE_keap-sync");
const LIFTED: &str = "[delivery]\nconcurrency = 32\nsettle_ms = 0\n\n\
    [limits]\nper_second = 1000000\nper_minute = 60000000\nper_day = 1000000000\n";
const OAUTH_LIMITS: &str = "[delivery]\nconcurrency = 32\nsettle_ms = 0\n";

struct Args {
    changes: i64,
    capture_rows: i64,
    commits: i64,
    users: i64,
    unlinked: bool,
    json: bool,
    only: Vec<String>,
    profile: Option<PathBuf>,
}

impl Args {
    fn parse() -> Args {
        let quick = bench::flag("--quick");
        let only = bench::arg_text("--only")
            .map(|s| s.split(',').map(str::to_owned).collect())
            .unwrap_or_else(|| {
                ["capture", "drain", "latency", "coalesce", "kill", "reconcile"].map(String::from).to_vec()
            });
        Args {
            changes: bench::arg("--changes", if quick { 2_000 } else { 20_000 }),
            capture_rows: bench::arg("--rows", if quick { 5_000 } else { 20_000 }),
            commits: bench::arg("--commits", if quick { 100 } else { 500 }),
            users: bench::arg("--users", if quick { 2_000 } else { 1_000_000 }),
            unlinked: bench::flag("--unlinked"),
            json: bench::flag("--json"),
            only,
            profile: bench::arg_text("--profile").map(PathBuf::from),
        }
    }
    fn runs(&self, scenario: &str) -> bool {
        self.only.iter().any(|s| s == scenario)
    }
}

/// One line of the table.
struct Row {
    scenario: String,
    result: String,
    target: &'static str,
    daemon_ms: Option<f64>,
    pg_ms: Option<f64>,
    rss_kib: Option<u64>,
}

/// What a scenario's database and fake are, for spawning daemons against them.
struct Env {
    db: Client,
    conninfo: String,
    fake: FakeKeap,
    oauth: bool,
    dir: PathBuf,
}

impl Env {
    async fn new(cluster: &Cluster, name: &str, fake: FakeOptions, oauth: bool, profile: bool) -> Env {
        let conninfo = cluster.create_database(name).await.expect("database");
        let fake = FakeKeap::start(fake).await.expect("fake Keap");
        fake.add_api_key(API_KEY);
        let mut db = bench::connect(&conninfo).await;
        db.batch_execute(keap_sync_testkit::app::USERS_DDL).await.expect("users table");
        let dir = std::env::temp_dir().join(format!("keap-sync-perf-{}-{name}", std::process::id()));
        let env = Env { db: bench::connect(&conninfo).await, conninfo, fake, oauth, dir };
        let config =
            keap_sync::config::Config::from_toml("", &|k| env.vars().get(k).cloned()).expect("config");
        keap_sync::migrate(&mut db, &config.users).await.expect("migrate");
        if profile {
            env.exec("create extension pg_stat_statements").await;
        }
        if oauth {
            let grant = serde_json::to_string(&env.fake.issue_grant()).expect("grant");
            keap_sync::import_grant(&env.db, &grant).await.expect("import grant");
        }
        env
    }

    fn vars(&self) -> HashMap<String, String> {
        let mut vars = HashMap::from([
            ("DATABASE_URL".to_owned(), self.conninfo.clone()),
            ("KEAP_API_URL".to_owned(), self.fake.api_url()),
            ("KEAP_TOKEN_URL".to_owned(), self.fake.token_url()),
        ]);
        if self.oauth {
            let opts = FakeOptions::default();
            vars.insert("KEAP_CLIENT_ID".to_owned(), opts.client_id);
            vars.insert("KEAP_CLIENT_SECRET".to_owned(), opts.client_secret);
        } else {
            vars.insert("KEAP_API_KEY".to_owned(), API_KEY.to_owned());
        }
        vars
    }

    fn spawn(&self, toml: &str) -> ChildDaemon {
        ChildDaemon::spawn(Path::new(BINARY), &self.dir, toml, &self.vars())
    }

    async fn exec(&self, sql: &str) {
        self.db.batch_execute(sql).await.unwrap_or_else(|e| panic!("{sql}: {e}"));
    }

    async fn count(&self, sql: &str) -> i64 {
        self.db.query_one(sql, &[]).await.unwrap_or_else(|e| panic!("{sql}: {e}")).get(0)
    }

    fn contact_calls(&self) -> usize {
        self.fake.count(|r| r.path.starts_with("/crm/rest/v1/contacts"))
    }

    /// Calls to the v2 listing (`GET /v2/contacts`): the mirror's.
    fn list_calls(&self) -> usize {
        self.fake.count(|r| r.path.ends_with("/v2/contacts"))
    }
}

/// The fake for a run that measures keap-sync, not Keap's limits. Limits the fake does not
/// enforce are still reported (an API key's 30,000/day), and the daemon pauses when the
/// reported day is spent: report limits far above the run's calls. No spike arrest or tenant
/// limit. The lookup by email matches whole addresses: the strictest reading (part of an
/// address) only adds candidates that keap-sync filters out, none of which the bench's
/// addresses make, and in the fake it is a scan of every contact per lookup: in a first sync
/// of 20,000 users, 0.49 ms of the fake's CPU per delivery (`--profile`: `to_lowercase` under
/// the fake's filter, 21% of the machine), taken from the daemon and Postgres on 2 cores.
fn lifted_fake() -> FakeOptions {
    FakeOptions {
        per_minute_limit: Some(100_000_000),
        daily_quota: Some(1_000_000_000),
        documented_limits: false,
        tenant_minute_limit: None,
        email_filter: EmailFilter::Exact,
        ..FakeOptions::default()
    }
}

fn main() {
    let args = Args::parse();
    let rt = tokio::runtime::Runtime::new().expect("tokio runtime");
    rt.block_on(run(&args));
}

async fn run(args: &Args) {
    let load_before = bench::load_average();
    let mut cluster = bench::start_cluster().await;
    if let Some(dir) = &args.profile {
        cluster = bench::enable_pg_stat_statements(cluster).await;
        std::fs::create_dir_all(dir).expect("profile dir");
    }
    let mut rows = Vec::new();
    if args.runs("capture") {
        rows.extend(capture(&cluster, args).await);
    }
    if args.runs("drain") || args.runs("latency") || args.runs("kill") {
        let fake = lifted_fake();
        let env = Env::new(&cluster, "drain", fake, false, args.profile.is_some()).await;
        let n = args.changes;
        env.exec(&format!(
            "insert into users (email, first_name, last_name)
             select 'user' || g || '@example.com', 'First' || g, 'Last' || g from generate_series(1, {n}) g"
        ))
        .await;
        rows.push(
            drain(&cluster, &env, args, "drain-first-sync", format!("drain, first sync of {n} users")).await,
        );
        if args.runs("drain") {
            env.exec("update users set last_name = last_name || ' 2'").await;
            rows.push(
                drain(&cluster, &env, args, "drain-update", format!("drain, {n} updates (PATCH)")).await,
            );
            rows.push(first_sync_by_the_mirror(&cluster, &env, args).await);
        }
        if args.runs("latency") {
            rows.push(latency(&cluster, &env, args).await);
        }
        if args.runs("kill") {
            rows.push(kill(&cluster, &env, args).await);
        }
    }
    if args.runs("coalesce") {
        rows.push(coalesce(&cluster, args).await);
    }
    if args.runs("reconcile") {
        rows.push(reconcile(&cluster, args).await);
    }
    print_table(&rows, args, &load_before);
}

/// Insert rates without and with capture, no daemon running.
async fn capture(cluster: &Cluster, args: &Args) -> Vec<Row> {
    let conninfo = cluster.create_database("capture").await.expect("database");
    let env = |k: &str| match k {
        "DATABASE_URL" => Some(conninfo.clone()),
        "KEAP_API_KEY" => Some("unused".to_owned()),
        _ => None,
    };
    let config = keap_sync::config::Config::from_env(&env).expect("config");
    let mut client = bench::connect(&conninfo).await;
    client.batch_execute(keap_sync_testkit::app::USERS_DDL).await.expect("users");
    keap_sync::migrate(&mut client, &config.users).await.expect("migrate");
    let rows = args.capture_rows;
    let rates = bench::insert_rates(&client, rows, &["", bench::ENABLE_CAPTURE]).await;
    let (none, with) = (rates[0], rates[1]);
    let line = |what: &str, none: f64, with: f64, target| Row {
        scenario: format!("capture, {what} ({rows} rows)"),
        result: format!(
            "{none:.0} rows/s without capture, {with:.0} with ({:.1} %, overhead {:.1} %)",
            100.0 * with / none,
            100.0 * (none / with - 1.0)
        ),
        target,
        daemon_ms: None,
        pg_ms: None,
        rss_kib: None,
    };
    vec![
        line("100-row transactions", none.0, with.0, "with ≥ 50 % of without"),
        line("single-row autocommit", none.1, with.1, "overhead ≤ 10 %"),
    ]
}

/// `perf record -g` of a daemon (DIR/<name>.perf.data) and of the whole machine
/// (DIR/<name>.all.perf.data: the daemon's server processes start after the record does; read
/// them with `perf report --comms postgres`), when profiling.
struct Perf(Vec<std::process::Child>);

impl Perf {
    fn attach(args: &Args, daemon: &ChildDaemon, name: &str) -> Perf {
        let Some(dir) = &args.profile else { return Perf(Vec::new()) };
        let record = |target: &[&str], file: String| {
            std::process::Command::new("perf")
                .args(["record", "-g", "-F", "999"])
                .args(target)
                .arg("-o")
                .arg(dir.join(file))
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .spawn()
                .ok()
        };
        Perf(
            [
                record(&["-p", &daemon.pid()], format!("{name}.perf.data")),
                record(&["-a"], format!("{name}.all.perf.data")),
            ]
            .into_iter()
            .flatten()
            .collect(),
        )
    }
    async fn finish(self) {
        for mut child in self.0 {
            let _ = std::process::Command::new("kill").args(["-INT", &child.id().to_string()]).status();
            let deadline = Instant::now() + Duration::from_secs(30);
            while child.try_wait().ok().flatten().is_none() && Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    }
}

/// Writes the statements of the scenario's database to DIR/<name>.statements.txt and resets them.
async fn save_statements(env: &Env, args: &Args, name: &str) {
    let Some(dir) = &args.profile else { return };
    let mut text = format!("{:>8} {:>12} {:>10} {:>9}  query\n", "calls", "total ms", "mean ms", "rows");
    for s in bench::statements(&env.db).await {
        text.push_str(&format!(
            "{:>8} {:>12.1} {:>10.4} {:>9}  {}\n",
            s.calls,
            s.total_ms,
            s.mean_ms,
            s.rows,
            s.query.chars().take(400).collect::<String>()
        ));
    }
    std::fs::write(dir.join(format!("{name}.statements.txt")), text).expect("write statements");
}

async fn reset_statements(env: &Env, args: &Args) {
    if args.profile.is_some() {
        env.exec("select pg_stat_statements_reset()").await;
    }
}

/// Starts a daemon on the queued backlog and times it to an empty outbox.
async fn drain(cluster: &Cluster, env: &Env, args: &Args, name: &str, scenario: String) -> Row {
    let queued = env.count(bench::PENDING_USERS).await;
    reset_statements(env, args).await;
    let calls_before = env.contact_calls();
    let lists_before = env.list_calls();
    let looker = bench::backend_pid(&env.db).await;
    let (pg_before, bench_before) = (ServerCpu::read(cluster), bench::self_cpu_secs());
    let daemon = env.spawn(LIFTED);
    let perf = Perf::attach(args, &daemon, name);
    let drained = bench::wait_outbox_empty(&env.db, Duration::from_secs(600)).await;
    let took = daemon.started.elapsed().as_secs_f64();
    let pg_after = ServerCpu::read(cluster);
    let (daemon_cpu, pg_cpu) = (daemon.cpu_secs(), pg_after.since_except(&pg_before, &looker));
    let looking_cpu = pg_after.since(&pg_before) - pg_cpu;
    let bench_cpu = bench::self_cpu_secs() - bench_before;
    let rss = daemon.peak_rss_kib();
    perf.finish().await;
    save_statements(env, args, name).await;
    let calls = env.contact_calls() - calls_before;
    let lists = env.list_calls() - lists_before;
    assert!(daemon.stop(Duration::from_secs(30)).await, "the daemon stops cleanly");
    let n = queued as f64;
    Row {
        scenario,
        result: format!(
            "{:.0} deliveries/s ({queued} in {took:.2} s from the daemon's start{}; {calls} contact calls and \
             {lists} list calls, {:.4} calls per user; bench + fake Keap CPU {:.3} ms per delivery, the bench's looks at the outbox {:.3} ms of \
             Postgres CPU per delivery, not counted)",
            n / took,
            if drained { "" } else { ", TIMED OUT" },
            (calls + lists) as f64 / n,
            bench_cpu * 1000.0 / n,
            looking_cpu * 1000.0 / n
        ),
        target: "≥ 3,000/s; daemon + Postgres ≤ 0.3 ms",
        daemon_ms: Some(daemon_cpu * 1000.0 / n),
        pg_ms: Some(pg_cpu * 1000.0 / n),
        rss_kib: Some(rss),
    }
}

/// `--changes` new users after Keap's contacts were listed into the mirror (as a backfill
/// does first): each user's lookup is answered by the mirror, so a first sync costs one call
/// per user plus the listings of Keap's latest changes.
async fn first_sync_by_the_mirror(cluster: &Cluster, env: &Env, args: &Args) -> Row {
    let config =
        keap_sync::config::Config::from_toml(LIFTED, &|k| env.vars().get(k).cloned()).expect("config");
    let listed = keap_sync::refresh_mirror(&config).await.expect("the listing");
    let n = args.changes;
    env.exec(&format!(
        "insert into users (email, first_name, last_name)
         select 'new' || g || '@example.com', 'First' || g, 'Last' || g from generate_series(1, {n}) g"
    ))
    .await;
    let scenario = format!(
        "drain, first sync of {n} new users by the mirror ({} contacts listed first)",
        listed.contacts
    );
    drain(cluster, env, args, "drain-first-sync-mirror", scenario).await
}

/// Single-row commits at 50/s to a running daemon: commit → synced_at.
async fn latency(cluster: &Cluster, env: &Env, args: &Args) -> Row {
    let commits = args.commits.min(args.changes);
    let daemon = env.spawn(LIFTED);
    assert!(daemon.wait_active(&env.db, Duration::from_secs(30)).await, "the daemon starts");
    assert!(bench::wait_outbox_empty(&env.db, Duration::from_secs(60)).await, "nothing queued");
    let (pg_before, daemon_before) = (ServerCpu::read(cluster), daemon.cpu_secs());
    let update = env.db.prepare("update users set first_name = $1 where id = $2").await.expect("prepare");
    let start = tokio::time::Instant::now();
    let mut committed = Vec::with_capacity(commits as usize);
    for i in 0..commits {
        // Pacing, not synchronisation: one commit every 20 ms.
        tokio::time::sleep_until(start + Duration::from_millis(20) * i as u32).await;
        env.db.execute(&update, &[&format!("Latency{i}"), &(i + 1)]).await.expect("update");
        committed.push(((i + 1).to_string(), SystemTime::now()));
    }
    let drained = bench::wait_outbox_empty(&env.db, Duration::from_secs(60)).await;
    let (daemon_cpu, pg_cpu) =
        (daemon.cpu_secs() - daemon_before, ServerCpu::read(cluster).since(&pg_before));
    let rss = daemon.peak_rss_kib();
    assert!(daemon.stop(Duration::from_secs(30)).await, "the daemon stops cleanly");
    let ms = bench::delivery_latencies_ms(&env.db, &committed).await;
    let q = |p| bench::quantile(&ms, p);
    Row {
        scenario: format!("latency, {commits} single-row commits at 50/s"),
        result: format!(
            "p50 {:.2} ms, p95 {:.2} ms, p99 {:.2} ms, max {:.2} ms ({} of {commits} measured{})",
            q(0.50),
            q(0.95),
            q(0.99),
            q(1.0),
            ms.len(),
            if drained { "" } else { ", TIMED OUT" }
        ),
        target: "p99 ≤ 5 ms",
        daemon_ms: Some(daemon_cpu * 1000.0 / commits as f64),
        pg_ms: Some(pg_cpu * 1000.0 / commits as f64),
        rss_kib: Some(rss),
    }
}

/// `kill -9` a quarter into a drain, restart at once: time to the first new call, and losses.
async fn kill(cluster: &Cluster, env: &Env, args: &Args) -> Row {
    let _ = cluster;
    let n = args.changes;
    env.exec("update users set first_name = first_name || ' 3'").await;
    let calls_before = env.contact_calls();
    let mut first = env.spawn(LIFTED);
    let quarter = (n / 4) as usize;
    let reached = bench::poll_until(Duration::from_secs(300), || async {
        env.contact_calls() - calls_before >= quarter
    })
    .await;
    assert!(reached, "a quarter of the drain delivered");
    let first_rss = first.peak_rss_kib();
    first.kill();
    let killed = Instant::now();
    let orphaned = env.count("select count(*) from keap_sync.outbox where leased_by is not null").await;
    let pending = env.count(bench::PENDING_USERS).await;
    // What the killed daemon had sent is recorded once the fake has read its connections to the end.
    let closed =
        bench::poll_until(Duration::from_secs(10), || async { env.fake.open_connections() == 0 }).await;
    let seen = env.fake.count(|_| true);
    let second = env.spawn(LIFTED);
    let restarted = Instant::now();
    let resumed =
        bench::poll_until(Duration::from_secs(60), || async { env.fake.count(|_| true) > seen }).await;
    let first_call = env.fake.requests().get(seen).map(|r| r.at.saturating_duration_since(restarted));
    let drained = bench::wait_outbox_empty(&env.db, Duration::from_secs(600)).await;
    let rest = restarted.elapsed().as_secs_f64();
    let rss = second.peak_rss_kib().max(first_rss);
    assert!(second.stop(Duration::from_secs(30)).await, "the daemon stops cleanly");
    let (right, total) = bench::users_right_in_keap(&env.db, &env.fake).await;
    Row {
        scenario: format!("kill -9 during a drain of {n} updates"),
        result: format!(
            "first call {} after the restart (restart {:.1} ms after the kill); {} changes lost \
             ({right}/{total} users right in Keap{}); killed with {pending} queued, {orphaned} claimed; \
             the rest drained in {rest:.2} s{}",
            match (resumed, first_call) {
                (true, Some(d)) => format!("{:.1} ms", d.as_secs_f64() * 1e3),
                _ => "NEVER (timed out)".to_owned(),
            },
            restarted.duration_since(killed).as_secs_f64() * 1e3,
            total - right,
            if drained { "" } else { ", outbox NOT EMPTY" },
            if closed { "" } else { " (the fake still had connections open)" },
        ),
        target: "resumed ≤ 1 s; 0 lost",
        daemon_ms: None,
        pg_ms: None,
        rss_kib: Some(rss),
    }
}

/// Keap's OAuth limits: 100 users updated 50 times each.
async fn coalesce(cluster: &Cluster, args: &Args) -> Row {
    let fake =
        FakeOptions { per_second_limit: Some(25), per_minute_limit: Some(1_500), ..FakeOptions::default() };
    let env = Env::new(cluster, "coalesce", fake, true, args.profile.is_some()).await;
    let (users, rounds) = (100, 50);
    env.exec(&format!(
        "insert into users (email, first_name, last_name)
         select 'c' || g || '@example.com', 'First' || g, 'Last' || g from generate_series(1, {users}) g"
    ))
    .await;
    let daemon = env.spawn(OAUTH_LIMITS);
    assert!(bench::wait_outbox_empty(&env.db, Duration::from_secs(120)).await, "first sync");
    let (calls_before, throttled_before) = (env.contact_calls(), env.fake.throttled_count());
    let (pg_before, daemon_before) = (ServerCpu::read(cluster), daemon.cpu_secs());
    let update = env.db.prepare("update users set first_name = $1 where id = $2").await.expect("prepare");
    let started = Instant::now();
    for round in 0..rounds {
        for user in 1..=users {
            env.db.execute(&update, &[&format!("Round{round}"), &(user as i64)]).await.expect("update");
        }
    }
    let written = started.elapsed().as_secs_f64();
    let drained = bench::wait_outbox_empty(&env.db, Duration::from_secs(300)).await;
    let took = started.elapsed().as_secs_f64();
    let (daemon_cpu, pg_cpu) =
        (daemon.cpu_secs() - daemon_before, ServerCpu::read(cluster).since(&pg_before));
    let rss = daemon.peak_rss_kib();
    assert!(daemon.stop(Duration::from_secs(30)).await, "the daemon stops cleanly");
    let calls = env.contact_calls() - calls_before;
    let (right, total) = bench::users_right_in_keap(&env.db, &env.fake).await;
    let updates = users * rounds;
    Row {
        scenario: format!("coalescing, OAuth limits (25/s, 1,500/min), {users} users × {rounds} updates"),
        result: format!(
            "{updates} updates (written in {written:.2} s) → {calls} Keap calls, {} answered 429; \
             {right}/{total} users right; all synced {took:.2} s after the first update{}",
            env.fake.throttled_count() - throttled_before,
            if drained { "" } else { ", TIMED OUT" }
        ),
        target: "100/100 right",
        daemon_ms: Some(daemon_cpu * 1000.0 / updates as f64),
        pg_ms: Some(pg_cpu * 1000.0 / updates as f64),
        rss_kib: Some(rss),
    }
}

/// `keap-sync reconcile` of `--users` users after a prior sync, against as many contacts.
async fn reconcile(cluster: &Cluster, args: &Args) -> Row {
    let n = args.users;
    let fake = lifted_fake();
    let env = Env::new(cluster, "reconcile", fake, false, args.profile.is_some()).await;
    // A prior sync delivered every change: nothing is in the change log or the outbox.
    env.exec("alter table users disable trigger user").await;
    env.exec(&format!(
        "insert into users (email, first_name, last_name)
         select 'user' || g || '@example.com', 'First' || g, 'Last' || g from generate_series(1, {n}) g"
    ))
    .await;
    env.exec(bench::ENABLE_CAPTURE).await;
    let ids = env.fake.seed_contacts((1..=n).map(|i| {
        let (email, given) = match (i % 100, i % 1000) {
            (0, _) => (format!("lead{i}@example.com"), format!("Lead{i}")),
            (_, 1) => (format!("user{i}@example.com"), format!("Edited in Keap {i}")),
            _ => (format!("user{i}@example.com"), format!("First{i}")),
        };
        ContactWrite {
            given_name: Some(given),
            family_name: Some(format!("Last{i}")),
            email_addresses: Some(vec![EmailAddress { email: Some(email), field: EmailField::Email1 }]),
            duplicate_option: None,
        }
    }));
    // As autovacuum would have by now: statistics and a visibility map for the planner.
    env.exec("vacuum analyze users").await;
    if args.unlinked {
        return run_reconcile(cluster, &env, args, 0).await;
    }
    // User i is contact `ids.start + i - 1`, linked as a delivery records a link: `sent` holds
    // a hash of each owned value as Keap took it (`mapping::held::hash`: the first 8 bytes of
    // SHA-256 of "s" and the value, the email lower-cased), `fingerprint` the payload's
    // (`ContactPayload::fingerprint`: SHA-256 over each path's length as 8 bytes little-endian,
    // the path and its hash, in path order).
    env.exec(&format!(
        "insert into keap_sync.contact_map (user_key, contact_id, fingerprint, sent)
         select u.id::text, {first} + u.id - 1,
                left(encode(sha256('\\x0b00000000000000'::bytea || convert_to('family_name' || h.family, 'UTF8')
                                || '\\x0a00000000000000'::bytea || convert_to('given_name' || h.given, 'UTF8')
                                || '\\x1600000000000000'::bytea || convert_to('email_addresses.EMAIL1' || h.email, 'UTF8')),
                            'hex'), 32),
                jsonb_build_object('v', 2, 'tags', '[]'::jsonb, 'f', jsonb_build_object(
                    'email_addresses.EMAIL1', h.email, 'given_name', h.given, 'family_name', h.family))
           from users u,
                lateral (select left(encode(sha256(convert_to('s' || lower(u.email), 'UTF8')), 'hex'), 16) as email,
                                left(encode(sha256(convert_to('s' || u.first_name, 'UTF8')), 'hex'), 16) as given,
                                left(encode(sha256(convert_to('s' || u.last_name, 'UTF8')), 'hex'), 16) as family) h
          where u.id % 100 <> 0",
        first = ids.start
    ))
    .await;
    env.exec("vacuum analyze keap_sync.contact_map").await;
    // The links are what a delivery leaves: a delivery of users 1 (edited in Keap since) and 2
    // would send nothing (`preview` compares the row with `sent`, as delivery does).
    let config =
        keap_sync::config::Config::from_toml(LIFTED, &|k| env.vars().get(k).cloned()).expect("config");
    let keys = vec!["1".to_owned(), "2".to_owned()];
    let plans = keap_sync::preview(&config, &keap_sync::Selection::Keys(keys)).await.expect("preview");
    assert!(
        plans.iter().all(|p| p.action == "nothing" && p.calls.is_empty()) && plans.len() == 2,
        "a seeded link is not what a delivery records: {plans:#?}"
    );
    run_reconcile(cluster, &env, args, n - n / 100 - (n + 999) / 1000).await
}

/// Runs `keap-sync reconcile` on `env` as a child process and checks the report's in-sync count.
async fn run_reconcile(cluster: &Cluster, env: &Env, args: &Args, expected_in_sync: i64) -> Row {
    let n = args.users;
    reset_statements(env, args).await;
    std::fs::create_dir_all(&env.dir).expect("bench dir");
    let config = env.dir.join("reconcile.toml");
    std::fs::write(&config, LIFTED).expect("write config");
    let mut args_ = vec!["--config", config.to_str().expect("utf-8 path"), "reconcile"];
    if args.json {
        args_.push("--json");
    }
    let (pg_before, reaped_before) = (ServerCpu::read(cluster), bench::reaped_server_cpu_secs(cluster));
    let run =
        bench::run_to_end(Path::new(BINARY), &args_, &env.dir, &env.vars(), Duration::from_secs(3600)).await;
    assert!(
        run.success,
        "reconcile failed; its log: {}",
        std::fs::read_to_string(&run.log).unwrap_or_default()
    );
    // The reconcile's own backends end with it: their CPU is in what the postmaster reaped,
    // once they have gone.
    let others = "select count(*) from pg_stat_activity
                   where datname = current_database() and backend_type = 'client backend' and pid <> pg_backend_pid()";
    let gone = bench::poll_until(Duration::from_secs(10), || async { env.count(others).await == 0 }).await;
    assert!(gone, "the reconcile's connections close");
    let pg_cpu =
        ServerCpu::read(cluster).since(&pg_before) + bench::reaped_server_cpu_secs(cluster) - reaped_before;
    save_statements(env, args, "reconcile").await;
    let listed: Vec<Instant> =
        env.fake.requests().into_iter().filter(|r| r.path == "/crm/rest/v2/contacts").map(|r| r.at).collect();
    let span = match (listed.first(), listed.last()) {
        (Some(a), Some(b)) => b.duration_since(*a).as_secs_f64(),
        _ => 0.0,
    };
    // The last line: "reconcile: N users, M in sync, K not: K1 unlinked, K2 no contact" (the
    // first names the listing, and each user not in sync has a line between); with --json,
    // the document's end: `"users": N, "in_sync": M, "queued": 0, "counts": {…}}`.
    let summary = run.stdout.lines().next_back().unwrap_or_default().to_owned();
    let words: Vec<&str> = summary.split([' ', ',', ':', '"', '{', '}']).filter(|w| !w.is_empty()).collect();
    let number = |at: usize| words.get(at).and_then(|w| w.parse::<i64>().ok());
    let after = |word: &str| words.iter().position(|w| *w == word).and_then(|at| number(at + 1));
    let before = |word: &str| words.iter().position(|w| *w == word).and_then(|at| number(at.checked_sub(1)?));
    let (users, in_sync, not) = match args.json {
        true => {
            let counts = words.iter().skip_while(|w| **w != "counts").filter_map(|w| w.parse::<i64>().ok());
            (after("users"), after("in_sync"), Some(counts.sum()))
        }
        false => (before("users"), before("in"), before("not")),
    };
    assert_eq!((users, in_sync), (Some(n), Some(expected_in_sync)), "the report: {summary}");
    Row {
        scenario: format!(
            "reconcile, {n} users against {n} contacts{}{}",
            if args.unlinked { ", no user linked yet" } else { "" },
            if args.json { ", --json" } else { "" }
        ),
        result: format!(
            "{:.1} s; {} list calls (first to last {span:.1} s); report: {n} users, {expected_in_sync} in sync, \
             {} not; peak RSS {:.1} MiB ({})",
            run.wall.as_secs_f64(),
            listed.len(),
            not.unwrap_or(-1),
            run.peak_rss_kib as f64 / 1024.0,
            match run.peak_rss_source {
                "ru_maxrss" =>
                    format!("ru_maxrss; VmHWM polled every 5 ms: {:.1} MiB", run.polled_hwm_kib as f64 / 1024.0),
                other => other.to_owned(),
            },
        ),
        target: match args.unlinked {
            false => "peak RSS < 40 MiB; about 1,000 list calls per 1,000,000 contacts",
            true => "peak RSS < 40 MiB: each user not in sync is printed as found, not held",
        },
        daemon_ms: Some(run.cpu_secs * 1000.0 / n as f64),
        pg_ms: Some(pg_cpu * 1000.0 / n as f64),
        rss_kib: Some(run.peak_rss_kib),
    }
}

fn print_table(rows: &[Row], args: &Args, load_before: &str) {
    let date = std::process::Command::new("date")
        .args(["-u", "+%Y-%m-%d %H:%M UTC"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_default();
    let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0);
    println!(
        "keap-sync perf, {date}; {cores} cores; load average {load_before} before, {} after; \
         changes {}, capture rows {}, latency commits {}, reconcile users {}{}",
        bench::load_average(),
        args.changes,
        args.capture_rows,
        args.commits,
        args.users,
        if args.profile.is_some() { "; PROFILING (perf record, pg_stat_statements)" } else { "" }
    );
    println!();
    println!("| scenario | result | target | daemon CPU ms/op | Postgres CPU ms/op | daemon peak RSS |");
    println!("| --- | --- | --- | ---: | ---: | ---: |");
    let ms = |v: Option<f64>| v.map_or("–".to_owned(), |v| format!("{v:.3}"));
    for r in rows {
        println!(
            "| {} | {} | {} | {} | {} | {} |",
            r.scenario,
            r.result,
            r.target,
            ms(r.daemon_ms),
            ms(r.pg_ms),
            r.rss_kib.map_or("–".to_owned(), |k| format!("{:.1} MiB", k as f64 / 1024.0))
        );
    }
}
