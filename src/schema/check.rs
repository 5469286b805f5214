//! Catalog checks: the installed capture triggers and generated functions compared with what
//! the configuration generates, and what is wrong with capture, phrased for the operator.

use tokio_postgres::GenericClient;

use super::capture::{capture_triggers, placements, FunctionDef};
use super::fold::{fold_function, FOLD_FUNCTION, FOLD_SETTINGS};
use super::table::UserTable;
use super::SchemaError;
use crate::config::UsersConfig;
use crate::db::{quote_literal, DbError};

/// A capture trigger as the catalog has it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Installed {
    pub(super) args: Vec<String>,
    /// `pg_trigger.tgenabled`: `A` always, `O` origin (the default), `R` replica, `D` disabled.
    pub(super) enabled: u8,
    /// The trigger function, as `regproc` prints it (`keap_sync.capture_insert`).
    pub(super) function: String,
    /// Whether it fires before the row is written (`tgtype`'s BEFORE bit).
    pub(super) before: bool,
}

/// The trigger `name` on the users table, if there is one.
pub(super) async fn installed(
    client: &impl GenericClient,
    relation: &str,
    name: &str,
) -> Result<Option<Installed>, SchemaError> {
    let row = client
        .query_opt(
            &format!(
                "select tgargs, tgenabled::text, tgfoid::regproc::text, (tgtype & 2) <> 0 from pg_catalog.pg_trigger where tgrelid = {}::regclass and tgname = $1",
                quote_literal(relation)
            ),
            &[&name],
        )
        .await?;
    Ok(row.map(|row| {
        let raw: Vec<u8> = row.get(0);
        let enabled: String = row.get(1);
        Installed {
            args: raw
                .split(|b| *b == 0)
                .filter(|s| !s.is_empty())
                .map(|s| String::from_utf8_lossy(s).into_owned())
                .collect(),
            enabled: enabled.bytes().next().unwrap_or(b'D'),
            function: row.get(2),
            before: row.get(3),
        }
    }))
}

/// Function `name` taking `args` arguments as installed, if it exists.
pub(super) async fn function_def(
    client: &impl GenericClient,
    name: &str,
    args: i16,
) -> Result<Option<FunctionDef>, SchemaError> {
    let row = client
        .query_opt(
            "select p.prosrc, coalesce(p.proconfig, '{}')
               from pg_catalog.pg_proc p join pg_catalog.pg_namespace n on n.oid = p.pronamespace
              where n.nspname = 'keap_sync' and p.proname = $1 and p.pronargs = $2",
            &[&name.trim_start_matches("keap_sync."), &args],
        )
        .await?;
    Ok(row.map(|r| FunctionDef { body: r.get(0), settings: r.get(1) }))
}

/// True when every capture trigger is installed, enabled `always`, calling its function with
/// the body the config generates.
pub(crate) async fn trigger_installed(
    client: &impl GenericClient,
    table: &UserTable,
) -> Result<bool, SchemaError> {
    Ok(trigger_problem(client, table).await?.is_none())
}

/// What is wrong with the capture triggers, if anything, phrased for the operator; the repair
/// is always `keap-sync migrate`, which callers add in their own words (`doctor` names the role
/// to run it as).
pub(crate) async fn trigger_problem(
    client: &impl GenericClient,
    table: &UserTable,
) -> Result<Option<String>, SchemaError> {
    let triggers = capture_triggers(table);
    for t in &triggers {
        if function_def(client, t.function, 0).await?
            != Some(FunctionDef::generated(t.body.clone(), t.settings))
        {
            return Ok(Some(format!(
                "the capture function {} captures other columns than the config names: changes to users are \
                 not all recorded",
                t.function
            )));
        }
    }
    for p in placements(table, &triggers) {
        let problem = match installed(client, &p.relation, p.name).await? {
            None => "is missing",
            Some(t) if !t.args.is_empty() || t.function != p.function || t.before != p.before() => {
                "is an older kind of trigger"
            }
            Some(t) if t.enabled == b'D' => "is disabled",
            Some(t) if t.enabled != p.enabled && p.enabled == b'R' => {
                "is not `enable replica` (changes applied by logical replication are missed)"
            }
            Some(t) if t.enabled != p.enabled => {
                "is not `enable always` (changes written under session_replication_role = replica are missed)"
            }
            Some(_) => continue,
        };
        let whose = if p.relation == table.qualified {
            String::new()
        } else {
            " (a partition of the users table)".to_owned()
        };
        return Ok(Some(format!(
            "the capture trigger {} on {}{whose} {problem}: changes to users are not all recorded",
            p.name, p.relation
        )));
    }
    if function_def(client, FOLD_FUNCTION, 1).await?
        != Some(FunctionDef::generated(fold_function(table), FOLD_SETTINGS))
    {
        return Ok(Some(format!(
            "the function {FOLD_FUNCTION} is missing or was generated for another configuration: captured \
             changes of {} are not queued for delivery",
            table.qualified
        )));
    }
    Ok(None)
}

/// What is wrong with capture right now, for the daemon's periodic check (`status`,
/// `/healthz`, the log): the table or a configured column gone (renamed or dropped: then no
/// user can be read, so `blocks_reads`), or a capture trigger missing, disabled, or out of
/// step with the config. `None` when all is well.
pub(crate) async fn capture_problem(
    client: &impl GenericClient,
    users: &UsersConfig,
) -> Result<Option<CaptureProblem>, DbError> {
    let table = match UserTable::resolve(client, users).await {
        Ok(t) => t,
        Err(SchemaError::Db(e)) => return Err(e),
        Err(e) => {
            return Ok(Some(CaptureProblem {
                message: format!("capture is broken: {e} (or rename it back), then restart keap-sync"),
                blocks_reads: true,
            }))
        }
    };
    match trigger_problem(client, &table).await {
        Ok(None) => Ok(None),
        Ok(Some(message)) => Ok(Some(CaptureProblem {
            message: format!("capture is broken: {message}; run `keap-sync migrate`"),
            blocks_reads: false,
        })),
        Err(SchemaError::Db(e)) => Err(e),
        Err(e) => Ok(Some(CaptureProblem { message: format!("capture is broken: {e}"), blocks_reads: true })),
    }
}

/// A broken capture, as [`capture_problem`] found it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct CaptureProblem {
    /// What is wrong and the command (or config fix) that repairs it.
    pub(crate) message: String,
    /// A configured column or the table is gone: reading users would fail.
    pub(crate) blocks_reads: bool,
}
