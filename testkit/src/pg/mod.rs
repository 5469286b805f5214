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
//! # TLS
//!
//! [`Cluster::start_tls`] starts a cluster that also listens on TCP, on 127.0.0.1 and a free
//! port only, with `ssl = on` and a certificate for `localhost` and `127.0.0.1` signed by a
//! throwaway CA made with the `openssl` command line in the cluster's directory
//! ([`Cluster::ca_file`]). TCP connections need the superuser's password
//! ([`Cluster::tcp_conninfo`] holds it), and with [`TlsOptions::reject_plaintext`] they need
//! TLS too; the Unix socket stays as it is, for the test's own connections.
//!
//! The one state the watchdog cannot cover is a process killed *between*
//! [`Cluster::stop`] and [`Cluster::restart`]: no server is running then, but
//! the temporary directory stays behind.
//!
//! The files: the cluster's life cycle here; finding the server's programs (`binaries`),
//! running them as the right user (`runner`), the processes and their logs (`process`), and
//! quoting for connection strings, settings and shells (`quote`), and a TLS cluster's
//! certificates and rules (`tls`).

use std::ffi::OsString;
use std::fs;
use std::io::{self, Write as _};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use tokio_postgres::NoTls;

mod binaries;
mod process;
mod quote;
mod runner;
mod tls;

use binaries::find_binaries;
use process::{log_tail, pid_file_status, send_signal, wait_for_exit};
use quote::{conninfo_value, describe, percent_encode, quote_guc_list_item, validate_database_name};
use runner::{create_private_dir, open_log, Runner};
use tls::Tcp;
pub use tls::TlsOptions;

/// Port number the server is told to use unless it listens on TCP. It only names the socket file
/// (`.s.PGSQL.5432`) inside the private socket directory; no TCP port is opened.
const PORT: u16 = 5432;

/// How many ports a TLS cluster tries, in case another process takes a free one first.
const PORT_ATTEMPTS: usize = 5;

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
    /// The port: [`PORT`], or a TLS cluster's TCP port.
    port: u16,
    /// A TLS cluster's TCP side ([`Cluster::start_tls`]).
    tcp: Option<Tcp>,
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

    /// A cluster that also accepts TCP connections over TLS, on 127.0.0.1 only: see the
    /// [module docs](self#tls). Its Unix socket works as [`Cluster::start`]'s does.
    pub fn start_tls(options: TlsOptions) -> Result<Cluster, ClusterError> {
        let started = Instant::now();
        let runner = Runner::detect()?;
        let binaries = find_binaries()?;
        let root = create_private_dir(&runner)?;
        let prepared = Tcp::prepare(&root, &runner, options);
        let mut cluster = Cluster::new(root, binaries.postgres, runner);
        // From here on, an early return drops `cluster`, which removes the directory.
        let tcp = prepared?;
        let password_file = tcp.password_file(&cluster.root);
        let mut initdb_args: Vec<OsString> = vec!["--auth-host=scram-sha-256".into(), "--pwfile".into()];
        initdb_args.push(password_file.clone().into());
        cluster.tcp = Some(tcp);
        cluster.initdb(&binaries.initdb, initdb_args)?;
        tls::remove(&password_file)?;
        let mut attempt = 1;
        loop {
            cluster.port = tls::free_port()?;
            match cluster.spawn_server() {
                Ok(watchdog) => {
                    *cluster.lock_server() = Some(watchdog);
                    break;
                }
                // Someone else took the port between our look and the server's bind.
                Err(ClusterError::StartFailed { log_tail, .. })
                    if attempt < PORT_ATTEMPTS && log_tail.contains("could not bind") =>
                {
                    attempt += 1;
                }
                Err(error) => return Err(error),
            }
        }
        tracing::debug!(
            socket_dir = %cluster.root.display(),
            port = cluster.port,
            total_ms = started.elapsed().as_millis(),
            "throwaway PostgreSQL cluster with TLS started"
        );
        Ok(cluster)
    }

    /// A stopped cluster in `root`, with nothing in it yet.
    fn new(root: PathBuf, postgres: PathBuf, runner: Runner) -> Cluster {
        Cluster {
            data_dir: root.join("data"),
            log_file: root.join("postgres.log"),
            root,
            postgres,
            runner,
            server: Mutex::new(None),
            next_database: AtomicU64::new(1),
            port: PORT,
            tcp: None,
        }
    }

    /// [`Cluster::start`] with a given way of running server commands
    /// (separate so tests can exercise each privilege-drop tool).
    fn start_with(runner: Runner) -> Result<Cluster, ClusterError> {
        let started = Instant::now();
        let binaries = find_binaries()?;
        let root = create_private_dir(&runner)?;
        let cluster = Cluster::new(root, binaries.postgres, runner);
        // From here on, an early return drops `cluster`, which removes the directory.
        cluster.initdb(&binaries.initdb, Vec::new())?;
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

    /// The port number; it only names the socket file, and no TCP port is opened, unless
    /// the cluster was started with [`Cluster::start_tls`].
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The throwaway CA that signed a TLS cluster's certificate (PEM), for a client to trust;
    /// `None` for a cluster without TLS.
    pub fn ca_file(&self) -> Option<&Path> {
        self.tcp.as_ref().map(|tcp| tcp.ca_file.as_path())
    }

    /// A key=value connection string for `dbname` over TCP, for a TLS cluster: host
    /// `localhost` (the name its certificate holds, besides 127.0.0.1) at `hostaddr` 127.0.0.1
    /// (where the server listens, whatever else `localhost` resolves to), the port and the
    /// superuser's password; no `sslmode`, which the caller appends. `None` without TLS.
    pub fn tcp_conninfo(&self, dbname: &str) -> Option<String> {
        self.tcp.as_ref().map(|tcp| {
            format!(
                "host=localhost hostaddr=127.0.0.1 port={} user={SUPERUSER} password={} dbname={}",
                self.port,
                conninfo_value(&tcp.password),
                conninfo_value(dbname)
            )
        })
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
            "host={} port={} user={SUPERUSER} dbname={}",
            conninfo_value(&self.root.to_string_lossy()),
            self.port,
            conninfo_value(dbname)
        )
    }

    /// A `postgresql://` URL for `dbname`, with the socket directory
    /// percent-encoded as the host, e.g.
    /// `postgresql://postgres@%2Ftmp%2Fkeap-pg-1-2-3:5432/foo`.
    pub fn url(&self, dbname: &str) -> String {
        format!(
            "postgresql://{SUPERUSER}@{}:{}/{}",
            percent_encode(&self.root.to_string_lossy()),
            self.port,
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
    fn initdb(&self, initdb: &Path, extra_args: Vec<OsString>) -> Result<(), ClusterError> {
        let mut args: Vec<OsString> = vec![
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
        args.extend(extra_args);
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
            self.port.to_string().into(),
            "-c".into(),
            socket_dirs,
        ];
        let tcp_settings = self.tcp.as_ref().map(Tcp::server_settings).unwrap_or_default();
        for setting in [
            // Unix socket only: no TCP port to collide with anything (a TLS cluster's
            // settings below listen on loopback).
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
        for setting in tcp_settings {
            args.push("-c".into());
            args.push(setting);
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

#[cfg(test)]
mod tests;
