//! A throwaway PostgreSQL cluster for tests, the `demo` command and benchmarks.
//!
//! [`Cluster::start`] runs `initdb` into a fresh private temporary directory and
//! starts a `postgres` server that listens **only** on a Unix socket inside that
//! directory. Nothing is shared with a system server: no TCP port (so no port
//! races between parallel test binaries), no shared data directory, trust
//! authentication for the `postgres` superuser, and durability switched off
//! because the data is thrown away anyway.
//!
//! # Running as root
//!
//! PostgreSQL refuses to run as root (`initdb` and `postgres` both exit with
//! "cannot be run as root"). CI and most containers run as root, so when the
//! effective uid is 0 every server-side command is run as the unprivileged
//! `postgres` OS user (created by the distribution packages) through
//! `runuser -u postgres --`, falling back to `setpriv` or `su`. The temporary
//! directory is then handed to that user with `chown`, because the server
//! must own its data directory and be able to create its socket. Root can
//! still connect to the socket and delete the directory afterwards. As a
//! normal user everything runs directly.
//!
//! # No orphaned servers: the watchdog
//!
//! A test binary can panic, abort or be `SIGKILL`ed (a CI timeout, `cargo test`
//! interrupted), and then no destructor runs. A `Cluster` kept in a `static
//! OnceLock` is never dropped at all. To make sure the server never outlives
//! its owner, `postgres` (and `initdb` before it) is not spawned directly but
//! under a tiny `/bin/sh` watchdog (`WATCHDOG_SCRIPT` in the source) whose standard
//! input is a pipe whose only write end is held by this process:
//!
//! * when this process dies, however it dies, the kernel closes the write end,
//!   the watchdog's `read` sees end-of-file, asks `postgres` for a fast
//!   shutdown (`SIGINT`), waits for it and deletes the temporary directory;
//! * [`Cluster::stop`] writes the line `stop` instead: the server is shut down
//!   the same way but the data directory is kept for [`Cluster::restart`];
//! * if `postgres` exits on its own, the watchdog exits too (so
//!   [`Cluster::is_running`] can tell), instead of lingering in `read`.
//!
//! This needs no `unsafe` code (no `prctl(PR_SET_PDEATHSIG)`, no `fork`), works
//! identically through `runuser`/`setpriv`/`su` (which pass standard input on to
//! the shell), and the pipe is created close-on-exec by the standard library,
//! so no other child process of ours can accidentally keep it open.
//!
//! The one state the watchdog cannot cover is a process killed *between*
//! [`Cluster::stop`] and [`Cluster::restart`]: no server is running then, but
//! the temporary directory stays behind.

use std::ffi::{OsStr, OsString};
use std::fmt::Write as _;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write as _};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use tokio_postgres::NoTls;

/// Port number the server is told to use. It only names the socket file
/// (`.s.PGSQL.5432`) inside the private socket directory; no TCP port is opened.
const PORT: u16 = 5432;

/// Superuser created by `initdb -U`, the only role in the cluster.
const SUPERUSER: &str = "postgres";

/// OS account the server runs as when this process is root.
const SERVER_OS_USER: &str = "postgres";

/// How long `start`/`restart` wait for the server to report `ready`.
const READY_TIMEOUT: Duration = Duration::from_secs(30);

/// How often the readiness and shutdown loops look again.
const POLL_INTERVAL: Duration = Duration::from_millis(20);

/// How long a fast shutdown may take before escalating to an immediate one.
const STOP_TIMEOUT: Duration = Duration::from_secs(30);

/// How long each escalation step (`SIGQUIT`, then `SIGKILL`) may take.
const ESCALATION_TIMEOUT: Duration = Duration::from_secs(5);

/// How long `initdb` may take (it normally needs about a second).
const INITDB_TIMEOUT: Duration = Duration::from_secs(120);

/// How many lines of the server log an error message quotes.
const LOG_TAIL_LINES: usize = 20;

/// Longest Unix socket path Linux accepts (`sizeof(sun_path) - 1`).
const MAX_SOCKET_PATH: usize = 107;

/// The watchdog, run as `sh -c WATCHDOG_SCRIPT sh <dir> <signal> <program> <args>...`.
///
/// Its standard input is a pipe held open by the owning process; its
/// stdout/stderr are the log file. Step by step:
///
/// 1. Start the program in the background (stdin from `/dev/null`, so it
///    never holds our pipe).
/// 2. A background reader subshell blocks on the pipe. POSIX makes a
///    background job's stdin `/dev/null` unless redirected explicitly, hence
///    the detour through fd 3. On the line `stop` it only sends `<signal>`;
///    on anything else (end-of-file: the owner died or dropped the `Cluster`)
///    it first leaves the marker file `.owner-gone`, then sends `<signal>`.
///    For `postgres` that is `INT` (fast shutdown; a non-interactive shell
///    starts background jobs with `SIGINT` ignored, but the postmaster
///    installs its own handler), for `initdb` `TERM` (it cleans up and exits).
/// 3. The main shell waits for the program itself, so a server that exits for
///    any reason (our `stop`, a crash) ends the watchdog too. It then kills the
///    reader (still blocked if the program exited on its own), deletes the
///    directory if the marker says the owner is gone (once more after a
///    moment if stray files were still being written), and exits with the
///    program's status.
///
/// Arguments are passed as positional parameters, never spliced into the
/// script, so paths need no shell quoting.
const WATCHDOG_SCRIPT: &str = r#"dir=$1; sig=$2; shift 2
"$@" </dev/null &
pid=$!
exec 3<&0
{
  if read -r line && [ "$line" = stop ]; then :; else : >"$dir/.owner-gone"; fi
  kill -s "$sig" "$pid" 2>/dev/null
} <&3 &
reader=$!
exec 3<&-
wait "$pid"; status=$?
kill "$reader" 2>/dev/null
if [ -e "$dir/.owner-gone" ]; then rm -rf "$dir" || { sleep 1; rm -rf "$dir"; }; fi
exit "$status"
"#;

/// Everything that can go wrong while managing a [`Cluster`].
#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    /// Neither `PATH` nor `/usr/lib/postgresql/*/bin` has the server binaries.
    #[error(
        "PostgreSQL server binaries (`initdb` and `postgres`) not found on PATH or under \
         /usr/lib/postgresql/*/bin; install PostgreSQL (e.g. `apt-get install postgresql`)"
    )]
    BinariesNotFound,

    /// Running as root, but there is no unprivileged account to run the server as.
    #[error(
        "running as root, but PostgreSQL refuses to run as root and the OS user \
         `{user}` to run it as was not found ({detail}); install PostgreSQL from \
         the distribution packages (which create it) or run as a normal user"
    )]
    NoServerUser {
        /// The account looked up.
        user: &'static str,
        /// What the lookup reported.
        detail: String,
    },

    /// Running as root, but no tool to switch to the server's OS user.
    #[error(
        "running as root, but none of `runuser`, `setpriv` or `su` was found to run \
         PostgreSQL as the `{user}` OS user"
    )]
    NoPrivilegeDropTool {
        /// The account the server should run as.
        user: &'static str,
    },

    /// A filesystem operation on the cluster's files failed.
    #[error("cannot {action} {}: {source}", path.display())]
    Io {
        /// What was being done, e.g. "create directory".
        action: &'static str,
        /// The file or directory involved.
        path: PathBuf,
        /// The underlying error.
        source: io::Error,
    },

    /// A helper command could not be started at all.
    #[error("cannot run `{command}`: {source}")]
    Spawn {
        /// The command line, for humans.
        command: String,
        /// The underlying error.
        source: io::Error,
    },

    /// A helper command (e.g. `initdb`) ran but failed.
    #[error("`{command}` failed ({outcome}):\n{output}")]
    CommandFailed {
        /// The command line, for humans.
        command: String,
        /// How it ended, e.g. "exit status: 1".
        outcome: String,
        /// The last lines of its output.
        output: String,
    },

    /// The server did not come up.
    #[error(
        "PostgreSQL server for {} failed to start: {reason}\n--- last lines of {} ---\n{log_tail}",
        data_dir.display(),
        log_file.display()
    )]
    StartFailed {
        /// The cluster's data directory.
        data_dir: PathBuf,
        /// Why we gave up.
        reason: String,
        /// The server log.
        log_file: PathBuf,
        /// Its last lines.
        log_tail: String,
    },

    /// The server did not go away, even after an immediate shutdown and `SIGKILL`.
    #[error("PostgreSQL server for {} did not stop within {timeout:?}", data_dir.display())]
    StopFailed {
        /// The cluster's data directory.
        data_dir: PathBuf,
        /// Total time waited.
        timeout: Duration,
    },

    /// A database name or prefix outside `[a-z0-9_]{1,63}`.
    #[error("invalid database name {name:?}: {reason}")]
    InvalidDatabaseName {
        /// The rejected name.
        name: String,
        /// What is wrong with it.
        reason: &'static str,
    },

    /// Talking SQL to the server failed.
    #[error("{context}: {source}")]
    Sql {
        /// What was being done.
        context: String,
        /// The driver's error.
        #[source]
        source: tokio_postgres::Error,
    },
}

/// A private, disposable PostgreSQL server. See the [module docs](self).
///
/// Dropping it stops the server (fast shutdown) and deletes its directory.
/// Process management is synchronous so a cluster can be created inside a
/// `std::sync::OnceLock` initializer; only the SQL helpers are `async`.
/// `stop`/`restart` take `&self`, so a shared `&'static Cluster` can be used
/// for "database went away" fault tests. They block the calling thread (for
/// about a second at most), which is fine in tests, also inside a Tokio
/// runtime.
#[derive(Debug)]
pub struct Cluster {
    /// The private temporary directory; also the Unix socket directory.
    root: PathBuf,
    /// `root/data`, created by `initdb`.
    data_dir: PathBuf,
    /// `root/postgres.log`: server, watchdog and `runuser` output.
    log_file: PathBuf,
    /// The `postgres` executable.
    postgres: PathBuf,
    /// How server-side commands are run (directly or as the `postgres` user).
    runner: Runner,
    /// The running server's watchdog, `None` while stopped.
    server: Mutex<Option<Watchdog>>,
    /// Suffix counter for [`Cluster::fresh_database`].
    next_database: AtomicU64,
}

/// A running watchdog shell (possibly wrapped in `runuser`/`setpriv`/`su`).
#[derive(Debug)]
struct Watchdog {
    /// The process we spawned (the watchdog shell or its privilege-drop wrapper).
    child: Child,
    /// The write end of the watchdog's stdin; closing it means "owner gone".
    control: Option<ChildStdin>,
}

impl Cluster {
    /// Create a fresh cluster in a new temporary directory and start its server.
    ///
    /// Takes roughly a second, nearly all of it `initdb`.
    pub fn start() -> Result<Cluster, ClusterError> {
        Cluster::start_with(Runner::detect()?)
    }

    /// [`Cluster::start`] with a given way of running server commands
    /// (separate so tests can exercise each privilege-drop tool).
    fn start_with(runner: Runner) -> Result<Cluster, ClusterError> {
        let started = Instant::now();
        let binaries = find_binaries()?;
        let root = create_private_dir(&runner)?;
        let cluster = Cluster {
            data_dir: root.join("data"),
            log_file: root.join("postgres.log"),
            root,
            postgres: binaries.postgres,
            runner,
            server: Mutex::new(None),
            next_database: AtomicU64::new(1),
        };
        // From here on, an early return drops `cluster`, which removes the directory.
        cluster.initdb(&binaries.initdb)?;
        let initdb_done = started.elapsed();
        {
            let mut server = cluster.lock_server();
            *server = Some(cluster.spawn_server()?);
        }
        tracing::debug!(
            socket_dir = %cluster.root.display(),
            initdb_ms = initdb_done.as_millis(),
            total_ms = started.elapsed().as_millis(),
            "throwaway PostgreSQL cluster started"
        );
        Ok(cluster)
    }

    /// The directory holding the server's Unix socket (and all its files).
    pub fn socket_dir(&self) -> &Path {
        &self.root
    }

    /// The port number; it only names the socket file, no TCP port is opened.
    pub fn port(&self) -> u16 {
        PORT
    }

    /// The cluster's data directory (`initdb -D`).
    pub fn data_dir(&self) -> &Path {
        &self.data_dir
    }

    /// The server log (consulted by error messages; handy when a test fails).
    pub fn log_file(&self) -> &Path {
        &self.log_file
    }

    /// A `tokio_postgres` key=value connection string for `dbname`, e.g.
    /// `host=/tmp/keap-pg-1-2-3 port=5432 user=postgres dbname=foo`.
    pub fn conninfo(&self, dbname: &str) -> String {
        format!(
            "host={} port={PORT} user={SUPERUSER} dbname={}",
            conninfo_value(&self.root.to_string_lossy()),
            conninfo_value(dbname)
        )
    }

    /// A `postgresql://` URL for `dbname`, with the socket directory
    /// percent-encoded as the host, e.g.
    /// `postgresql://postgres@%2Ftmp%2Fkeap-pg-1-2-3:5432/foo`.
    pub fn url(&self, dbname: &str) -> String {
        format!(
            "postgresql://{SUPERUSER}@{}:{PORT}/{}",
            percent_encode(&self.root.to_string_lossy()),
            percent_encode(dbname)
        )
    }

    /// Create the database `name` (which must match `[a-z0-9_]{1,63}`) and
    /// return its [`conninfo`](Cluster::conninfo).
    pub async fn create_database(&self, name: &str) -> Result<String, ClusterError> {
        validate_database_name(name)?;
        let context = || format!("creating database {name:?} in {}", self.root.display());
        let (client, connection) = tokio_postgres::connect(&self.conninfo("postgres"), NoTls)
            .await
            .map_err(|source| ClusterError::Sql { context: context(), source })?;
        // The connection future does the actual I/O; it ends when `client` is dropped.
        let connection = tokio::spawn(connection);
        let created = client.batch_execute(&format!("CREATE DATABASE \"{name}\"")).await;
        drop(client);
        if let Ok(Err(error)) = connection.await {
            tracing::debug!(%error, "throwaway cluster admin connection ended with an error");
        }
        created.map_err(|source| ClusterError::Sql { context: context(), source })?;
        Ok(self.conninfo(name))
    }

    /// Create a database named `<prefix>_<n>` with `n` unique within this
    /// cluster and return its [`conninfo`](Cluster::conninfo). The usual way
    /// for each test to get its own database on a shared cluster.
    pub async fn fresh_database(&self, prefix: &str) -> Result<String, ClusterError> {
        validate_database_name(prefix)?;
        let n = self.next_database.fetch_add(1, Ordering::Relaxed);
        self.create_database(&format!("{prefix}_{n}")).await
    }

    /// Stop the server (fast shutdown: open sessions are terminated) but keep
    /// its data, so that [`Cluster::restart`] brings back the same databases.
    /// Does nothing if the server is not running.
    pub fn stop(&self) -> Result<(), ClusterError> {
        let mut server = self.lock_server();
        match server.take() {
            Some(watchdog) => self.shut_down(watchdog, ShutdownKind::KeepData),
            None => Ok(()),
        }
    }

    /// Start the server again on the same data directory and socket, stopping
    /// it first if it is still running, and wait until it accepts connections.
    pub fn restart(&self) -> Result<(), ClusterError> {
        let mut server = self.lock_server();
        if let Some(watchdog) = server.take() {
            self.shut_down(watchdog, ShutdownKind::KeepData)?;
        }
        *server = Some(self.spawn_server()?);
        Ok(())
    }

    /// Whether the server process is still alive.
    pub fn is_running(&self) -> bool {
        let mut server = self.lock_server();
        match server.as_mut() {
            Some(watchdog) => matches!(watchdog.child.try_wait(), Ok(None)),
            None => false,
        }
    }

    /// The server slot; a panic while it was held leaves it consistent enough
    /// (at worst a stale watchdog whose `try_wait` reports the truth).
    fn lock_server(&self) -> MutexGuard<'_, Option<Watchdog>> {
        self.server.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Run `initdb`: trust auth for the local superuser, no fsync, C locale
    /// (fast and independent of the host's locale setup). It runs under the
    /// watchdog too, so a test binary killed during `initdb` leaves nothing.
    fn initdb(&self, initdb: &Path) -> Result<(), ClusterError> {
        let args: Vec<OsString> = vec![
            "-D".into(),
            self.data_dir.clone().into(),
            "-U".into(),
            SUPERUSER.into(),
            "--auth=trust".into(),
            "--no-sync".into(),
            "-E".into(),
            "UTF8".into(),
            "--locale=C".into(),
        ];
        let (mut watchdog, command) = self.spawn_watched(initdb, "TERM", args)?;
        let outcome = match wait_for_exit(&mut watchdog.child, INITDB_TIMEOUT) {
            Some(Ok(status)) if status.success() => return Ok(()),
            Some(Ok(status)) => status.to_string(),
            Some(Err(error)) => format!("cannot wait for it: {error}"),
            None => {
                if let Err(error) = self.shut_down(watchdog, ShutdownKind::KeepData) {
                    tracing::warn!(%error, "cannot stop initdb");
                }
                format!("timed out after {INITDB_TIMEOUT:?}")
            }
        };
        Err(ClusterError::CommandFailed {
            command,
            outcome,
            output: log_tail(&self.log_file, LOG_TAIL_LINES),
        })
    }

    /// The `postgres` command line. All settings are given as `-c` options
    /// rather than written to `postgresql.conf`, so every (re)start uses them.
    fn server_args(&self) -> Vec<OsString> {
        let mut socket_dirs = OsString::from("unix_socket_directories=");
        socket_dirs.push(quote_guc_list_item(&self.root.to_string_lossy()));
        let mut args: Vec<OsString> = vec![
            "-D".into(),
            self.data_dir.clone().into(),
            "-p".into(),
            PORT.to_string().into(),
            "-c".into(),
            socket_dirs,
        ];
        for setting in [
            // Unix socket only: no TCP port to collide with anything.
            "listen_addresses=",
            // Only the owner (or root) may connect, since auth is "trust".
            "unix_socket_permissions=0700",
            // Throwaway data: durability buys nothing and costs time.
            "fsync=off",
            "synchronous_commit=off",
            "full_page_writes=off",
            "max_connections=300",
            "shared_buffers=128MB",
            "logging_collector=off",
        ] {
            args.push("-c".into());
            args.push(setting.into());
        }
        args
    }

    /// Spawn `postgres` under the watchdog and wait until it reports `ready`.
    fn spawn_server(&self) -> Result<Watchdog, ClusterError> {
        let pid_file = self.data_dir.join("postmaster.pid");
        // A server that was killed leaves its postmaster.pid behind (postgres
        // itself copes with that); remember it so a stale "ready" is not
        // mistaken for the new server's.
        let stale_pid_file = fs::read_to_string(&pid_file).ok();
        let (mut watchdog, _) = self.spawn_watched(&self.postgres, "INT", self.server_args())?;

        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            if let Ok(contents) = fs::read_to_string(&pid_file) {
                let fresh = stale_pid_file.as_deref() != Some(contents.as_str());
                if fresh && pid_file_status(&contents) == Some("ready") {
                    return Ok(watchdog);
                }
            }
            let failure = match watchdog.child.try_wait() {
                Ok(Some(status)) => Some(format!("the server exited during startup ({status})")),
                Ok(None) if Instant::now() >= deadline => {
                    Some(format!("{} did not report \"ready\" within {READY_TIMEOUT:?}", pid_file.display()))
                }
                Ok(None) => None,
                Err(error) => Some(format!("cannot check on the server process: {error}")),
            };
            if let Some(reason) = failure {
                if let Err(error) = self.shut_down(watchdog, ShutdownKind::KeepData) {
                    tracing::warn!(%error, "cannot stop PostgreSQL server that failed to start");
                }
                return Err(self.start_failed(reason));
            }
            std::thread::sleep(POLL_INTERVAL);
        }
    }

    /// Spawn `program args` under the watchdog (as the server user if we are
    /// root), with its output appended to the log file. `signal` is what the
    /// watchdog sends it on "stop" or when we die. Also returns the command
    /// line for error messages.
    fn spawn_watched(
        &self,
        program: &Path,
        signal: &str,
        program_args: Vec<OsString>,
    ) -> Result<(Watchdog, String), ClusterError> {
        let log = open_log(&self.log_file, &self.runner)?;
        let log_for_stderr = log.try_clone().map_err(|source| ClusterError::Io {
            action: "duplicate the handle of",
            path: self.log_file.clone(),
            source,
        })?;
        let mut args: Vec<OsString> = vec![
            "-c".into(),
            WATCHDOG_SCRIPT.into(),
            "sh".into(),
            self.root.clone().into(),
            signal.into(),
            program.into(),
        ];
        args.extend(program_args);
        let mut command = self.runner.command(Path::new("/bin/sh"), &args);
        command
            .current_dir(&self.root)
            .env("LC_ALL", "C")
            .stdin(Stdio::piped())
            .stdout(log)
            .stderr(log_for_stderr);
        let described = describe(&command);
        tracing::debug!(command = %described, "spawning under watchdog");
        let mut child =
            command.spawn().map_err(|source| ClusterError::Spawn { command: described.clone(), source })?;
        let control = child.stdin.take();
        Ok((Watchdog { child, control }, described))
    }

    fn start_failed(&self, reason: String) -> ClusterError {
        ClusterError::StartFailed {
            data_dir: self.data_dir.clone(),
            reason,
            log_file: self.log_file.clone(),
            log_tail: log_tail(&self.log_file, LOG_TAIL_LINES),
        }
    }

    /// Stop the server behind `watchdog` and wait for the watchdog to exit.
    ///
    /// Fast shutdown first; if that hangs, an immediate shutdown (`SIGQUIT`),
    /// then `SIGKILL`, so a wedged server cannot wedge the test suite.
    fn shut_down(&self, mut watchdog: Watchdog, kind: ShutdownKind) -> Result<(), ClusterError> {
        if let Some(mut control) = watchdog.control.take() {
            if kind == ShutdownKind::KeepData {
                // A write error means the watchdog is already gone: nothing to stop.
                let _ = control.write_all(b"stop\n");
            }
            // Dropping `control` closes the pipe; without "stop" this is the
            // same end-of-file the watchdog sees when our process dies.
        }
        if wait_for_exit(&mut watchdog.child, STOP_TIMEOUT).is_some() {
            return Ok(());
        }
        let postmaster = fs::read_to_string(self.data_dir.join("postmaster.pid"))
            .ok()
            .and_then(|contents| contents.lines().next()?.trim().parse::<u32>().ok());
        tracing::warn!(
            data_dir = %self.data_dir.display(),
            ?postmaster,
            "PostgreSQL fast shutdown timed out; escalating"
        );
        if let Some(pid) = postmaster {
            send_signal(pid, "QUIT");
            if wait_for_exit(&mut watchdog.child, ESCALATION_TIMEOUT).is_some() {
                return Ok(());
            }
            send_signal(pid, "KILL");
        }
        // A failure here means the child has already exited.
        let _ = watchdog.child.kill();
        if wait_for_exit(&mut watchdog.child, ESCALATION_TIMEOUT).is_some() {
            return Ok(());
        }
        Err(ClusterError::StopFailed {
            data_dir: self.data_dir.clone(),
            timeout: STOP_TIMEOUT + 2 * ESCALATION_TIMEOUT,
        })
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let watchdog = self.server.get_mut().unwrap_or_else(PoisonError::into_inner).take();
        if let Some(watchdog) = watchdog {
            // Closing the pipe makes the watchdog stop the server and delete
            // the directory itself; the removal below covers everything else.
            if let Err(error) = self.shut_down(watchdog, ShutdownKind::RemoveData) {
                tracing::warn!(%error, "cannot stop throwaway PostgreSQL server");
            }
        }
        match fs::remove_dir_all(&self.root) {
            Ok(()) => {}
            Err(error) if error.kind() == io::ErrorKind::NotFound => {}
            Err(error) => tracing::warn!(
                %error,
                dir = %self.root.display(),
                "cannot remove throwaway PostgreSQL directory"
            ),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ShutdownKind {
    /// Explicit stop: the data directory survives.
    KeepData,
    /// Owner going away: the watchdog deletes the directory.
    RemoveData,
}

/// The two server binaries needed.
#[derive(Debug)]
struct Binaries {
    initdb: PathBuf,
    postgres: PathBuf,
}

/// Find `initdb` and `postgres`: on `PATH` (both), else in the highest
/// version under `/usr/lib/postgresql/*/bin`, where Debian and Ubuntu put them
/// without linking them onto `PATH`.
fn find_binaries() -> Result<Binaries, ClusterError> {
    let on_path = (find_on_path("initdb"), find_on_path("postgres"));
    if let (Some(initdb), Some(postgres)) = on_path {
        return Ok(Binaries { initdb, postgres });
    }
    let mut versions: Vec<(Vec<u64>, PathBuf)> = fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|entry| {
            let name = entry.file_name().into_string().ok()?;
            let version =
                name.split('.').map(|part| part.parse::<u64>().ok()).collect::<Option<Vec<u64>>>()?;
            Some((version, entry.path().join("bin")))
        })
        .filter(|(_, bin)| is_executable(&bin.join("initdb")) && is_executable(&bin.join("postgres")))
        .collect();
    versions.sort();
    let (_, bin) = versions.pop().ok_or(ClusterError::BinariesNotFound)?;
    Ok(Binaries { initdb: bin.join("initdb"), postgres: bin.join("postgres") })
}

fn find_on_path(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .filter(|dir| dir.is_absolute())
        .map(|dir| dir.join(name))
        .find(|candidate| is_executable(candidate))
}

/// Like [`find_on_path`], plus the sbin directories, which are often missing
/// from `PATH` in containers and under `cargo test` yet hold `runuser`.
fn find_tool(name: &str) -> Option<PathBuf> {
    find_on_path(name).or_else(|| {
        ["/usr/sbin", "/sbin", "/usr/bin", "/bin"]
            .iter()
            .map(|dir| Path::new(dir).join(name))
            .find(|candidate| is_executable(candidate))
    })
}

fn is_executable(path: &Path) -> bool {
    fs::metadata(path).is_ok_and(|meta| meta.is_file() && meta.permissions().mode() & 0o111 != 0)
}

/// How server-side commands are run.
#[derive(Debug)]
enum Runner {
    /// Not root: run directly.
    CurrentUser,
    /// Root: run as the server's OS user through a privilege-drop tool.
    AsServerUser { uid: u32, gid: u32, tool: PrivilegeDrop },
}

#[derive(Debug)]
enum PrivilegeDrop {
    /// util-linux `runuser -u USER -- CMD...`: made for root dropping privileges, no PAM auth.
    Runuser(PathBuf),
    /// util-linux `setpriv --reuid --regid --init-groups -- CMD...`: no PAM at all.
    Setpriv(PathBuf),
    /// `su -s /bin/sh USER -c 'CMD'`: everywhere, but needs the command quoted for the shell.
    Su(PathBuf),
}

impl Runner {
    fn detect() -> Result<Runner, ClusterError> {
        if effective_uid()? != 0 {
            return Ok(Runner::CurrentUser);
        }
        let uid = lookup_id(SERVER_OS_USER, "-u")?;
        let gid = lookup_id(SERVER_OS_USER, "-g")?;
        let tool = if let Some(path) = find_tool("runuser") {
            PrivilegeDrop::Runuser(path)
        } else if let Some(path) = find_tool("setpriv") {
            PrivilegeDrop::Setpriv(path)
        } else if let Some(path) = find_tool("su") {
            PrivilegeDrop::Su(path)
        } else {
            return Err(ClusterError::NoPrivilegeDropTool { user: SERVER_OS_USER });
        };
        Ok(Runner::AsServerUser { uid, gid, tool })
    }

    /// The owner files must have for the server to use them, if not ourselves.
    fn owner(&self) -> Option<(u32, u32)> {
        match self {
            Runner::CurrentUser => None,
            Runner::AsServerUser { uid, gid, .. } => Some((*uid, *gid)),
        }
    }

    fn command(&self, program: &Path, args: &[OsString]) -> Command {
        match self {
            Runner::CurrentUser => {
                let mut command = Command::new(program);
                command.args(args);
                command
            }
            Runner::AsServerUser { tool: PrivilegeDrop::Runuser(runuser), .. } => {
                let mut command = Command::new(runuser);
                command.args(["-u", SERVER_OS_USER, "--"]).arg(program).args(args);
                command
            }
            Runner::AsServerUser { tool: PrivilegeDrop::Setpriv(setpriv), uid, gid } => {
                let mut command = Command::new(setpriv);
                command
                    .arg(format!("--reuid={uid}"))
                    .arg(format!("--regid={gid}"))
                    .args(["--init-groups", "--"])
                    .arg(program)
                    .args(args);
                command
            }
            Runner::AsServerUser { tool: PrivilegeDrop::Su(su), .. } => {
                let mut line = shell_quote(program.as_os_str());
                for arg in args {
                    line.push(' ');
                    line.push_str(&shell_quote(arg));
                }
                let mut command = Command::new(su);
                command.args(["-s", "/bin/sh", SERVER_OS_USER, "-c"]).arg(line);
                command
            }
        }
    }
}

/// The effective uid, from `/proc/self/status` (no `unsafe` `geteuid` call),
/// falling back to `id -u` where `/proc` is unavailable.
fn effective_uid() -> Result<u32, ClusterError> {
    if let Ok(status) = fs::read_to_string("/proc/self/status") {
        let euid = status
            .lines()
            .find_map(|line| line.strip_prefix("Uid:"))
            .and_then(|ids| ids.split_whitespace().nth(1))
            .and_then(|euid| euid.parse().ok());
        if let Some(euid) = euid {
            return Ok(euid);
        }
    }
    run_id(&["-u"]).map_err(|detail| ClusterError::Spawn {
        command: "id -u".to_owned(),
        source: io::Error::other(detail),
    })
}

/// Look up the server user's uid (`-u`) or gid (`-g`) via `id`, which goes
/// through NSS like everything else on the system.
fn lookup_id(user: &'static str, flag: &str) -> Result<u32, ClusterError> {
    run_id(&[flag, user]).map_err(|detail| ClusterError::NoServerUser { user, detail })
}

fn run_id(args: &[&str]) -> Result<u32, String> {
    let output = Command::new("id")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(|error| format!("cannot run `id`: {error}"))?;
    let stdout = String::from_utf8_lossy(&output.stdout);
    if !output.status.success() {
        let stderr = String::from_utf8_lossy(&output.stderr);
        return Err(format!("`id {}` failed: {}", args.join(" "), stderr.trim()));
    }
    stdout.trim().parse().map_err(|_| format!("`id {}` printed {:?}", args.join(" "), stdout.trim()))
}

/// Create a new, uniquely named directory under the system temp directory,
/// private to (and, as root, owned by) the server's OS user.
///
/// The name combines pid, a process-wide counter and the clock, and
/// `create_dir` fails rather than reuse an existing directory, so parallel
/// test binaries and leftovers can never collide. If the temp directory's path
/// is too long for a Unix socket path, `/tmp` is used instead.
fn create_private_dir(runner: &Runner) -> Result<PathBuf, ClusterError> {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let socket_name_len = format!("/.s.PGSQL.{PORT}").len();
    let mut base = std::env::temp_dir();
    // Allow for the longest name generated below (pid, counter, nanoseconds).
    if base.as_os_str().len() + "/keap-pg-".len() + 3 * 20 + 2 + socket_name_len > MAX_SOCKET_PATH {
        base = PathBuf::from("/tmp");
    }
    let pid = std::process::id();
    let mut attempts = 0;
    let dir = loop {
        let count = COUNTER.fetch_add(1, Ordering::Relaxed);
        let nanos = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |elapsed| elapsed.subsec_nanos());
        let dir = base.join(format!("keap-pg-{pid}-{count}-{nanos}"));
        match fs::create_dir(&dir) {
            Ok(()) => break dir,
            Err(error) if error.kind() == io::ErrorKind::AlreadyExists && attempts < 100 => {
                attempts += 1;
            }
            Err(source) => return Err(ClusterError::Io { action: "create directory", path: dir, source }),
        }
    };
    let prepared = fs::set_permissions(&dir, fs::Permissions::from_mode(0o700))
        .map_err(|source| ClusterError::Io { action: "set permissions of", path: dir.clone(), source })
        .and_then(|()| chown_for_server(&dir, runner));
    if let Err(error) = prepared {
        // Best effort: the directory is empty and of no use to anybody.
        let _ = fs::remove_dir(&dir);
        return Err(error);
    }
    Ok(dir)
}

fn chown_for_server(path: &Path, runner: &Runner) -> Result<(), ClusterError> {
    match runner.owner() {
        Some((uid, gid)) => std::os::unix::fs::chown(path, Some(uid), Some(gid)).map_err(|source| {
            ClusterError::Io { action: "hand over to the postgres user", path: path.to_owned(), source }
        }),
        None => Ok(()),
    }
}

/// Open (creating if needed) the server log for appending; as root it is
/// handed to the server user, whose watchdog deletes the directory later.
fn open_log(path: &Path, runner: &Runner) -> Result<File, ClusterError> {
    let file = OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .map_err(|source| ClusterError::Io { action: "open server log", path: path.to_owned(), source })?;
    if let Some((uid, _)) = runner.owner() {
        let owned = file.metadata().is_ok_and(|meta| meta.uid() == uid);
        if !owned {
            chown_for_server(path, runner)?;
        }
    }
    Ok(file)
}

/// The status word PostgreSQL ≥ 10 writes as the 8th line of `postmaster.pid`
/// (`starting`, `ready`, `stopping`, `standby`), space-padded.
fn pid_file_status(contents: &str) -> Option<&str> {
    contents.lines().nth(7).map(str::trim)
}

/// Poll `child` until it exits or `timeout` passes: `None` if it is still
/// running, else how it ended (an error means it cannot be waited for, e.g.
/// already reaped, so there is nothing left to wait for either).
fn wait_for_exit(child: &mut Child, timeout: Duration) -> Option<io::Result<ExitStatus>> {
    let deadline = Instant::now() + timeout;
    loop {
        match child.try_wait() {
            Ok(Some(status)) => return Some(Ok(status)),
            Err(error) => return Some(Err(error)),
            Ok(None) if Instant::now() >= deadline => return None,
            Ok(None) => std::thread::sleep(POLL_INTERVAL / 2),
        }
    }
}

/// Send `signal` to `pid` with the shell's `kill` builtin (no `unsafe` FFI).
fn send_signal(pid: u32, signal: &str) {
    let result = Command::new("/bin/sh")
        .args(["-c", "kill -s \"$1\" \"$2\"", "sh", signal])
        .arg(pid.to_string())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
    if let Err(error) = result {
        tracing::warn!(%error, pid, signal, "cannot run kill");
    }
}

/// The last `lines` lines of a log file, or a note why there are none.
fn log_tail(path: &Path, lines: usize) -> String {
    match fs::read(path) {
        Ok(bytes) => {
            let text = String::from_utf8_lossy(&bytes);
            let all: Vec<&str> = text.lines().collect();
            let tail = all[all.len().saturating_sub(lines)..].join("\n");
            if tail.trim().is_empty() {
                "(log is empty)".to_owned()
            } else {
                tail
            }
        }
        Err(error) => format!("(cannot read log: {error})"),
    }
}

/// Accept `[a-z0-9_]{1,63}`: always valid once double-quoted, never needs
/// escaping, and within PostgreSQL's 63-byte identifier limit (longer names
/// would be truncated silently, not rejected).
fn validate_database_name(name: &str) -> Result<(), ClusterError> {
    let reason = if name.is_empty() {
        Some("empty")
    } else if name.len() > 63 {
        Some("longer than 63 bytes")
    } else if !name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_') {
        Some("only lowercase ASCII letters, digits and '_' are allowed")
    } else {
        None
    };
    match reason {
        Some(reason) => Err(ClusterError::InvalidDatabaseName { name: name.to_owned(), reason }),
        None => Ok(()),
    }
}

/// Quote a libpq/tokio-postgres key=value value if it needs it.
fn conninfo_value(value: &str) -> String {
    let plain = !value.is_empty() && !value.chars().any(|c| c.is_whitespace() || c == '\'' || c == '\\');
    if plain {
        return value.to_owned();
    }
    let mut quoted = String::with_capacity(value.len() + 2);
    quoted.push('\'');
    for c in value.chars() {
        if c == '\'' || c == '\\' {
            quoted.push('\\');
        }
        quoted.push(c);
    }
    quoted.push('\'');
    quoted
}

/// Percent-encode everything but RFC 3986 unreserved characters.
fn percent_encode(value: &str) -> String {
    let mut encoded = String::with_capacity(value.len() * 3);
    for byte in value.bytes() {
        if byte.is_ascii_alphanumeric() || matches!(byte, b'-' | b'.' | b'_' | b'~') {
            encoded.push(char::from(byte));
        } else {
            // Writing to a String cannot fail.
            let _ = write!(encoded, "%{byte:02X}");
        }
    }
    encoded
}

/// Double-quote one element of a comma-separated GUC list such as
/// `unix_socket_directories`, so commas or spaces in a path are harmless.
fn quote_guc_list_item(value: &str) -> String {
    format!("\"{}\"", value.replace('"', "\"\""))
}

/// Single-quote for `sh` (only needed for the `su -c` fallback).
fn shell_quote(value: &OsStr) -> String {
    format!("'{}'", value.to_string_lossy().replace('\'', r"'\''"))
}

/// A command line for error messages, without the (long) watchdog script.
fn describe(command: &Command) -> String {
    let mut line = command.get_program().to_string_lossy().into_owned();
    for arg in command.get_args() {
        line.push(' ');
        // Also inside the single `su -c` argument.
        line.push_str(&arg.to_string_lossy().replace(WATCHDOG_SCRIPT, "<watchdog script>"));
    }
    line
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{BufRead, BufReader};

    async fn query_one_int(conninfo: &str, sql: &str) -> i64 {
        let (client, connection) = tokio_postgres::connect(conninfo, NoTls).await.expect("connect");
        let connection = tokio::spawn(connection);
        let value: i64 = client.query_one(sql, &[]).await.expect("query").get(0);
        drop(client);
        let _ = connection.await;
        value
    }

    fn process_alive(pid: u32) -> bool {
        // A reaped process has no /proc entry; a zombie has an empty cmdline.
        fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|cmdline| !cmdline.is_empty())
    }

    fn postmaster_pid(cluster: &Cluster) -> u32 {
        let contents = fs::read_to_string(cluster.data_dir().join("postmaster.pid")).expect("postmaster.pid");
        contents
            .lines()
            .next()
            .and_then(|line| line.trim().parse().ok())
            .expect("pid on the first line of postmaster.pid")
    }

    fn wait_until(timeout: Duration, mut condition: impl FnMut() -> bool) -> bool {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if condition() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        condition()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn lifecycle_databases_stop_restart_drop() {
        let started = Instant::now();
        let cluster = Cluster::start().expect("start cluster");
        eprintln!("Cluster::start took {:?}", started.elapsed());
        assert!(cluster.is_running());
        let root = cluster.socket_dir().to_owned();
        assert!(root.join(format!(".s.PGSQL.{}", cluster.port())).exists());

        let created = Instant::now();
        let first = cluster.create_database("alpha").await.expect("create alpha");
        let second = cluster.fresh_database("beta").await.expect("create beta");
        eprintln!("two CREATE DATABASE took {:?}", created.elapsed());
        assert!(second.contains("dbname=beta_"), "{second}");
        assert_eq!(first, cluster.conninfo("alpha"));

        for (conninfo, value) in [(&first, 1_i64), (&second, 2)] {
            let (client, connection) = tokio_postgres::connect(conninfo, NoTls).await.expect("connect");
            let connection = tokio::spawn(connection);
            client
                .batch_execute(&format!("CREATE TABLE t (v bigint); INSERT INTO t VALUES ({value})"))
                .await
                .expect("create table");
            drop(client);
            let _ = connection.await;
        }
        assert_eq!(query_one_int(&first, "SELECT v FROM t").await, 1);
        assert_eq!(query_one_int(&second, "SELECT v FROM t").await, 2);
        // The URL form reaches the same database.
        assert_eq!(query_one_int(&cluster.url("alpha"), "SELECT v FROM t").await, 1);

        let old_pid = postmaster_pid(&cluster);
        let stopped = Instant::now();
        cluster.stop().expect("stop");
        eprintln!("stop took {:?}", stopped.elapsed());
        assert!(!cluster.is_running());
        assert!(!process_alive(old_pid), "postmaster {old_pid} survived stop");
        assert!(cluster.data_dir().join("PG_VERSION").exists(), "data kept");
        assert!(tokio_postgres::connect(&first, NoTls).await.is_err());
        cluster.stop().expect("stopping twice is a no-op");

        let restarted = Instant::now();
        cluster.restart().expect("restart");
        eprintln!("restart took {:?}", restarted.elapsed());
        assert!(cluster.is_running());
        assert_eq!(query_one_int(&first, "SELECT v FROM t").await, 1);
        assert_eq!(query_one_int(&second, "SELECT v FROM t").await, 2);

        // Restarting a running server stops it first.
        let pid_before = postmaster_pid(&cluster);
        cluster.restart().expect("restart while running");
        assert_ne!(postmaster_pid(&cluster), pid_before);
        assert!(!process_alive(pid_before));
        assert_eq!(query_one_int(&first, "SELECT v FROM t").await, 1);

        let pid = postmaster_pid(&cluster);
        let dropped = Instant::now();
        drop(cluster);
        eprintln!("drop took {:?}", dropped.elapsed());
        assert!(!root.exists(), "{} not removed", root.display());
        assert!(!process_alive(pid), "postmaster {pid} survived drop");
    }

    #[test]
    fn drop_after_stop_removes_directory() {
        let cluster = Cluster::start().expect("start cluster");
        let root = cluster.socket_dir().to_owned();
        cluster.stop().expect("stop");
        drop(cluster);
        assert!(!root.exists());
    }

    #[test]
    fn is_running_notices_a_crashed_server() {
        let cluster = Cluster::start().expect("start cluster");
        send_signal(postmaster_pid(&cluster), "KILL");
        assert!(wait_until(Duration::from_secs(10), || !cluster.is_running()));
        // The stale postmaster.pid must not be mistaken for the new server's.
        cluster.restart().expect("restart after crash");
        assert!(cluster.is_running());
    }

    #[test]
    fn failed_start_reports_the_server_log() {
        let cluster = Cluster::start().expect("start cluster");
        cluster.stop().expect("stop");
        let mut conf = OpenOptions::new()
            .append(true)
            .open(cluster.data_dir().join("postgresql.conf"))
            .expect("open postgresql.conf");
        writeln!(conf, "no_such_setting = 1").expect("write postgresql.conf");
        let started = Instant::now();
        let error = cluster.restart().unwrap_err();
        assert!(started.elapsed() < READY_TIMEOUT, "did not fail fast");
        let message = error.to_string();
        assert!(matches!(error, ClusterError::StartFailed { .. }), "{message}");
        assert!(message.contains("no_such_setting"), "{message}");
        assert!(!cluster.is_running());
    }

    #[test]
    fn failed_initdb_reports_its_output() {
        let cluster = Cluster::start().expect("start cluster");
        let initdb = find_binaries().expect("binaries").initdb;
        // The data directory is in use and not empty: initdb must refuse.
        let error = cluster.initdb(&initdb).unwrap_err();
        let message = error.to_string();
        assert!(matches!(error, ClusterError::CommandFailed { .. }), "{message}");
        assert!(message.contains("initdb"), "{message}");
        assert!(message.contains("not empty"), "{message}");
        assert!(cluster.is_running(), "the running server is untouched");
    }

    #[tokio::test]
    async fn rejects_bad_database_names() {
        let cluster = Cluster::start().expect("start cluster");
        for name in ["", "Upper", "semi;colon", "quo\"te", &"x".repeat(64)] {
            let error = cluster.create_database(name).await.unwrap_err();
            assert!(matches!(error, ClusterError::InvalidDatabaseName { .. }), "{name:?}: {error}");
        }
        // Duplicate names are reported by the server, with context.
        cluster.create_database("dup").await.expect("first");
        let error = cluster.create_database("dup").await.unwrap_err();
        assert!(error.to_string().contains("\"dup\""), "{error}");
    }

    #[test]
    fn connection_strings() {
        assert_eq!(conninfo_value("/tmp/x"), "/tmp/x");
        assert_eq!(conninfo_value("/tmp/a b"), "'/tmp/a b'");
        assert_eq!(conninfo_value(r"it's\"), r"'it\'s\\'");
        assert_eq!(conninfo_value(""), "''");
        assert_eq!(percent_encode("/tmp/keap-pg-1_2.x"), "%2Ftmp%2Fkeap-pg-1_2.x");
        assert_eq!(quote_guc_list_item(r#"/a,"b""#), r#""/a,""b""""#);
        assert_eq!(shell_quote(OsStr::new("it's")), r"'it'\''s'");
        assert_eq!(pid_file_status("1\n/d\n2\n5432\n/s\n\n3 4\nready   \n"), Some("ready"));
        assert_eq!(pid_file_status("1\n/d\n2\n5432\n"), None);
    }

    /// Each privilege-drop tool must run the command as the server user and
    /// pass our stdin through (the watchdog depends on it); then a whole
    /// cluster lifecycle must work through it. Only meaningful as root.
    #[tokio::test]
    async fn every_privilege_drop_tool_works() {
        if effective_uid().expect("uid") != 0 {
            eprintln!("not root: skipping privilege-drop tools test");
            return;
        }
        let uid = lookup_id(SERVER_OS_USER, "-u").expect("postgres uid");
        let gid = lookup_id(SERVER_OS_USER, "-g").expect("postgres gid");
        let tools = [
            find_tool("runuser").map(PrivilegeDrop::Runuser),
            find_tool("setpriv").map(PrivilegeDrop::Setpriv),
            find_tool("su").map(PrivilegeDrop::Su),
        ];
        let mut tested = 0;
        for tool in tools.into_iter().flatten() {
            let label = format!("{tool:?}");
            let runner = Runner::AsServerUser { uid, gid, tool };
            let args: Vec<OsString> = vec![
                "-c".into(),
                r#"read -r x; echo "$(id -un) $x $1""#.into(),
                "sh".into(),
                "it's a b".into(),
            ];
            let mut child = runner
                .command(Path::new("/bin/sh"), &args)
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .spawn()
                .expect("spawn");
            child.stdin.take().expect("stdin").write_all(b"hello\n").expect("write");
            let output = child.wait_with_output().expect("wait");
            assert_eq!(
                String::from_utf8_lossy(&output.stdout).trim(),
                format!("{SERVER_OS_USER} hello it's a b"),
                "{label}"
            );

            let cluster = Cluster::start_with(runner).expect(&label);
            let root = cluster.socket_dir().to_owned();
            let conninfo = cluster.fresh_database("tool").await.expect(&label);
            assert_eq!(query_one_int(&conninfo, "SELECT 7::int8").await, 7, "{label}");
            cluster.restart().expect(&label);
            assert_eq!(query_one_int(&conninfo, "SELECT 8::int8").await, 8, "{label}");
            let pid = postmaster_pid(&cluster);
            drop(cluster);
            assert!(!root.exists(), "{label}");
            assert!(!process_alive(pid), "{label}");
            tested += 1;
        }
        assert!(tested > 0, "no privilege-drop tool found");
    }

    const CHILD_ENV: &str = "PGCLUSTER_WATCHDOG_TEST_CHILD";
    const CHILD_MARKER: &str = "PGCLUSTER-CHILD-READY";

    /// The child half of `server_dies_with_its_owner`: with the marker variable set it starts a
    /// cluster, reports it, then waits to be SIGKILLed. In a normal run it does nothing.
    #[test]
    fn watchdog_child_process() {
        if std::env::var_os(CHILD_ENV).is_none() {
            return;
        }
        let cluster = Cluster::start().expect("start cluster");
        println!("{CHILD_MARKER} {} {}", postmaster_pid(&cluster), cluster.socket_dir().display());
        io::stdout().flush().expect("flush stdout");
        loop {
            std::thread::sleep(Duration::from_secs(60));
        }
    }

    /// The core promise of the watchdog: SIGKILL the owning process (no
    /// destructors, no atexit) and the server and its directory still go away.
    #[test]
    fn server_dies_with_its_owner() {
        let this_module = module_path!().split_once("::").map_or(module_path!(), |(_crate, path)| path);
        let mut child = Command::new(std::env::current_exe().expect("current_exe"))
            .args([
                &format!("{this_module}::watchdog_child_process"),
                "--exact",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(CHILD_ENV, "1")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .spawn()
            .expect("spawn child test process");
        let stdout = child.stdout.take().expect("child stdout");
        let ready = BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
            // libtest prints "test <name> ... " on the same line before the output.
            .find_map(|line| line.split_once(CHILD_MARKER).map(|(_, rest)| rest.to_owned()));
        let Some(ready) = ready else {
            let _ = child.kill();
            panic!("child exited without starting a cluster: {:?}", child.wait());
        };
        let (pid, dir) = ready.trim().split_once(' ').expect("pid and dir");
        let pid: u32 = pid.parse().expect("pid");
        let dir = PathBuf::from(dir);
        assert!(process_alive(pid));

        child.kill().expect("SIGKILL child");
        child.wait().expect("reap child");
        let killed = Instant::now();
        assert!(
            wait_until(Duration::from_secs(10), || !process_alive(pid)),
            "postmaster {pid} outlived its SIGKILLed owner"
        );
        assert!(
            wait_until(Duration::from_secs(10), || !dir.exists()),
            "{} outlived its SIGKILLed owner",
            dir.display()
        );
        eprintln!("server and dir gone {:?} after SIGKILL", killed.elapsed());
    }
}
