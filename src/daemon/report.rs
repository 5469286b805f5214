//! The drift report on a schedule (`[mirror] reconcile_hours`): the active daemon runs
//! `keap-sync reconcile` without `--apply` ([`reconcile::scheduled`]: a full listing, then every
//! user compared with the mirror), logs one line of counts by class and records them for
//! `status` and `/metrics`. It reports and repairs nothing: no Keap write, no change to the
//! users table, the outbox or the contact map.
//!
//! Started like the sweep ([`Session::sweep_when_idle`]): one of the session's `tasks`, only
//! when no task is in flight, so live changes go first and its calls share the limiter and
//! the day's quota. It runs on a connection of its own: a million users are compared 1,000
//! at a time, statements that would otherwise queue before the deliveries' on the session's
//! pipelined connection; a failure there (or in Keap's listing) is logged and tried again a
//! period later, and never ends the session.

use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use super::session::Session;
use crate::db::{self, DbError};
use crate::deliver::Outcome;
use crate::keap::KeapClient;
use crate::mapping::Mapper;
use crate::metrics::Metrics;
use crate::mirror;
use crate::reconcile::{self, Class, Report};
use crate::schema::UserTable;
use crate::token::TokenSource;

impl Session<'_> {
    /// Starts the scheduled report when it is due and no task is in flight, and returns how
    /// long the loop may wait: until it is due, at most `wait`. It is due a period after the
    /// last whole-table report recorded in `keap_sync.mirror_state` (this instance's, another
    /// one's before a fail-over, or `keap-sync reconcile`'s), so a restart neither repeats it
    /// nor puts it off; a report that failed is tried again a period after it started.
    pub(super) async fn report_when_idle(&mut self, wait: Duration) -> Result<Duration, DbError> {
        let Some(every) = self.ctx.config.mirror.reconcile else { return Ok(wait) };
        let now = Instant::now();
        if now < self.next_report {
            return Ok(wait.min(self.next_report - now));
        }
        if !self.tasks.is_empty() {
            // The end of a task wakes the loop.
            return Ok(wait);
        }
        match reconcile::since_recorded(&self.db).await {
            Ok(Some(since)) if since < every => {
                self.next_report = now + (every - since);
                return Ok(wait.min(every - since));
            }
            Ok(_) => {}
            Err(e) if e.is_connection_lost() => return Err(e),
            Err(e) => {
                tracing::warn!(error = %e, "cannot read when the last drift report ran; trying again at the next period");
                self.next_report = now + every;
                return Ok(wait);
            }
        }
        self.next_report = now + every;
        let task = ReportTask {
            pg: self.ctx.pg.clone(),
            keap: self.ctx.keap.clone(),
            tokens: Arc::clone(&self.ctx.tokens),
            mapper: Arc::clone(&self.ctx.mapper),
            table: self.ctx.table.clone(),
            timeout: self.ctx.config.keap.request_timeout,
            metrics: Arc::clone(&self.ctx.metrics),
            every,
        };
        self.tasks.spawn(task.run());
        Ok(wait.min(every))
    }
}

/// What one scheduled report needs, owned by its task.
struct ReportTask {
    pg: db::Target,
    keap: KeapClient,
    tokens: Arc<TokenSource>,
    mapper: Arc<Mapper>,
    table: UserTable,
    timeout: Duration,
    metrics: Arc<Metrics>,
    /// The period, for the log.
    every: Duration,
}

impl ReportTask {
    /// Runs the report and logs its one line (counts only: no user key, no value), or a
    /// warning. Always [`Outcome::Handled`]: the session's own connection is not this one.
    async fn run(self) -> Outcome {
        let started = Instant::now();
        match self.report().await {
            Ok(r) => {
                let n = |class: Class| r.counts.get(&class).copied().unwrap_or(0);
                tracing::info!(
                    users = r.users,
                    in_sync = r.in_sync,
                    differs = n(Class::Differs),
                    contact_gone = n(Class::ContactGone),
                    no_contact = n(Class::NoContact),
                    unlinked = n(Class::Unlinked),
                    parked = n(Class::Parked),
                    duplicates = n(Class::Duplicates),
                    list_calls = r.listing.pages,
                    contacts = r.listing.contacts,
                    gone_from_keap = r.listing.removed,
                    secs = started.elapsed().as_secs_f64(),
                    "drift report: users compared with Keap, by class (`keap-sync reconcile` names them; `--apply` repairs)"
                );
            }
            Err(e) => tracing::warn!(
                error = %e,
                retry_in_hours = self.every.as_secs_f64() / 3_600.0,
                "the scheduled drift report failed; trying again at the next period"
            ),
        }
        Outcome::Handled
    }

    /// The report on a connection of its own, then the gauges `/metrics` shows updated.
    async fn report(&self) -> Result<Report, String> {
        let client = db::connect(&self.pg).await.map_err(|e| e.to_string())?;
        let keap = mirror::Keap {
            client: &self.keap,
            tokens: &self.tokens,
            timeout: self.timeout,
            retries: mirror::RETRIES,
        };
        let report = reconcile::scheduled(&client, &keap, &self.mapper, &self.table)
            .await
            .map_err(|e| e.to_string())?;
        if let Ok((watermark, drift)) = mirror::gauges(&client).await {
            self.metrics.set_mirror(watermark, &drift);
        }
        Ok(report)
    }
}
