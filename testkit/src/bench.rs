//! What the benchmarks (`benches/*.rs`) share: argument parsing, connections, process CPU and
//! peak memory from `/proc`, `pg_stat_statements` on a throwaway cluster, the capture-cost
//! measurement, the daemon as a child process, and the check that Keap holds every user's
//! final row.
//!
//! Nothing here sleeps to synchronise: waits poll a condition with a deadline.

use std::collections::HashMap;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant, SystemTime};

use tokio_postgres::{Client, NoTls};

use crate::fake::FakeKeap;
use crate::pg::Cluster;

/// The value after `name` on the command line, parsed (`_` allowed as a digit separator).
pub fn arg(name: &str, default: i64) -> i64 {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.replace('_', "").parse().ok())
        .unwrap_or(default)
}

/// The value after `name` on the command line, as text.
pub fn arg_text(name: &str) -> Option<String> {
    let args: Vec<String> = std::env::args().collect();
    args.iter().position(|a| a == name).and_then(|i| args.get(i + 1)).cloned()
}

/// Whether `name` is on the command line.
pub fn flag(name: &str) -> bool {
    std::env::args().any(|a| a == name)
}

/// A connection whose driver runs in a spawned task.
pub async fn connect(conninfo: &str) -> Client {
    let (client, connection) = tokio_postgres::connect(conninfo, NoTls).await.expect("connect");
    tokio::spawn(async move {
        let _ = connection.await;
    });
    client
}

/// A throwaway cluster, started off the async threads.
pub async fn start_cluster() -> Cluster {
    tokio::task::spawn_blocking(Cluster::start).await.expect("cluster task").expect("throwaway PostgreSQL")
}

/// Opt-in for benches: preloads `pg_stat_statements` (set for the next start, then a
/// restart). Each database that wants the view runs `create extension pg_stat_statements`.
pub async fn enable_pg_stat_statements(cluster: Cluster) -> Cluster {
    {
        let admin = connect(&cluster.conninfo("postgres")).await;
        admin
            .batch_execute("alter system set shared_preload_libraries = 'pg_stat_statements'")
            .await
            .expect("preload pg_stat_statements");
    }
    tokio::task::spawn_blocking(move || {
        cluster.restart().expect("restart with pg_stat_statements");
        cluster
    })
    .await
    .expect("restart task")
}

/// One statement as `pg_stat_statements` saw it.
#[derive(Debug, Clone)]
pub struct Statement {
    /// How many times it ran.
    pub calls: i64,
    /// Its total execution time, in milliseconds.
    pub total_ms: f64,
    /// Its mean execution time, in milliseconds.
    pub mean_ms: f64,
    /// How many rows it returned or touched, over all its runs.
    pub rows: i64,
    /// The normalised text, whitespace folded.
    pub query: String,
}

/// The statements of the current database, most total time first (the view's own excluded).
pub async fn statements(client: &Client) -> Vec<Statement> {
    client
        .query(
            "select calls, total_exec_time, mean_exec_time, rows, regexp_replace(query, '\\s+', ' ', 'g')
               from pg_stat_statements
              where dbid = (select oid from pg_database where datname = current_database())
                and query not ilike '%pg_stat_statements%'
              order by total_exec_time desc",
            &[],
        )
        .await
        .expect("pg_stat_statements")
        .iter()
        .map(|r| Statement {
            calls: r.get(0),
            total_ms: r.get(1),
            mean_ms: r.get(2),
            rows: r.get(3),
            query: r.get(4),
        })
        .collect()
}

/// utime + stime of a process (all its threads), in clock ticks; `"self"` for this one. 0 if
/// it is gone.
pub fn cpu_ticks(pid: &str) -> u64 {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else { return 0 };
    // The command name (field 2) is in parentheses and may hold spaces: split after it.
    let Some(rest) = stat.rsplit_once(')').map(|(_, r)| r) else { return 0 };
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // `rest` starts at field 3 (state), so utime (14) and stime (15) are at 11 and 12.
    fields.get(11).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0)
        + fields.get(12).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0)
}

/// Clock ticks per second (`getconf CLK_TCK`, usually 100).
pub fn ticks_per_sec() -> f64 {
    Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse().ok())
        .unwrap_or(100.0)
}

/// CPU seconds of this process so far (the bench itself and the in-process fake Keap).
pub fn self_cpu_secs() -> f64 {
    cpu_ticks("self") as f64 / ticks_per_sec()
}

/// Peak resident memory (`VmHWM`) of a process in KiB; `"self"` for this one.
pub fn peak_rss_kib(pid: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1).and_then(|v| v.parse().ok()))
        })
        .unwrap_or(0)
}

/// Every process of the cluster: the postmaster and its children (backends, checkpointer, …).
pub fn server_pids(cluster: &Cluster) -> Vec<String> {
    let postmaster = std::fs::read_to_string(cluster.data_dir().join("postmaster.pid"))
        .ok()
        .and_then(|s| s.lines().next().map(str::to_owned))
        .expect("postmaster.pid");
    let mut pids = vec![postmaster.clone()];
    for entry in std::fs::read_dir("/proc").expect("/proc").flatten() {
        let pid = entry.file_name().to_string_lossy().into_owned();
        if !pid.bytes().all(|b| b.is_ascii_digit()) {
            continue;
        }
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else { continue };
        let ppid = stat.rsplit_once(')').and_then(|(_, r)| r.split_whitespace().nth(1).map(str::to_owned));
        if ppid.as_deref() == Some(postmaster.as_str()) {
            pids.push(pid);
        }
    }
    pids
}

/// CPU ticks of the cluster's processes by pid, to subtract two readings with [`ServerCpu::since`].
/// A process that both starts and ends between two readings is missed (an autovacuum worker,
/// a short connection); the daemon's and the bench's connections live through the window.
#[derive(Debug, Clone, Default)]
pub struct ServerCpu(HashMap<String, u64>);

impl ServerCpu {
    /// The CPU ticks each server process of `cluster` has used so far.
    pub fn read(cluster: &Cluster) -> ServerCpu {
        ServerCpu(server_pids(cluster).into_iter().map(|pid| (pid.clone(), cpu_ticks(&pid))).collect())
    }

    /// CPU seconds spent by the cluster since `earlier` (a process gone since keeps its last reading).
    pub fn since(&self, earlier: &ServerCpu) -> f64 {
        self.since_except(earlier, "")
    }

    /// [`ServerCpu::since`] without the process `pid` (the bench's own connection, whose
    /// looks at the outbox are the bench's cost, not the daemon's).
    pub fn since_except(&self, earlier: &ServerCpu, pid: &str) -> f64 {
        let mut ticks = 0;
        for (p, t) in self.0.iter().filter(|(p, _)| p.as_str() != pid) {
            ticks += t.saturating_sub(earlier.0.get(p).copied().unwrap_or(0));
        }
        ticks as f64 / ticks_per_sec()
    }
}

/// CPU seconds of the cluster's processes that have ended and been reaped by the postmaster
/// (its `cutime` + `cstime`): the backends of a command's connections, which start and end
/// between two [`ServerCpu`] readings and so are missing from [`ServerCpu::since`].
pub fn reaped_server_cpu_secs(cluster: &Cluster) -> f64 {
    let postmaster = std::fs::read_to_string(cluster.data_dir().join("postmaster.pid"))
        .ok()
        .and_then(|s| s.lines().next().map(str::to_owned))
        .expect("postmaster.pid");
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{postmaster}/stat")) else { return 0.0 };
    let Some(rest) = stat.rsplit_once(')').map(|(_, r)| r) else { return 0.0 };
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // `rest` starts at field 3 (state), so cutime (16) and cstime (17) are at 13 and 14.
    let ticks = fields.get(13).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0)
        + fields.get(14).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
    ticks as f64 / ticks_per_sec()
}

/// Polls `condition` every 5 ms until it holds; false if `timeout` passes first.
pub async fn poll_until<F, Fut>(timeout: Duration, mut condition: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if condition().await {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Users with a change not yet delivered: queued in the outbox or still in the change log (a
/// daemon that is not running has not folded it).
pub const PENDING_USERS: &str = "select count(*) from (select user_key from keap_sync.outbox
                                   union select user_key from keap_sync.change) pending";

/// Waits until the change log and the outbox are empty, looking every 5 ms with a query that
/// stops at the first row. The change log is looked at only once the outbox is empty (a `case`
/// evaluates its branches lazily): after a fold it is a heap of dead rows until vacuumed, and
/// every look would walk them. False if `timeout` passes first.
///
/// The looks are not free: near the end of a 20,000-row drain the outbox's first live row lies
/// past thousands of dead ones (0.6–0.75 ms a look, about 10 % of the drain's Postgres CPU),
/// so the drain counts the looking backend apart ([`ServerCpu::since_except`], [`backend_pid`]).
/// An index scan is worse: with deliveries deleting rows every moment, few entries are dead to
/// every snapshot yet, and each look visits their heap tuples.
pub async fn wait_outbox_empty(db: &Client, timeout: Duration) -> bool {
    poll_until(timeout, || async {
        db.query_one(
            "select case when exists (select from keap_sync.outbox) then false
                         else not exists (select from keap_sync.change) end",
            &[],
        )
        .await
        .map(|r| r.get::<_, bool>(0))
        .unwrap_or(false)
    })
    .await
}

/// The pid of `db`'s server process.
pub async fn backend_pid(db: &Client) -> String {
    let row = db.query_one("select pg_backend_pid()", &[]).await.expect("pg_backend_pid");
    row.get::<_, i32>(0).to_string()
}

/// Empties `users` and the outbox without capturing it (every user trigger disabled).
pub async fn reset_users(client: &Client) {
    client
        .batch_execute(
            "alter table users disable trigger user; truncate users; truncate keap_sync.outbox, keap_sync.outbox_count, keap_sync.change;",
        )
        .await
        .expect("reset");
}

/// Enables every capture trigger `migrate` installs (after [`reset_users`] disabled them).
pub const ENABLE_CAPTURE: &str =
    "alter table users enable always trigger keap_sync_capture, enable always trigger keap_sync_capture_update,
         enable always trigger keap_sync_capture_delete, enable always trigger keap_sync_capture_key,
         enable always trigger keap_sync_capture_truncate, enable replica trigger keap_sync_capture_apply;";

/// How many rounds [`insert_rates`] splits each case into.
pub const CAPTURE_ROUNDS: i64 = 10;

/// Capture cost: insert rows/s into `users` for (100-row statements, one transaction each;
/// single-row autocommit statements) under each setting of `enables` (SQL that enables the
/// triggers to measure, after [`reset_users`] disabled them; "" for none), `rows` per case.
///
/// The settings are interleaved: [`CAPTURE_ROUNDS`] rounds, each emptying the table and
/// inserting `rows / CAPTURE_ROUNDS` rows under every setting in turn, with the time of the
/// inserts alone summed per setting. Run one after the other, the settings measured the
/// machine's drift too (on 2 cores, single-row rates without capture ranged 8,200–15,000/s
/// from one run to the next); interleaved, the drift falls on every setting alike.
pub async fn insert_rates(client: &Client, rows: i64, enables: &[&str]) -> Vec<(f64, f64)> {
    // Prepared once, as an application's driver would: an unprepared statement adds a parse
    // round trip to every transaction, the same with and without capture, and so makes the
    // capture's share look smaller than it is.
    let batch_insert = client
        .prepare(
            "insert into users (email, first_name, last_name)
             select 'b' || g || '@example.com', 'F' || g, 'L' || g from generate_series($1::bigint, $1::bigint + 99) g",
        )
        .await
        .expect("prepare");
    let insert = client
        .prepare("insert into users (email, first_name, last_name) values ($1, 'F', 'L')")
        .await
        .expect("prepare");
    let per_round = (rows / CAPTURE_ROUNDS / 100).max(1) * 100;
    let mut spent = vec![(Duration::ZERO, Duration::ZERO); enables.len()];
    for round in 0..CAPTURE_ROUNDS {
        for (enable, spent) in enables.iter().zip(spent.iter_mut()) {
            reset_users(client).await;
            client.batch_execute(enable).await.expect("enable");
            let started = Instant::now();
            for b in 0..per_round / 100 {
                client.execute(&batch_insert, &[&(round * per_round + b * 100)]).await.expect("batch insert");
            }
            spent.0 += started.elapsed();
            let started = Instant::now();
            for i in 0..per_round {
                let email = format!("s{}@example.com", round * per_round + i);
                client.execute(&insert, &[&email]).await.expect("single insert");
            }
            spent.1 += started.elapsed();
        }
    }
    let total = (per_round * CAPTURE_ROUNDS) as f64;
    spent.into_iter().map(|(b, s)| (total / b.as_secs_f64(), total / s.as_secs_f64())).collect()
}

/// Users whose Keap contact (the one the contact map names) holds exactly their row's email,
/// given and family name, and the number of users with an email.
pub async fn users_right_in_keap(db: &Client, fake: &FakeKeap) -> (usize, usize) {
    let rows = db
        .query(
            "select u.email, u.first_name, u.last_name, m.contact_id
               from users u left join keap_sync.contact_map m on m.user_key = u.id::text
              where u.email is not null",
            &[],
        )
        .await
        .expect("users");
    let contacts: HashMap<i64, _> = fake.contacts().into_iter().map(|c| (c.id, c)).collect();
    let name = |v: Option<String>| v.filter(|s| !s.is_empty());
    let right = rows
        .iter()
        .filter(|r| {
            let Some(c) = r.get::<_, Option<i64>>(3).and_then(|id| contacts.get(&id)) else { return false };
            c.email1() == Some(r.get::<_, &str>(0))
                && name(c.given_name.clone()) == name(r.get(1))
                && name(c.family_name.clone()) == name(r.get(2))
        })
        .count();
    (right, rows.len())
}

/// `keap-sync run` as a child process (`binary` is the bench's `CARGO_BIN_EXE_keap-sync`), with
/// `toml` as its configuration file and `env` as its whole environment (plus `PATH`). Its log
/// (`KEAP_SYNC_LOG`, `warn` unless set) goes to a file beside the configuration. SIGKILLed on
/// drop.
pub struct ChildDaemon {
    /// The harness's child process (kill, log, SIGKILL on drop).
    inner: crate::app::ChildDaemon,
    /// When the process was spawned, to time its start and first call from.
    pub started: Instant,
}

impl ChildDaemon {
    /// Spawns `binary run` with `toml` written into `dir` as its configuration and `env` as its environment.
    pub fn spawn(binary: &Path, dir: &Path, toml: &str, env: &HashMap<String, String>) -> ChildDaemon {
        std::fs::create_dir_all(dir).expect("bench dir");
        let config = dir.join("keap-sync.toml");
        std::fs::write(&config, toml).expect("write config");
        let log = dir.join(format!("daemon-{}.log", crate::app::rand_suffix()));
        let stderr = std::fs::File::create(&log).expect("log file");
        let started = Instant::now();
        let child = Command::new(binary)
            .args(["--config", config.to_str().expect("utf-8 path"), "run"])
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("KEAP_SYNC_LOG", std::env::var("KEAP_SYNC_LOG").unwrap_or_else(|_| "warn".into()))
            .envs(env)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn()
            .expect("spawn keap-sync");
        ChildDaemon { inner: crate::app::ChildDaemon { child, log }, started }
    }

    /// The child's process id, as text (as `/proc` and `ps` name it).
    pub fn pid(&self) -> String {
        self.inner.child.id().to_string()
    }

    /// utime + stime so far, in seconds.
    pub fn cpu_secs(&self) -> f64 {
        cpu_ticks(&self.pid()) as f64 / ticks_per_sec()
    }

    /// Peak RSS so far, in KiB.
    pub fn peak_rss_kib(&self) -> u64 {
        peak_rss_kib(&self.pid())
    }

    /// Waits until the daemon has recorded itself as the active instance (its first turn).
    pub async fn wait_active(&self, db: &Client, timeout: Duration) -> bool {
        let pid = self.inner.child.id() as i32;
        poll_until(timeout, || async {
            db.query_one(
                "select exists (select from keap_sync.instances where pid = $1 and role = 'active')",
                &[&pid],
            )
            .await
            .map(|r| r.get::<_, bool>(0))
            .unwrap_or(false)
        })
        .await
    }

    /// SIGTERM, then waits for the exit (SIGKILL after `grace`). Returns whether it exited 0.
    pub async fn stop(mut self, grace: Duration) -> bool {
        let _ = Command::new("kill").args(["-TERM", &self.pid()]).status();
        let deadline = Instant::now() + grace;
        loop {
            if let Ok(Some(status)) = self.inner.child.try_wait() {
                return status.success();
            }
            if Instant::now() >= deadline {
                self.kill();
                return false;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// SIGKILL: no chance to release claims or finish calls.
    pub fn kill(&mut self) {
        self.inner.kill();
    }

    /// Everything the child has logged so far.
    pub fn log_text(&self) -> String {
        self.inner.log_text()
    }
}

/// Change-to-delivery latency in ms, sorted: from each `(user key, commit time)` to the
/// `synced_at` the daemon wrote in `keap_sync.contact_map` (keys never synced are left out).
pub async fn delivery_latencies_ms(db: &Client, committed: &[(String, SystemTime)]) -> Vec<f64> {
    let keys: Vec<&str> = committed.iter().map(|(k, _)| k.as_str()).collect();
    let synced: HashMap<String, SystemTime> = db
        .query("select user_key, synced_at from keap_sync.contact_map where user_key = any($1)", &[&keys])
        .await
        .expect("contact map")
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    let mut ms: Vec<f64> = committed
        .iter()
        .filter_map(|(k, at)| {
            synced.get(k).map(|s| s.duration_since(*at).unwrap_or_default().as_secs_f64() * 1e3)
        })
        .collect();
    ms.sort_by(f64::total_cmp);
    ms
}

/// The `q` quantile (0–1, nearest rank) of ascending `sorted`; NaN when empty.
pub fn quantile(sorted: &[f64], q: f64) -> f64 {
    match sorted.len() {
        0 => f64::NAN,
        n => sorted[((q * n as f64).ceil() as usize).clamp(1, n) - 1],
    }
}

/// `uptime`'s load averages (1, 5, 15 min), as `/proc/loadavg` has them.
pub fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

/// A command run to its end by [`run_to_end`]: how it ended, what it printed, and what it cost.
#[derive(Debug, Clone)]
pub struct Finished {
    /// Whether it exited 0 (false also when it was killed at the deadline).
    pub success: bool,
    /// From the spawn to the exit.
    pub wall: Duration,
    /// Its standard output.
    pub stdout: String,
    /// Its standard error (the log), in this file.
    pub log: std::path::PathBuf,
    /// Peak resident memory in KiB, from [`Finished::peak_rss_source`].
    pub peak_rss_kib: u64,
    /// Where [`Finished::peak_rss_kib`] comes from: `ru_maxrss` (GNU time's report of what
    /// `wait4` returned for the process: the kernel's own high-water mark, to the very end),
    /// or `VmHWM polled` when `/usr/bin/time` is missing (a lower bound: the last moments
    /// before the exit are not seen).
    pub peak_rss_source: &'static str,
    /// The highest `VmHWM` seen polling `/proc/<pid>/status` every 5 ms while it ran: a
    /// cross-check (the kernel reports both from the same counters, so they agree to a
    /// fraction of a MiB unless the peak came in the moments the polling cannot see).
    pub polled_hwm_kib: u64,
    /// User + system CPU seconds (GNU time's; else the last `/proc/<pid>/stat` reading).
    pub cpu_secs: f64,
}

/// Runs `binary args…` to its end (SIGKILL after `timeout`) with `env` as its whole environment
/// (plus `PATH`; the log level `KEAP_SYNC_LOG` is `warn` unless set), its standard output read
/// from a file in `dir` once it exits and its standard error left in another, and measures
/// its own peak RSS and CPU, not this process's.
///
/// No unsafe code and no new dependency: `getrusage`/`wait4` would need one or the other, so
/// when `/usr/bin/time` (GNU time) is installed the command runs under it, and its `%M` (the
/// `ru_maxrss` `wait4` reported for the command alone) is the figure. `/proc/<pid>/status`
/// holds `VmHWM` only while the process lives, so polling it misses the last moments (a
/// report printed at the end); it is kept as the fallback and as a cross-check. The wait
/// polls the child's exit every 5 ms, with a deadline.
pub async fn run_to_end(
    binary: &Path,
    args: &[&str],
    dir: &Path,
    env: &HashMap<String, String>,
    timeout: Duration,
) -> Finished {
    std::fs::create_dir_all(dir).expect("bench dir");
    let suffix = crate::app::rand_suffix();
    let (out, log, rusage) = (
        dir.join(format!("stdout-{suffix}.txt")),
        dir.join(format!("stderr-{suffix}.log")),
        dir.join(format!("time-{suffix}.txt")),
    );
    let gnu_time = Path::new("/usr/bin/time");
    let mut command = if gnu_time.exists() {
        let mut c = Command::new(gnu_time);
        c.args(["-f", "%M %U %S", "-o"]).arg(&rusage).arg(binary);
        c
    } else {
        Command::new(binary)
    };
    let started = Instant::now();
    let mut child = command
        .args(args)
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("KEAP_SYNC_LOG", std::env::var("KEAP_SYNC_LOG").unwrap_or_else(|_| "warn".into()))
        .envs(env)
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&out).expect("stdout file"))
        .stderr(std::fs::File::create(&log).expect("log file"))
        .spawn()
        .expect("spawn the command");
    let spawned = child.id().to_string();
    let deadline = started + timeout;
    let (mut pid, mut polled_hwm_kib, mut ticks) = (None, 0, 0);
    let status = loop {
        if let Ok(Some(status)) = child.try_wait() {
            break Some(status);
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        // Under GNU time the command is time's child.
        if pid.is_none() {
            pid = if gnu_time.exists() { child_of(&spawned) } else { Some(spawned.clone()) };
        }
        if let Some(pid) = &pid {
            polled_hwm_kib = polled_hwm_kib.max(peak_rss_kib(pid));
            ticks = ticks.max(cpu_ticks(pid));
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    };
    let wall = started.elapsed();
    let reported: Option<(u64, f64)> = std::fs::read_to_string(&rusage).ok().and_then(|text| {
        let mut f = text.lines().last()?.split_whitespace();
        let kib = f.next()?.parse().ok()?;
        let cpu = f.next()?.parse::<f64>().ok()? + f.next()?.parse::<f64>().ok()?;
        Some((kib, cpu))
    });
    let (peak_rss_kib, peak_rss_source, cpu_secs) = match reported {
        Some((kib, cpu)) => (kib, "ru_maxrss", cpu),
        None => (polled_hwm_kib, "VmHWM polled", ticks as f64 / ticks_per_sec()),
    };
    Finished {
        success: status.is_some_and(|s| s.success()),
        wall,
        stdout: std::fs::read_to_string(&out).unwrap_or_default(),
        log,
        peak_rss_kib,
        peak_rss_source,
        polled_hwm_kib,
        cpu_secs,
    }
}

/// The pid of a child process of `parent`, if it has one yet.
fn child_of(parent: &str) -> Option<String> {
    std::fs::read_dir("/proc").ok()?.flatten().find_map(|entry| {
        let pid = entry.file_name().to_string_lossy().into_owned();
        if !pid.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        let ppid = stat.rsplit_once(')')?.1.split_whitespace().nth(1)?.to_owned();
        (ppid == parent).then_some(pid)
    })
}
