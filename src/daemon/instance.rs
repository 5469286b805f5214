//! One process's life as an instance: sessions one after another (a lost connection ends
//! one, the next starts after a backoff), the delivery lock that makes one instance deliver
//! and the others wait as standbys, the heartbeat in `keap_sync.instances`, and the end of
//! a session (deliveries in flight given their grace, then their claims released).

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Notify;
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_postgres::Client;
use tokio_util::sync::CancellationToken;

use crate::db::{self, DbError};
use crate::deliver::{Deliverer, Outcome};
use crate::outbox::recorder::Recorder;
use crate::outbox::{self, ClaimTiming};
use crate::status::InstanceRole;

use super::session::Session;
use super::Context;

/// How often a standby instance tries to take over deliveries.
const STANDBY_RECHECK: Duration = Duration::from_secs(2);

/// Session-level advisory lock held by the delivering instance (defined in `db`).
const DELIVERY_LOCK: i64 = db::DELIVERY_LOCK;

impl Context {
    /// Sessions, one after another, until `stop`: a lost connection ends a session and the
    /// next starts after a backoff.
    pub(super) async fn deliver_until_stopped(&self, first: Client, stop: &CancellationToken) {
        let mut client = Some(first);
        let mut failures = 0u32;
        loop {
            let started = Instant::now();
            let result = self.session(client.take(), stop).await;
            if stop.is_cancelled() {
                return;
            }
            self.notifier.watchdog();
            self.notifier.status("database connection lost; reconnecting");
            let Err(e) = result else { continue };
            // A session that ran a while before failing starts the backoff afresh.
            failures = if started.elapsed() > Duration::from_secs(60) { 1 } else { failures + 1 };
            let delay = db::reconnect_delay(failures);
            if e.is_connection_lost() {
                tracing::warn!(error = %e, retry_in_ms = delay.as_millis() as u64, "database connection lost; reconnecting");
            } else {
                tracing::error!(error = %e, retry_in_ms = delay.as_millis() as u64, "database query failed; retrying");
            }
            tokio::select! {
                _ = tokio::time::sleep(delay) => {}
                _ = stop.cancelled() => return,
            }
        }
    }

    /// One connected stretch: LISTEN, drain, deliver until the connection drops or a stop is
    /// requested. Returns `Ok` only on a stop.
    pub(super) async fn session(
        &self,
        client: Option<Client>,
        stop: &CancellationToken,
    ) -> Result<(), DbError> {
        let wake = Arc::new(Notify::new());
        let listener = db::connect_listener(&self.pg, db::NOTIFY_CHANNEL, Arc::clone(&wake)).await?;
        let client = match client {
            Some(c) => c,
            None => db::connect(&self.pg).await?,
        };
        let db = Arc::new(db::Db::new(client));
        // Claims this process held in an earlier session have no task any more.
        outbox::release_all(&db, &self.instance, self.in_flight_grace()).await?;
        if !self.wait_for_delivery_lock(&listener, &db, stop).await? {
            self.leave(&db).await;
            return Ok(());
        }
        let deliverer = Arc::new(Deliverer {
            recorder: Recorder::start(Arc::clone(&db), self.instance.clone()),
            db: Arc::clone(&db),
            keap: self.keap.clone(),
            tokens: Arc::clone(&self.tokens),
            delivery: self.config.delivery.clone(),
            instance: self.instance.clone(),
            metrics: Arc::clone(&self.metrics),
            mapper: Arc::clone(&self.mapper),
            catalog: Arc::clone(&self.catalog),
            lookups: crate::mirror::Lookups::new(&self.config.mirror, self.config.keap.request_timeout),
            table: Arc::new(self.table.clone()),
            remember_writes: self.config.hooks.is_some(),
        });
        self.metrics.set_db_connected(true);
        tracing::info!("listening for changes; draining the outbox");
        let mut session = Session {
            ctx: self,
            db,
            listener,
            wake,
            deliverer,
            tasks: JoinSet::new(),
            paused: None,
            refusal: None,
            lost: None,
            token_checked: None,
            beat: None,
            capture: None,
            capture_checked: None,
            fold_due: true,
            next_fold: Instant::now(),
            next_sweep: Instant::now() + self.config.mirror.sweep.unwrap_or_default(),
            next_report: Instant::now(),
            hooks_due: true,
            next_hook_check: Instant::now(),
            next_watch: Instant::now(),
            hook_watch: Arc::default(),
        };
        let result = session.deliver(stop).await;
        self.metrics.set_db_connected(false);
        self.finish(&session.db, &session.deliverer.recorder, &mut session.tasks, result.is_ok()).await;
        if result.is_ok() {
            // Stopping, and no delivery is left: today's unused call reservations go back.
            self.limiter.give_back(&session.db).await;
            self.leave(&session.db).await;
        }
        result
    }

    /// Only one instance delivers at a time, so the rate limit holds for the whole deployment:
    /// the holder of a session-level advisory lock on the LISTEN connection. The others stand
    /// by and take over within [`STANDBY_RECHECK`] of the holder's connection closing (a crashed
    /// holder's lock goes with its connection). Returns false if a stop came while waiting.
    pub(super) async fn wait_for_delivery_lock(
        &self,
        listener: &db::Listener,
        db: &Client,
        stop: &CancellationToken,
    ) -> Result<bool, DbError> {
        let mut announced = false;
        loop {
            let got: bool =
                listener.client.query_one("select pg_try_advisory_lock($1)", &[&DELIVERY_LOCK]).await?.get(0);
            if got {
                if announced {
                    tracing::info!("took over deliveries");
                }
                return Ok(true);
            }
            if !announced {
                tracing::info!("another instance is delivering; standing by to take over");
                announced = true;
            }
            self.heartbeat(db, InstanceRole::Standby, None).await?;
            self.notifier.watchdog();
            self.mark_ready();
            tokio::select! {
                _ = tokio::time::sleep(STANDBY_RECHECK) => {}
                _ = stop.cancelled() => return Ok(false),
            }
        }
    }

    /// Records this instance as alive, for `keap-sync status`, and refreshes the queue gauges
    /// and the systemd STATUS line.
    pub(super) async fn heartbeat(
        &self,
        db: &Client,
        role: InstanceRole,
        paused: Option<&str>,
    ) -> Result<(), DbError> {
        let report = self.limiter.report();
        // A spent daily quota pauses every sender inside the limiter; say so in status too.
        let quota_pause = match (report.day_available, self.limiter.paused_until()) {
            (Some(0), Some(until)) => Some(format!(
                "Keap's daily quota is used up; deliveries resume when it resets (in {} min)",
                until.saturating_duration_since(Instant::now()).as_secs().div_ceil(60)
            )),
            _ => None,
        };
        let paused = paused.or(quota_pause.as_deref());
        let pid = std::process::id() as i32;
        db.execute(
            "insert into keap_sync.instances
                    (instance, host, pid, role, paused_reason, quota_minute_available, quota_day_available, throttled,
                     backend_pid, backend_start)
             select $1, $2, $3, $4, $5, $6, $7, $8, pid, backend_start
               from pg_catalog.pg_stat_activity where pid = pg_catalog.pg_backend_pid()
             on conflict (instance) do update
                set last_seen = now(), role = excluded.role, paused_reason = excluded.paused_reason,
                    backend_pid = excluded.backend_pid, backend_start = excluded.backend_start,
                    quota_minute_available = excluded.quota_minute_available,
                    quota_day_available = excluded.quota_day_available, throttled = excluded.throttled",
            &[
                &self.instance,
                &self.host,
                &pid,
                &role.as_str(),
                &paused,
                &report.minute_available,
                &report.day_available,
                &i64::from(self.limiter.throttled_total()),
            ],
        )
        .await?;
        db.execute("delete from keap_sync.instances where last_seen < now() - interval '1 day'", &[]).await?;
        if role == InstanceRole::Active {
            crate::status::compact_counts(db).await?;
        }
        let depth = crate::status::depth(db).await?;
        self.notifier.status(&match (role, paused) {
            (InstanceRole::Standby, _) => "standing by: another instance is delivering".to_owned(),
            (_, Some(reason)) => format!("PAUSED: {reason}"),
            _ => format!(
                "delivering; queued: {} live, {} retrying, {} backfill; {} parked",
                depth.live, depth.retry, depth.backfill, depth.parked
            ),
        });
        self.metrics.set_queue(
            depth.live,
            depth.retry,
            depth.backfill,
            depth.parked,
            depth.oldest_pending_age_secs.unwrap_or(0.0),
        );
        self.metrics.set_quota(report.minute_available, report.day_available);
        Ok(())
    }

    /// How long a call that was on the wire when its task ended may still be processed by Keap.
    pub(super) fn in_flight_grace(&self) -> Duration {
        self.config.keap.request_timeout + self.config.keap.connect_timeout
    }

    /// The claim timing: the configured lease, and a change claimed once its user is quiet for
    /// `settle`, or after ten times that at the latest.
    pub(super) fn claim_timing(&self) -> ClaimTiming {
        let d = &self.config.delivery;
        ClaimTiming { lease: d.lease, settle: d.settle, max_settle: d.settle * 10 }
    }

    /// Tells systemd start-up is complete, once however often it is called.
    pub(super) fn mark_ready(&self) {
        if !self.ready.swap(true, Ordering::Relaxed) {
            self.notifier.ready();
        }
    }

    /// Forgets this instance on a clean stop.
    pub(super) async fn leave(&self, db: &Client) {
        let _ = db.execute("delete from keap_sync.instances where instance = $1", &[&self.instance]).await;
    }

    /// Lets deliveries in flight finish. On a stop they get `shutdown_grace`; after a lost
    /// connection their results cannot be recorded anyway, so they are aborted at once. What
    /// is unfinished is released (or, without a connection, left to its lease).
    pub(super) async fn finish(
        &self,
        db: &Client,
        recorder: &Recorder,
        tasks: &mut JoinSet<Outcome>,
        stopping: bool,
    ) {
        if stopping {
            self.notifier.stopping();
        }
        if stopping && !tasks.is_empty() {
            tracing::info!(in_flight = tasks.len(), "stopping: waiting for deliveries in flight");
            let deadline = Instant::now() + self.config.delivery.shutdown_grace;
            while let Ok(Some(_)) = tokio::time::timeout_at(deadline, tasks.join_next()).await {}
        }
        // A delivery aborted here may have its call on the wire: its claim is released only
        // after that call could have finished, so no other instance sends the same user meanwhile.
        let grace = if tasks.is_empty() { Duration::ZERO } else { self.in_flight_grace() };
        tasks.abort_all();
        while tasks.join_next().await.is_some() {}
        // An aborted delivery may have handed its result over: recorded before the release,
        // it is not delivered again. (Bounded: a result stuck behind a locked row is left to
        // the release, and delivered again.)
        let _ = tokio::time::timeout(self.config.delivery.shutdown_grace, recorder.flush()).await;
        match outbox::release_all(db, &self.instance, grace).await {
            Ok(0) => {}
            Ok(n) => tracing::info!(released = n, "released unfinished claims"),
            Err(e) => {
                tracing::debug!(error = %e, "could not release claims; their leases will expire")
            }
        }
    }
}

/// A name for this process's claims: host, pid and a random part (pids repeat across hosts
/// and restarts; the random part keeps a restarted daemon from mistaking old claims for its own).
pub(super) fn instance_id(host: &str) -> String {
    format!("{host}:{}:{:08x}", std::process::id(), rand::random::<u32>())
}

/// This machine's name for the instance id, from `/etc/hostname` where `/proc/sys` is hidden; else
/// "host".
pub(super) fn hostname() -> String {
    // /proc/sys is hidden under the systemd unit's ProcSubset=pid; /etc/hostname is not.
    ["/proc/sys/kernel/hostname", "/etc/hostname"]
        .iter()
        .find_map(|p| std::fs::read_to_string(p).ok().map(|h| h.trim().to_owned()).filter(|h| !h.is_empty()))
        .unwrap_or_else(|| "host".into())
}
