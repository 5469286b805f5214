//! `keap-sync failures list|retry`: shows parked changes with Keap's answer and the payload
//! sent, and replays them. What a parked change is lives in `crate::failures`.

use super::{connect_migrated, CliError, FailuresCommand};
use crate::config::Config;
use crate::failures;

/// Runs `failures list` or `failures retry`.
pub(super) async fn run(config: Config, cmd: FailuresCommand) -> Result<(), CliError> {
    let client = connect_migrated(&config).await?;
    match cmd {
        FailuresCommand::List { json } => {
            let parked = failures::list(&client).await?;
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
                Some(k) => failures::Which::User(k),
                None => failures::Which::All,
            };
            let n = failures::retry(&client, &which).await?;
            if json {
                println!("{}", serde_json::json!({ "retried": n }));
            } else if n == 0 {
                if let failures::Which::User(k) = &which {
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
