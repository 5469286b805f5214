//! `keap-sync hooks install|status|verify|uninstall`: Keap's REST hook subscriptions that feed
//! the receiver (`[hooks]`). The URL Keap calls is `--base-url` (where the reverse proxy
//! reaches the receiver) followed by the configured secret path, so the secret never goes on
//! a command line; every URL printed has the path masked. The calls go through the
//! configuration's client and limiter and are counted in `keap_sync.quota_usage` one by one,
//! as `preview` and `doctor` count theirs; what was reserved and not used is given back.

use clap::Subcommand;

use super::CliError;
use crate::access::KeapAccess;
use crate::config::{Config, HooksConfig};
use crate::db;
use crate::hooks::{self, HookApi, HookError, Survey};
use crate::ratelimit::Reserving;
use crate::schema;

#[derive(Debug, Subcommand)]
pub(super) enum HooksCommand {
    /// Subscribe the receiver to contact.add, contact.edit and contact.delete (each once; a
    /// hook already there is kept) and verify them. Refused while the receiver (`keap-sync run`
    /// with `[hooks] listen`) does not answer.
    Install {
        /// The public https:// URL at which the reverse proxy reaches the receiver, without the
        /// secret path (keap-sync appends it), e.g. `https://hooks.example.com`.
        #[arg(long, env = "KEAP_SYNC_HOOK_BASE_URL")]
        base_url: String,
    },
    /// List our hooks (event key, state, URL with the path masked) and count the others; exits
    /// non-zero unless every one of ours is Verified.
    Status {
        /// One JSON object instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Run Keap's handshake again for each of our hooks (the way out of Inactive).
    Verify,
    /// Delete our hooks (those at the receiver's secret path); other hooks are left alone.
    Uninstall,
}

/// Runs one `hooks` command with the configuration's Keap access, its calls counted.
pub(super) async fn run(config: Config, cmd: HooksCommand) -> Result<(), CliError> {
    let Some(hooks) = config.hooks.clone() else {
        return Err(CliError::Other(
            "[hooks] listen is not set: configure the receiver (listen, and its secret path) first".into(),
        ));
    };
    let pg = db::parse(config.database()?)?;
    let client = db::connect(&pg).await?;
    schema::ensure_current(&client).await?;
    let access = KeapAccess::build(&config, &pg).map_err(|e| CliError::Other(e.to_string()))?;
    let reserving = Reserving::start_exact(&access.limiter, &pg);
    let result = match access.tokens.auth(&client).await {
        Ok(auth) => {
            let api = HookApi {
                keap: &access.keap,
                auth: &auth,
                timeout: config.keap.request_timeout,
                path: &hooks.path,
                tags: config.users.inbound.tags.is_some(),
            };
            let result = command(&api, &hooks, &cmd).await;
            if let Ok(survey) = &result {
                hooks::record(&client, survey).await?;
            }
            result
        }
        Err(e) => Err(HookError::Keap(e.to_string())),
    };
    drop(reserving);
    access.limiter.give_back(&client).await;
    report(&cmd, result.map_err(|e| CliError::Other(e.to_string()))?)
}

/// The command's calls; the survey of our hooks after it.
async fn command(api: &HookApi<'_>, hooks: &HooksConfig, cmd: &HooksCommand) -> Result<Survey, HookError> {
    match cmd {
        HooksCommand::Install { base_url } => {
            let url = hooks::hook_url(base_url, api.path)?;
            api.check_event_keys().await?;
            hooks::probe(hooks.listen, api.path).await?;
            api.install(&url).await
        }
        HooksCommand::Status { .. } => api.status().await,
        HooksCommand::Verify => api.verify(true).await,
        HooksCommand::Uninstall => {
            let removed = api.uninstall().await?;
            println!("deleted {removed} hook(s) of ours");
            api.status().await
        }
    }
}

/// Prints the survey; an error when a hook of ours is not Verified (after install, status or
/// verify) or one is left (after uninstall).
fn report(cmd: &HooksCommand, survey: Survey) -> Result<(), CliError> {
    if let HooksCommand::Status { json: true } = cmd {
        let text = serde_json::to_string_pretty(&survey).map_err(|e| CliError::Other(e.to_string()))?;
        println!("{text}");
    } else {
        print!("{}", render(&survey));
    }
    match cmd {
        HooksCommand::Uninstall if survey.ours.is_empty() => Ok(()),
        HooksCommand::Uninstall => Err(CliError::Other("some hooks of ours are still there".into())),
        _ if survey.healthy() => Ok(()),
        _ if survey.ours.is_empty() => {
            Err(CliError::Other("no hook of ours: run `keap-sync hooks install --base-url URL`".into()))
        }
        _ => Err(CliError::Other(
            "not every hook of ours is Verified: check that the reverse proxy reaches the receiver, \
             then `keap-sync hooks verify`"
                .into(),
        )),
    }
}

/// A line per hook of ours, then the others' count.
fn render(survey: &Survey) -> String {
    let mut out = String::new();
    for h in &survey.ours {
        out.push_str(&format!("{:<15} {:<10} {}  (key {})\n", h.event_key, h.status, h.url, h.key));
    }
    if survey.ours.is_empty() {
        out.push_str("no hook of ours\n");
    }
    out.push_str(&format!("{} other hook(s) of this Keap app, left alone\n", survey.others));
    out
}
