//! The `keap-sync` command line. `main.rs` calls [`main`]; every command is a short function
//! that loads the configuration, does one thing, and returns an error phrased for the operator.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};

use crate::config::{Config, ConfigError};
use crate::daemon::{RunError, RunOptions};
use crate::db::{self, DbError};
use crate::schema::{self, SchemaError};

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
        backfill: Option<BackfillMode>,
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
    /// Try it on a throwaway Postgres and the built-in fake Keap; touches nothing else.
    Demo {
        /// Keep the demo running (and print how to connect with psql) until Ctrl-C.
        #[arg(long)]
        keep_running: bool,
    },
    /// Manage the Keap OAuth grant.
    #[command(subcommand)]
    Auth(AuthCommand),
    /// See and replay changes Keap rejected (or that could not be mapped).
    #[command(subcommand)]
    Failures(FailuresCommand),
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

#[derive(Debug, Clone, Copy, ValueEnum)]
enum BackfillMode {
    Resume,
    Restart,
}

impl From<BackfillMode> for crate::backfill::Mode {
    fn from(m: BackfillMode) -> Self {
        match m {
            BackfillMode::Resume => crate::backfill::Mode::Resume,
            BackfillMode::Restart => crate::backfill::Mode::Restart,
        }
    }
}

#[derive(Debug, Subcommand)]
enum AuthCommand {
    /// Store a token response (JSON with access_token, refresh_token, expires_in) read from
    /// standard input. Tokens never go on the command line, where process lists show them.
    Import,
    /// Authorise via the browser (authorization-code flow) and store the grant.
    Login {
        /// Receive the redirect on this loopback address instead of pasting it, e.g.
        /// 127.0.0.1:8700 (behind the HTTPS redirect URL registered with Keap).
        #[arg(long)]
        listen: Option<std::net::SocketAddr>,
    },
    /// Show which credential is in use and the state of the stored grant (never a secret).
    Status,
}

/// An error for the operator, plus the exit code it maps to.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
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
    fn exit_code(&self) -> u8 {
        match self {
            CliError::Config(_) | CliError::Run(RunError::Config(_)) => 2,
            _ => 1,
        }
    }
}

/// Parses the arguments, runs the command, prints a one-line error on failure.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    // The demo narrates on stdout; its daemon's routine log lines would only interleave.
    let default_level = if matches!(cli.command, Command::Demo { .. }) { "warn" } else { "info" };
    init_logging(cli.log_format, default_level);
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(dispatch(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {}", one_line(&e.to_string()));
            ExitCode::from(e.exit_code())
        }
    }
}

fn one_line(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}

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
        LogFormat::Human => builder.try_init(),
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
    };
}

fn load(cli_config: &Option<PathBuf>) -> Result<Config, ConfigError> {
    Config::load(cli_config.as_deref(), &|name| std::env::var(name).ok())
}

async fn dispatch(cli: Cli) -> Result<(), CliError> {
    match cli.command {
        Command::Migrate => migrate(load(&cli.config)?).await,
        Command::Uninstall { drop_schema } => uninstall(load(&cli.config)?, drop_schema).await,
        Command::Run { backfill } => {
            let config = load(&cli.config)?;
            let options = RunOptions { backfill: backfill.map(Into::into), ..RunOptions::default() };
            Ok(crate::daemon::run_with(config, options, stop_signal()).await?)
        }
        Command::Backfill { restart } => {
            let config = load(&cli.config)?;
            let mode = if restart { crate::backfill::Mode::Restart } else { crate::backfill::Mode::Resume };
            let options = RunOptions {
                backfill: Some(mode),
                exit_when_backfilled: true,
                progress_bar: std::io::IsTerminal::is_terminal(&std::io::stderr()),
            };
            Ok(crate::daemon::run_with(config, options, stop_signal()).await?)
        }
        Command::Status { json } => status(load(&cli.config)?, json).await,
        Command::Demo { keep_running } => crate::demo::run(keep_running).await.map_err(CliError::Other),
        Command::Auth(AuthCommand::Import) => crate::token::cli::import(load(&cli.config)?).await,
        Command::Failures(cmd) => failures(load(&cli.config)?, cmd).await,
        Command::Auth(AuthCommand::Login { listen }) => {
            crate::token::cli::login(load(&cli.config)?, listen).await
        }
        Command::Auth(AuthCommand::Status) => crate::token::cli::status(load(&cli.config)?).await,
    }
}

async fn migrate(config: Config) -> Result<(), CliError> {
    let mut client = connect(&config).await?;
    let report = schema::migrate(&mut client, &config.users).await?;
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

async fn uninstall(config: Config, drop_schema: bool) -> Result<(), CliError> {
    let mut client = connect(&config).await?;
    schema::uninstall(&mut client, &config.users, drop_schema).await?;
    println!("removed the capture trigger from {}", config.users.table);
    if drop_schema {
        println!("dropped schema keap_sync (outbox, contact map, tokens)");
    }
    Ok(())
}

async fn status(config: Config, json: bool) -> Result<(), CliError> {
    let client = connect_migrated(&config).await?;
    let status = crate::status::read(&client).await?;
    if json {
        println!("{}", serde_json::to_string_pretty(&status).map_err(|e| CliError::Other(e.to_string()))?);
    } else {
        print!("{}", crate::status::render(&status));
    }
    Ok(())
}

async fn failures(config: Config, cmd: FailuresCommand) -> Result<(), CliError> {
    let client = connect_migrated(&config).await?;
    match cmd {
        FailuresCommand::List { json } => {
            let parked = crate::failures::list(&client).await?;
            if json {
                let text =
                    serde_json::to_string_pretty(&parked).map_err(|e| CliError::Other(e.to_string()))?;
                println!("{text}");
            } else if parked.is_empty() {
                println!("no parked changes");
            } else {
                for p in &parked {
                    println!(
                        "user {}: parked {} after {} attempt(s): {}",
                        p.user_key,
                        p.parked_at,
                        p.attempts,
                        p.reason.as_deref().unwrap_or("(no reason recorded)")
                    );
                    if let Some(payload) = &p.payload {
                        println!("    sent: {payload}");
                    }
                }
                println!(
                    "{} parked; replay with `keap-sync failures retry USER_KEY` or `--all`",
                    parked.len()
                );
            }
        }
        FailuresCommand::Retry { user_key, all: _, json } => {
            let which = match user_key {
                Some(k) => crate::failures::Which::User(k),
                None => crate::failures::Which::All,
            };
            let n = crate::failures::retry(&client, &which).await?;
            if json {
                println!("{}", serde_json::json!({ "retried": n }));
            } else if n == 0 {
                if let crate::failures::Which::User(k) = &which {
                    return Err(CliError::Other(format!(
                        "user {k} has no parked change (see `keap-sync failures list`)"
                    )));
                }
                println!("no parked changes");
            } else {
                println!("{n} change(s) queued for delivery again");
            }
        }
    }
    Ok(())
}

/// Connects to the configured database.
pub(crate) async fn connect(config: &Config) -> Result<tokio_postgres::Client, CliError> {
    Ok(db::connect(&db::parse(config.database()?)?).await?)
}

/// Connects and checks that `migrate` has run, for commands that read or write keap_sync.
pub(crate) async fn connect_migrated(config: &Config) -> Result<tokio_postgres::Client, CliError> {
    let client = connect(config).await?;
    schema::ensure_current(&client).await?;
    Ok(client)
}

/// Completes on SIGTERM (systemd's stop) or SIGINT (Ctrl-C).
pub async fn stop_signal() {
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
