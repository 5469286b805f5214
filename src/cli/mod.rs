//! The `keap-sync` command line, the top layer: `main.rs` calls [`main`]; every command is a
//! short function that loads the configuration, calls the layers below to do one thing, and
//! returns an error phrased for the operator. Only this layer prints for people
//! (`render`); `auth`, `failures`, `hooks` and `reconcile` have their own modules.

mod auth;
mod failures;
mod generate;
mod hooks;
mod reconcile;
mod render;

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand, ValueEnum};
use tokio::time::Instant;

use crate::backfill::{self, BackfillMode, BackfillState};
use crate::config::{Config, ConfigError};
use crate::daemon::{Daemon, RunError, RunOptions};
use crate::db::{self, DbError};
use crate::preview::{PreviewError, Selection};
use crate::schema::{self, SchemaError};
use crate::secret::Secret;

#[derive(Debug, Parser)]
#[command(name = "keap-sync", version, about = "Keeps Keap contacts in step with a Postgres users table")]
struct Cli {
    /// TOML configuration file (see keap-sync.example.toml); environment variables override it.
    #[arg(long, global = true, env = "KEAP_SYNC_CONFIG")]
    config: Option<PathBuf>,
    /// Log format on standard error.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Human)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum LogFormat {
    Human,
    Json,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Create or upgrade schema keap_sync and install the capture trigger on the users table.
    Migrate,
    /// Remove the capture trigger (and with --drop-schema everything keap-sync stored).
    Uninstall {
        /// Also drop schema keap_sync: the outbox, the contact map and the stored tokens.
        #[arg(long)]
        drop_schema: bool,
    },
    /// Run the sync daemon until SIGTERM or Ctrl-C.
    Run {
        /// Also enqueue every existing user (resumes an unfinished backfill; a finished one is
        /// not repeated unless `--backfill=restart`).
        #[arg(long, value_enum, num_args = 0..=1, require_equals = true, default_missing_value = "resume")]
        backfill: Option<BackfillArg>,
        /// Claim nothing and send nothing: log, for each change as it arrives, the calls that
        /// would be made (like `preview`, continuously).
        #[arg(long, conflicts_with = "backfill")]
        dry_run: bool,
    },
    /// Show, per user, the Keap calls a sync would make and their JSON (create-or-update,
    /// update of which properties, tag changes, or nothing) and any problem, without calling
    /// Keap's write endpoints or changing anything. Without keys or --all: the pending changes.
    Preview {
        /// User keys (the users table's key column) to preview.
        #[arg(conflicts_with = "all")]
        user_keys: Vec<String>,
        /// Every user of the table, in key order.
        #[arg(long)]
        all: bool,
        /// At most this many users (default with --all: every one; for pending changes: 100).
        #[arg(long)]
        limit: Option<u64>,
        /// One JSON array instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Compare Keap with the table: list Keap's contacts into keap-sync's mirror, then report
    /// each user that is not in sync (an owned property that differs in Keap, a contact gone,
    /// no contact yet, parked, two contacts for one address). Changes nothing unless --apply.
    Reconcile {
        /// User keys to compare (default: every user).
        user_keys: Vec<String>,
        /// Queue each repairable user for delivery; the running daemon sends the repair.
        #[arg(long)]
        apply: bool,
        /// Also print each differing property's value in the table and in Keap (personal data).
        #[arg(long)]
        show_values: bool,
        /// One JSON object instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Sync every existing user, then exit (resumable; live changes still go first).
    Backfill {
        /// Start over even if a backfill already finished.
        #[arg(long)]
        restart: bool,
    },
    /// Queue depth, lag, failures, backfill progress, token state and running instances.
    Status {
        /// JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Check every prerequisite of the sync (configuration, database, the role's privileges,
    /// schema, capture triggers, the Keap credential, Keap itself, the names the mapping uses)
    /// and say how to fix what fails. Exits 0 only when no check fails (warnings do not).
    Doctor {
        /// One JSON object instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Write a first configuration from the live users table: its key, and a proposed mapping
    /// of its columns to Keap's contact (each a guess, commented with why), the other columns
    /// listed, commented out. Never overwrites a file without --force; the file written is
    /// checked as `run` would check it.
    Init {
        /// The database (libpq URL or key=value). Better given as DATABASE_URL in the
        /// environment when it holds a password: process lists show arguments. The password is
        /// never written to the file.
        #[arg(long, env = "DATABASE_URL", hide_env_values = true)]
        database_url: String,
        /// The application's users table, as schema.table (names as the database spells them).
        #[arg(long, default_value = "public.users")]
        table: String,
        /// Where to write the configuration.
        #[arg(long, default_value = "keap-sync.toml")]
        out: PathBuf,
        /// Replace the file if it exists.
        #[arg(long)]
        force: bool,
    },
    /// Manage the Keap OAuth grant.
    #[command(subcommand)]
    Auth(AuthCommand),
    /// See and replay changes Keap rejected (or that could not be mapped).
    #[command(subcommand)]
    Failures(FailuresCommand),
    /// Keap's REST hooks that feed the receiver (`[hooks]`): install, status, verify, uninstall.
    #[command(subcommand)]
    Hooks(hooks::HooksCommand),
    /// Print the completion script for a shell, e.g. `keap-sync completions bash >
    /// /etc/bash_completion.d/keap-sync` (the Debian package installs them).
    Completions {
        /// The shell.
        shell: clap_complete::Shell,
    },
    /// Print the man page (roff), keap-sync(1).
    #[command(hide = true)]
    Manpage,
}

#[derive(Debug, Subcommand)]
enum FailuresCommand {
    /// List parked changes with the reason, Keap's answer and the payload sent.
    List {
        /// One JSON array instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Try parked changes again now (after fixing the cause in Keap or in the row).
    Retry {
        /// The user key (the users table's key column) to retry.
        #[arg(required_unless_present = "all", conflicts_with = "all")]
        user_key: Option<String>,
        /// Retry every parked change.
        #[arg(long)]
        all: bool,
        /// Print the result as JSON.
        #[arg(long)]
        json: bool,
    },
}

/// `--backfill=resume|restart` (clap's spelling of [`BackfillMode`]).
#[derive(Debug, Clone, Copy, ValueEnum)]
enum BackfillArg {
    Resume,
    Restart,
}

impl From<BackfillArg> for BackfillMode {
    fn from(m: BackfillArg) -> Self {
        match m {
            BackfillArg::Resume => BackfillMode::Resume,
            BackfillArg::Restart => BackfillMode::Restart,
        }
    }
}

#[derive(Debug, Subcommand)]
enum AuthCommand {
    /// Store a token response (JSON with access_token, refresh_token, expires_in) read from
    /// standard input. Tokens never go on the command line, where process lists show them.
    Import {
        /// Accept a grant for another Keap app than the stored one: forget the links to the
        /// old app's contacts (with every daemon stopped), then run `keap-sync backfill --restart`.
        #[arg(long)]
        switch_account: bool,
    },
    /// Authorise via the browser (authorization-code flow) and store the grant.
    Login {
        /// Receive the redirect on this loopback address instead of pasting it, e.g.
        /// 127.0.0.1:8700 (behind the HTTPS redirect URL registered with Keap).
        #[arg(long)]
        listen: Option<std::net::SocketAddr>,
        /// Accept a grant for another Keap app than the stored one: forget the links to the
        /// old app's contacts (with every daemon stopped), then run `keap-sync backfill --restart`.
        #[arg(long)]
        switch_account: bool,
    },
    /// Show which credential is in use and the state of the stored grant (never a secret).
    Status,
}

/// An error for the operator, plus the exit code it maps to.
#[derive(Debug, thiserror::Error)]
enum CliError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Db(#[from] DbError),
    #[error(transparent)]
    Schema(#[from] SchemaError),
    #[error(transparent)]
    Run(#[from] RunError),
    #[error("{0}")]
    Other(String),
}

impl CliError {
    /// The exit code: 2 for a configuration error, 1 for any other failure.
    fn exit_code(&self) -> u8 {
        match self {
            CliError::Config(_) | CliError::Run(RunError::Config(_)) => 2,
            _ => 1,
        }
    }
}

/// Parses the arguments, runs the command, prints a one-line error on failure. The whole
/// `keap-sync` binary is this function.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    // `backfill` on a terminal draws a progress line; routine log lines would only break it.
    let progress_bar = matches!(cli.command, Command::Backfill { .. }) && std::io::stderr().is_terminal();
    init_logging(cli.log_format, if progress_bar { "warn" } else { "info" });
    // One thread: the work is waiting on Postgres and Keap, and a multi-threaded runtime spent
    // most of the daemon's CPU waking its workers for each other (futex and scheduler time in
    // `perf`: `cargo bench --bench perf -- --profile DIR`). Nothing here blocks the thread for long.
    let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(dispatch(cli, progress_bar)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {}", one_line(&e.to_string()));
            ExitCode::from(e.exit_code())
        }
    }
}

/// `s` with every run of whitespace, line breaks included, made one space, so an error prints on one
/// line.
fn one_line(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// Logs to stderr at `KEAP_SYNC_LOG`'s level, else `default_level`: with journal priorities under
/// systemd, in colour only at a terminal, or as JSON.
fn init_logging(format: LogFormat, default_level: &str) {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_env("KEAP_SYNC_LOG").unwrap_or_else(|_| EnvFilter::new(default_level));
    let builder =
        tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).with_target(false);
    let _ = match format {
        // Under systemd, stderr goes to the journal: syslog priority prefixes give it levels,
        // and it adds its own timestamps.
        LogFormat::Human if crate::systemd::stderr_is_journal() => {
            builder.with_ansi(false).event_format(crate::systemd::JournalFormat).try_init()
        }
        // Colour only for a person at a terminal: a log file or a pipe gets plain text.
        LogFormat::Human => builder.with_ansi(std::io::stderr().is_terminal()).try_init(),
        LogFormat::Json => builder.with_ansi(false).json().flatten_event(true).try_init(),
    };
}

/// The configuration: the `--config` file if given, then the process environment.
fn load(cli_config: &Option<PathBuf>) -> Result<Config, ConfigError> {
    Config::load(cli_config.as_deref(), &|name| std::env::var(name).ok())
}

/// Runs the command given; `preview` without keys or `--all` shows up to 100 pending users.
async fn dispatch(cli: Cli, progress_bar: bool) -> Result<(), CliError> {
    match cli.command {
        Command::Migrate => migrate(load(&cli.config)?).await,
        Command::Uninstall { drop_schema } => uninstall(load(&cli.config)?, drop_schema).await,
        Command::Run { dry_run: true, .. } => {
            Ok(crate::preview::dry_run(load(&cli.config)?, stop_signal()).await.map_err(preview_error)?)
        }
        Command::Preview { user_keys, all, limit, json } => {
            let which = if all {
                Selection::All(limit)
            } else if user_keys.is_empty() {
                Selection::Pending(limit.unwrap_or(100))
            } else {
                Selection::Keys(user_keys)
            };
            preview(load(&cli.config)?, &which, json).await
        }
        Command::Run { backfill, .. } => {
            let options = RunOptions { backfill: backfill.map(Into::into), ..RunOptions::default() };
            Ok(Daemon::build(load(&cli.config)?, options).await?.run(stop_signal()).await?)
        }
        Command::Backfill { restart } => {
            let mode = if restart { BackfillMode::Restart } else { BackfillMode::Resume };
            backfill(load(&cli.config)?, mode, progress_bar).await
        }
        Command::Reconcile { user_keys, apply, show_values, json } => {
            let options = crate::reconcile::ReconcileOptions { apply, show_values };
            reconcile::run(load(&cli.config)?, &user_keys, options, json).await
        }
        Command::Status { json } => status(load(&cli.config)?, json).await,
        Command::Doctor { json } => doctor(load(&cli.config), cli.config.as_deref(), json).await,
        Command::Init { database_url, table, out, force } => {
            let request =
                crate::init::Request { url: Secret::new(database_url), table: &table, out: &out, force };
            init(&request).await
        }
        Command::Auth(AuthCommand::Import { switch_account }) => {
            auth::import(load(&cli.config)?, switch_account).await
        }
        Command::Auth(AuthCommand::Login { listen, switch_account }) => {
            auth::login(load(&cli.config)?, listen, switch_account).await
        }
        Command::Auth(AuthCommand::Status) => auth::status(load(&cli.config)?).await,
        Command::Failures(cmd) => failures::run(load(&cli.config)?, cmd).await,
        Command::Hooks(cmd) => hooks::run(load(&cli.config)?, cmd).await,
        Command::Completions { shell } => generate::completions(shell).map_err(|e| output(&e)),
        Command::Manpage => generate::manpage().map_err(|e| output(&e)),
    }
}

/// Standard output could not be written (a closed pipe, a full disk).
fn output(e: &std::io::Error) -> CliError {
    CliError::Other(format!("cannot write to standard output: {e}"))
}

/// `keap-sync backfill`: the daemon, told to stop once the backfill is delivered, and on a
/// terminal a progress line drawn from `keap_sync.backfill` every half second.
async fn backfill(config: Config, mode: BackfillMode, progress_bar: bool) -> Result<(), CliError> {
    let options = RunOptions { backfill: Some(mode), exit_when_backfilled: true };
    let daemon = Daemon::build(config.clone(), options).await?;
    if !progress_bar {
        return Ok(daemon.run(stop_signal()).await?);
    }
    let client = connect_migrated(&config).await?;
    let run = daemon.run(stop_signal());
    tokio::pin!(run);
    let mut last: Option<(Instant, i64)> = None;
    loop {
        tokio::select! {
            result = &mut run => {
                if let Ok(Some(p)) = backfill::progress(&client).await {
                    eprintln!("\rbackfill: {}   ", render::progress(&p, 0.0));
                }
                return Ok(result?);
            }
            _ = tokio::time::sleep(Duration::from_millis(500)) => {}
        }
        let Ok(Some(p)) = backfill::progress(&client).await else { continue };
        let now = Instant::now();
        let rate = match last {
            Some((t, done)) if now > t => (p.delivered() - done) as f64 / (now - t).as_secs_f64(),
            _ => 0.0,
        };
        if last.is_none_or(|(t, _)| now - t >= Duration::from_secs(5)) {
            last = Some((now, p.delivered()));
        }
        match p.state {
            BackfillState::Running => eprint!("\rbackfill: enqueued {} users…   ", p.enqueued),
            _ => eprint!("\rbackfill: {}   ", render::progress(&p, rate)),
        }
    }
}

/// Prints what delivery would do for the selected users, as text or as JSON.
async fn preview(config: Config, which: &Selection, json: bool) -> Result<(), CliError> {
    let plans = crate::preview::preview(&config, which).await.map_err(preview_error)?;
    if json {
        println!("{}", serde_json::to_string_pretty(&plans).map_err(|e| CliError::Other(e.to_string()))?);
    } else {
        print!("{}", render::plans(&plans));
    }
    Ok(())
}

/// A preview's failure as the command's error; a configuration error keeps its exit code.
fn preview_error(e: PreviewError) -> CliError {
    match e {
        PreviewError::Run(e) => CliError::Run(e),
        other => CliError::Other(other.to_string()),
    }
}

/// Applies pending migrations and (re)installs the capture trigger, saying what changed, if anything.
async fn migrate(config: Config) -> Result<(), CliError> {
    let mut client = connect(&config).await?;
    let report =
        schema::migrate_reporting(&mut client, &config.users, &mut |line| eprintln!("{line}")).await?;
    if report.applied.is_empty() && !report.trigger_changed {
        println!(
            "schema keap_sync is up to date; the capture trigger on {} is installed",
            config.users.table
        );
    } else {
        for name in &report.applied {
            println!("applied migration {name}");
        }
        if report.trigger_changed {
            println!("installed the capture trigger on {}", config.users.table);
        }
    }
    Ok(())
}

/// Removes the capture trigger, and with `drop_schema` the whole `keap_sync` schema.
async fn uninstall(config: Config, drop_schema: bool) -> Result<(), CliError> {
    let mut client = connect(&config).await?;
    schema::uninstall(&mut client, &config.users, drop_schema).await?;
    println!("removed the capture trigger from {}", config.users.table);
    if drop_schema {
        println!("dropped schema keap_sync (outbox, contact map, tokens)");
    }
    Ok(())
}

/// Prints the status of the queue, the token and the instances, as text or as JSON.
async fn status(config: Config, json: bool) -> Result<(), CliError> {
    let client = connect_migrated(&config).await?;
    let status = crate::status::read(&client).await?;
    if json {
        println!("{}", serde_json::to_string_pretty(&status).map_err(|e| CliError::Other(e.to_string()))?);
    } else {
        print!("{}", render::status(&status));
    }
    Ok(())
}

/// `keap-sync doctor`: a line per check (or one JSON object), and a failure when a check failed.
async fn doctor(
    loaded: Result<Config, ConfigError>,
    file: Option<&std::path::Path>,
    json: bool,
) -> Result<(), CliError> {
    let report = crate::doctor::examine(loaded, file).await;
    if json {
        let out = serde_json::json!({ "passed": report.passed(), "checks": report.checks });
        println!("{}", serde_json::to_string_pretty(&out).map_err(|e| CliError::Other(e.to_string()))?);
    } else {
        print!("{}", render::doctor(&report));
    }
    if report.passed() {
        return Ok(());
    }
    let failed = report.count(crate::doctor::Outcome::Fail);
    Err(CliError::Other(format!(
        "doctor: {failed} check(s) failed; fix the first one first, then run doctor again"
    )))
}

/// `keap-sync init`: writes the proposed configuration and says what was guessed and what to do next.
async fn init(request: &crate::init::Request<'_>) -> Result<(), CliError> {
    let written = crate::init::init(request).await.map_err(|e| CliError::Other(e.to_string()))?;
    println!(
        "wrote {} for {}: {} guesses ({}); {} other columns listed, commented out",
        written.path.display(),
        request.table,
        written.guesses.len(),
        written.guesses.join(", "),
        written.unused
    );
    println!("it passes the checks `run` makes on a configuration and the table. Next:");
    println!("  review each `# guess:` in it (remove what should not reach Keap)");
    if written.password_elsewhere {
        println!("  set DATABASE_URL, with its password, in the daemon's environment (the file has none)");
    }
    println!("  keap-sync --config {} migrate    (as the table's owner)", written.path.display());
    println!("  keap-sync --config {} doctor", written.path.display());
    Ok(())
}

/// Connects to the configured database.
async fn connect(config: &Config) -> Result<tokio_postgres::Client, CliError> {
    Ok(db::connect(&db::parse(config.database()?)?).await?)
}

/// Connects and checks that `migrate` has run, for commands that read or write keap_sync.
async fn connect_migrated(config: &Config) -> Result<tokio_postgres::Client, CliError> {
    let client = connect(config).await?;
    schema::ensure_current(&client).await?;
    Ok(client)
}

/// Completes on SIGTERM (systemd's stop) or SIGINT (Ctrl-C).
async fn stop_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = ctrl_c => {}
                    _ = term.recv() => {}
                }
            }
            Err(_) => ctrl_c.await,
        }
    }
    #[cfg(not(unix))]
    ctrl_c.await;
    tracing::info!("stop requested");
}
