//! `keap-sync doctor`: every prerequisite of a working sync checked in one run, each with what
//! to do when it is not met.
//!
//! Why a command of its own: without it, an operator learns of a wrong password, a missing
//! grant or a trigger someone disabled from the daemon's log after `systemctl start`, one
//! problem per restart. The checks run in the order a sync depends on them, and a check whose
//! prerequisite failed is not run but reported as skipped, naming that prerequisite, so the
//! first failure is the one to fix:
//!
//! ```text
//!  config ─▶ database ─┬─▶ users table ─▶ privileges ──────────┐ (the grants on keap_sync)
//!                      └─▶ schema ─┬─▶ capture triggers         │  (they need the table too)
//!                                  └─▶ keap credential ─▶ keap ─▶ keap names
//!                                  └─▶ queue                    (both need the grants too)
//! ```
//!
//! Each check reuses what the daemon itself does, so `doctor` cannot pass where `run` would
//! refuse: the configuration as [`Config::load`] validates it, the connection of
//! `db::connect`, the table as `schema::UserTable` resolves it, `schema::ensure_current`, the
//! capture check of `status` and `/healthz`, the token store, the Keap client and limiter of
//! `access::KeapAccess`, and the names as `catalog` resolves them for delivery.
//!
//! What it changes: nothing of the sync. Its Keap calls (reads only: the contact model, tag ids
//! by name) count against the day in `keap_sync.quota_usage` like any call (invariant 19), and
//! getting the OAuth credential refreshes a grant that is due, as any use of it would
//! (the credential's upkeep, invariant 7).
//!
//! No secret is ever part of a check: databases are named by host, port, database and user
//! (`db::Target::describe`), and every message comes from an error type that never quotes a
//! password, token, key or client secret (invariant 11).
//!
//! The files, one per group of checks: the configuration, the connection and the users table
//! (`connection`), the role's grants (`privileges`), schema keap_sync and the triggers
//! (`capture`), the credential, Keap and its names (`keap`), and the queue (`queue`). The CLI
//! prints the [`Report`]; nothing here prints.

use std::path::Path;

use serde::Serialize;

use crate::config::{Config, ConfigError};

mod capture;
mod connection;
mod keap;
mod privileges;
mod queue;

/// The checks' names, in the order they run and are reported.
const CONFIG: &str = "config";
const DATABASE: &str = "database";
const TABLE: &str = "users table";
const PRIVILEGES: &str = "privileges";
const SCHEMA: &str = "schema";
const CAPTURE: &str = "capture triggers";
const CREDENTIAL: &str = "keap credential";
const KEAP: &str = "keap";
const NAMES: &str = "keap names";
const QUEUE: &str = "queue";

/// How one check came out. Only [`Outcome::Fail`] makes `doctor` exit non-zero.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub(crate) enum Outcome {
    /// Met.
    Ok,
    /// Met, but worth changing (a superuser daemon role, a connection without TLS).
    Warn,
    /// Not met: the sync cannot work (fully) until it is fixed.
    Fail,
    /// Not run, because a check it needs failed.
    Skipped,
}

/// One line of the report.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub(crate) struct Check {
    /// What was checked (`database`, `privileges`, …).
    pub(crate) name: &'static str,
    #[serde(rename = "status")]
    pub(crate) outcome: Outcome,
    /// What was found: the facts when met, the problem otherwise, or why it was skipped.
    pub(crate) detail: String,
    /// What to do, for a warning or a failure.
    pub(crate) fix: Option<String>,
}

impl Check {
    /// A check that is met.
    fn ok(name: &'static str, detail: impl Into<String>) -> Check {
        Check { name, outcome: Outcome::Ok, detail: detail.into(), fix: None }
    }

    /// A check that is met with a reservation, and what would lift it.
    fn warn(name: &'static str, detail: impl Into<String>, fix: impl Into<String>) -> Check {
        Check { name, outcome: Outcome::Warn, detail: detail.into(), fix: Some(fix.into()) }
    }

    /// A check that is not met, and the fix.
    fn fail(name: &'static str, detail: impl Into<String>, fix: impl Into<String>) -> Check {
        Check { name, outcome: Outcome::Fail, detail: detail.into(), fix: Some(fix.into()) }
    }

    /// A check not run because `why`.
    fn skipped(name: &'static str, why: &str) -> Check {
        Check { name, outcome: Outcome::Skipped, detail: format!("skipped: {why}"), fix: None }
    }
}

/// A check's line, and what later checks need from it when it was met (a connection, the
/// resolved table), `None` when it was not.
struct Step<T> {
    check: Check,
    found: Option<T>,
}

impl<T> Step<T> {
    /// Met (or warned about), with what later checks use.
    fn found(check: Check, value: T) -> Step<T> {
        Step { check, found: Some(value) }
    }

    /// Not met: later checks that need it are skipped.
    fn failed(check: Check) -> Step<T> {
        Step { check, found: None }
    }
}

/// Every check, in order.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Report {
    pub(crate) checks: Vec<Check>,
}

impl Report {
    /// True unless a check failed: warnings do not fail, and a check is only skipped after
    /// another failed.
    pub(crate) fn passed(&self) -> bool {
        self.checks.iter().all(|c| c.outcome != Outcome::Fail)
    }

    /// How many checks came out as `outcome`.
    pub(crate) fn count(&self, outcome: Outcome) -> usize {
        self.checks.iter().filter(|c| c.outcome == outcome).count()
    }

    /// Records the step's line and hands on what it found.
    fn take<T>(&mut self, step: Step<T>) -> Option<T> {
        self.checks.push(step.check);
        step.found
    }

    /// Records one line.
    fn push(&mut self, check: Check) {
        self.checks.push(check);
    }

    /// Records each of `names` as skipped because `why`.
    fn skip(&mut self, names: &[&'static str], why: &str) {
        self.checks.extend(names.iter().map(|name| Check::skipped(name, why)));
    }
}

/// Runs every check on the configuration as it loaded (`loaded`, from `file` if one was
/// named) and reports each.
pub(crate) async fn examine(loaded: Result<Config, ConfigError>, file: Option<&Path>) -> Report {
    let mut report = Report::default();
    let Some(config) = report.take(connection::config(loaded, file)) else {
        let rest = [DATABASE, TABLE, PRIVILEGES, SCHEMA, CAPTURE, CREDENTIAL, KEAP, NAMES, QUEUE];
        report.skip(&rest, "the configuration did not load");
        return report;
    };
    let Some(db) = report.take(connection::database(&config).await) else {
        let rest = [TABLE, PRIVILEGES, SCHEMA, CAPTURE, CREDENTIAL, KEAP, NAMES, QUEUE];
        report.skip(&rest, "the database was not reached");
        return report;
    };
    if let Err(why) = database_checks(&mut report, &config, &db).await {
        report.skip(&[CREDENTIAL, KEAP, NAMES, QUEUE], why);
        return report;
    }
    let status = crate::status::read(&db.client).await;
    keap::checks(&mut report, &config, &db, status.as_ref().ok()).await;
    report.push(queue::check(&status));
    report
}

/// The checks of the database itself: the users table, the role's grants, the schema and the
/// triggers. `Ok` when schema keap_sync is current and the role may use it, which the Keap
/// and queue checks need; otherwise why not, for their skipped lines.
async fn database_checks(
    report: &mut Report,
    config: &Config,
    db: &connection::Connected,
) -> Result<(), &'static str> {
    let table = report.take(connection::table(&db.client, &config.users).await);
    let grants = match &table {
        Some(table) => report.take(privileges::check(&db.client, &config.users, table).await),
        None => {
            report.skip(&[PRIVILEGES], "the users table did not resolve");
            None
        }
    };
    let current = report.take(capture::schema(&db.client, config).await).is_some();
    match (&table, current) {
        (Some(table), true) => report.push(capture::triggers(&db.client, config, table).await),
        (None, _) => report.skip(&[CAPTURE], "the users table did not resolve"),
        (Some(_), false) => report.skip(
            &[CAPTURE],
            "schema keap_sync is not current (`keap-sync migrate` installs the triggers with it)",
        ),
    }
    if !current {
        return Err(
            "schema keap_sync is not current: the grant, the day's call count and the queue live there",
        );
    }
    match grants {
        Some(g) if g.keap_sync => Ok(()),
        Some(_) => Err(
            "the role cannot use schema keap_sync, where the grant, the day's call count and the queue live",
        ),
        None => Err("the role's grants were not checked"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn warnings_pass_and_a_failure_does_not() {
        let mut report = Report::default();
        report.push(Check::ok(CONFIG, "valid"));
        report.push(Check::warn(PRIVILEGES, "a superuser", "use a least-privilege role"));
        assert!(report.passed());
        report.push(Check::fail(SCHEMA, "one migration behind", "run `keap-sync migrate`"));
        report.skip(&[CAPTURE, QUEUE], "schema keap_sync is not current");
        assert!(!report.passed());
        assert_eq!((report.count(Outcome::Fail), report.count(Outcome::Skipped)), (1, 2));
        assert_eq!(report.checks[3].detail, "skipped: schema keap_sync is not current");
        assert_eq!(report.checks[3].fix, None);
    }

    #[test]
    fn a_check_serializes_as_name_status_detail_fix() {
        let json = serde_json::to_value(Check::fail(DATABASE, "refused", "check the password")).unwrap();
        assert_eq!(
            json,
            serde_json::json!({"name": "database", "status": "fail", "detail": "refused", "fix": "check the password"})
        );
    }
}
