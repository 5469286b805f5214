//! Migrations: the embedded `sql/` files, applied in order under an advisory lock and a bounded
//! `lock_timeout`, checksummed, and the check that a database is current.

use sha2::{Digest, Sha256};
use tokio_postgres::error::SqlState;
use tokio_postgres::Client;

use super::install::install_trigger;
use super::table::UserTable;
use super::{SchemaError, MIGRATION_LOCK};
use crate::config::UsersConfig;
use crate::db::{quote_ident, DbError};

/// One embedded migration file.
pub(crate) struct Migration {
    pub version: i32,
    pub name: &'static str,
    pub sql: &'static str,
}

/// Every file in `sql/` named `NNNN_*.sql`, in order. A unit test checks this list against the
/// folder, so a new file cannot be forgotten here.
pub(crate) const MIGRATIONS: &[Migration] = &[
    Migration { version: 1, name: "0001_core.sql", sql: include_str!("../../sql/0001_core.sql") },
    Migration {
        version: 2,
        name: "0002_priorities_and_failures.sql",
        sql: include_str!("../../sql/0002_priorities_and_failures.sql"),
    },
    Migration {
        version: 3,
        name: "0003_backfill_and_instances.sql",
        sql: include_str!("../../sql/0003_backfill_and_instances.sql"),
    },
    Migration {
        version: 4,
        name: "0004_key_change_keeps_contact.sql",
        sql: include_str!("../../sql/0004_key_change_keeps_contact.sql"),
    },
    Migration {
        version: 5,
        name: "0005_one_user_one_contact.sql",
        sql: include_str!("../../sql/0005_one_user_one_contact.sql"),
    },
    Migration {
        version: 6,
        name: "0006_grant_account.sql",
        sql: include_str!("../../sql/0006_grant_account.sql"),
    },
    Migration {
        version: 7,
        name: "0007_quota_usage.sql",
        sql: include_str!("../../sql/0007_quota_usage.sql"),
    },
    Migration {
        version: 8,
        name: "0008_capture_truncate.sql",
        sql: include_str!("../../sql/0008_capture_truncate.sql"),
    },
    Migration {
        version: 9,
        name: "0009_queue_counts.sql",
        sql: include_str!("../../sql/0009_queue_counts.sql"),
    },
    Migration {
        version: 10,
        name: "0010_instance_sessions.sql",
        sql: include_str!("../../sql/0010_instance_sessions.sql"),
    },
    Migration {
        version: 11,
        name: "0011_change_log.sql",
        sql: include_str!("../../sql/0011_change_log.sql"),
    },
    Migration {
        version: 12,
        name: "0012_create_email_guard.sql",
        sql: include_str!("../../sql/0012_create_email_guard.sql"),
    },
    Migration {
        version: 13,
        name: "0013_parks_that_clear.sql",
        sql: include_str!("../../sql/0013_parks_that_clear.sql"),
    },
    Migration {
        version: 14,
        name: "0014_held_token_answer.sql",
        sql: include_str!("../../sql/0014_held_token_answer.sql"),
    },
    Migration { version: 15, name: "0015_mirror.sql", sql: include_str!("../../sql/0015_mirror.sql") },
    Migration {
        version: 16,
        name: "0016_reconcile_counts.sql",
        sql: include_str!("../../sql/0016_reconcile_counts.sql"),
    },
    Migration {
        version: 17,
        name: "0017_contact_gone.sql",
        sql: include_str!("../../sql/0017_contact_gone.sql"),
    },
    Migration {
        version: 18,
        name: "0018_mirror_email_index.sql",
        sql: include_str!("../../sql/0018_mirror_email_index.sql"),
    },
    Migration { version: 19, name: "0019_inbound.sql", sql: include_str!("../../sql/0019_inbound.sql") },
    Migration {
        version: 20,
        name: "0020_hook_queue.sql",
        sql: include_str!("../../sql/0020_hook_queue.sql"),
    },
    Migration {
        version: 21,
        name: "0021_gone_check.sql",
        sql: include_str!("../../sql/0021_gone_check.sql"),
    },
    Migration {
        version: 22,
        name: "0022_hook_state.sql",
        sql: include_str!("../../sql/0022_hook_state.sql"),
    },
    Migration { version: 23, name: "0023_conflict.sql", sql: include_str!("../../sql/0023_conflict.sql") },
    Migration {
        version: 24,
        name: "0024_hook_changed_at.sql",
        sql: include_str!("../../sql/0024_hook_changed_at.sql"),
    },
    Migration {
        version: 25,
        name: "0025_inbound_history.sql",
        sql: include_str!("../../sql/0025_inbound_history.sql"),
    },
];

/// What `migrate` did, for the operator.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct MigrateReport {
    /// The migration files applied by this run, in order.
    pub applied: Vec<String>,
    /// Whether the capture trigger was (re)installed.
    pub trigger_changed: bool,
}

/// A migration's SHA-256 in hex: an applied migration whose SQL has since changed is refused.
fn checksum(sql: &str) -> String {
    let digest = Sha256::digest(sql.as_bytes());
    digest.iter().map(|b| format!("{b:02x}")).collect()
}

/// How long one `migrate` attempt waits for a lock (`lock_timeout`). `create trigger` needs a
/// lock on the users table that conflicts with every write: queued behind a long transaction,
/// it would hold up every application write behind it for as long as that transaction lasts.
/// With the timeout, writes wait at most this long, then the attempt gives way.
pub(crate) const MIGRATE_LOCK_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);
/// How many attempts `migrate` makes before it gives up...
pub(crate) const MIGRATE_ATTEMPTS: u32 = 12;
/// ...and the pause between them, in which the writes that queued behind it go through.
const MIGRATE_PAUSE: std::time::Duration = std::time::Duration::from_secs(1);

/// Applies pending migrations and installs (or updates) the capture trigger, all in one
/// transaction under an advisory lock. Running it again changes nothing. Waiting for a lock is
/// logged (see [`migrate_reporting`]).
pub async fn migrate(client: &mut Client, users: &UsersConfig) -> Result<MigrateReport, SchemaError> {
    migrate_reporting(client, users, &mut |line| tracing::warn!("{line}")).await
}

/// [`migrate`], telling `report` what it waits for: each attempt waits at most
/// `MIGRATE_LOCK_TIMEOUT` for a lock, then rolls back, names who holds it (pid, application,
/// state, age: never the query text, which may hold user data), pauses and tries again, up to
/// `MIGRATE_ATTEMPTS` times.
pub async fn migrate_reporting(
    client: &mut Client,
    users: &UsersConfig,
    report: &mut (dyn FnMut(&str) + Send),
) -> Result<MigrateReport, SchemaError> {
    let mut attempt = 1;
    loop {
        match migrate_once(client, users).await {
            Err(SchemaError::Db(DbError::Query(e))) if e.code() == Some(&SqlState::LOCK_NOT_AVAILABLE) => {
                let holder = lock_holder(client, users).await?;
                if attempt >= MIGRATE_ATTEMPTS {
                    return Err(SchemaError::LockBusy {
                        attempts: attempt,
                        timeout_secs: MIGRATE_LOCK_TIMEOUT.as_secs(),
                        holder,
                    });
                }
                report(&format!(
                    "{holder}; gave way after {} s so application writes go on, trying again ({} of {MIGRATE_ATTEMPTS})",
                    MIGRATE_LOCK_TIMEOUT.as_secs(),
                    attempt + 1
                ));
                attempt += 1;
                tokio::time::sleep(MIGRATE_PAUSE).await;
            }
            other => return other,
        }
    }
}

/// Who holds a lock `migrate` may need: the oldest other transaction holding one on the users
/// table or in schema keap_sync.
async fn lock_holder(client: &Client, users: &UsersConfig) -> Result<String, SchemaError> {
    let (schema, table) = users.schema_and_table();
    let qualified = format!("{}.{}", quote_ident(schema), quote_ident(table));
    let row = client
        .query_opt(
            "select l.relation::regclass::text, a.pid,
                    coalesce(nullif(a.application_name, ''), a.usename::text, 'unknown'),
                    coalesce(a.state, 'unknown'),
                    coalesce(extract(epoch from now() - a.xact_start)::int8, 0)
               from pg_catalog.pg_locks l
               join pg_catalog.pg_stat_activity a on a.pid = l.pid
              where l.granted and l.locktype = 'relation' and l.pid <> pg_catalog.pg_backend_pid()
                and (l.relation = pg_catalog.to_regclass($1)
                     or l.relation in (select c.oid from pg_catalog.pg_class c
                                         join pg_catalog.pg_namespace n on n.oid = c.relnamespace
                                        where n.nspname = 'keap_sync'))
              order by a.xact_start nulls last
              limit 1",
            &[&qualified],
        )
        .await?;
    Ok(match row {
        Some(r) => {
            let (relation, pid, app, state, age): (String, i32, String, String, i64) =
                (r.get(0), r.get(1), r.get(2), r.get(3), r.get(4));
            format!("waiting for a lock on {relation} held by pid {pid} ({app}, {state}, transaction open for {age} s)")
        }
        None => "waiting for a lock held by another session (another `keap-sync migrate`?)".to_owned(),
    })
}

/// One attempt of [`migrate`], with a `lock_timeout`.
async fn migrate_once(client: &mut Client, users: &UsersConfig) -> Result<MigrateReport, SchemaError> {
    let tx = client.transaction().await?;
    tx.batch_execute(&format!("set local lock_timeout = '{}ms'", MIGRATE_LOCK_TIMEOUT.as_millis())).await?;
    // A migration step may rewrite a large table (0005 builds unique indexes): the connection's
    // statement_timeout guards the daemon's hot statements, not this one. Lock waits stay bounded.
    tx.batch_execute("set local statement_timeout = 0").await?;
    tx.execute("select pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK]).await?;
    tx.batch_execute(
        "create schema if not exists keap_sync;
         create table if not exists keap_sync.schema_migrations (
             version     integer     primary key,
             name        text        not null,
             checksum    text        not null,
             applied_at  timestamptz not null default now()
         );",
    )
    .await?;

    let applied = tx
        .query("select version, name, checksum from keap_sync.schema_migrations order by version", &[])
        .await?;
    let newest_known = MIGRATIONS.last().map_or(0, |m| m.version);
    let mut report = MigrateReport::default();
    for row in &applied {
        let version: i32 = row.get(0);
        if version > newest_known {
            return Err(SchemaError::TooNew(version));
        }
    }
    for m in MIGRATIONS {
        let sum = checksum(m.sql);
        match applied.iter().find(|r| r.get::<_, i32>(0) == m.version) {
            Some(row) => {
                let have: String = row.get(2);
                if have != sum {
                    return Err(SchemaError::ChecksumMismatch {
                        name: m.name.into(),
                        applied: have,
                        embedded: sum,
                    });
                }
            }
            None => {
                tx.batch_execute(m.sql).await?;
                tx.execute(
                    "insert into keap_sync.schema_migrations (version, name, checksum) values ($1, $2, $3)",
                    &[&m.version, &m.name, &sum],
                )
                .await?;
                report.applied.push(m.name.to_owned());
            }
        }
    }

    // Resolve inside the transaction so a missing table/column aborts the whole migration.
    let table = UserTable::resolve(&tx, users).await?;
    report.trigger_changed = install_trigger(&tx, &table).await?;
    tx.commit().await?;
    Ok(report)
}

/// The newest migration this binary has (version and file name): the one
/// [`ensure_current`] requires.
pub(crate) fn newest_migration() -> (i32, &'static str) {
    MIGRATIONS.last().map_or((0, ""), |m| (m.version, m.name))
}

/// Checks that every embedded migration is applied, for commands that must not run on an
/// outdated schema (the daemon checks this before it starts).
pub(crate) async fn ensure_current(client: &Client) -> Result<(), SchemaError> {
    let exists: bool = client
        .query_one("select pg_catalog.to_regclass('keap_sync.schema_migrations') is not null", &[])
        .await?
        .get(0);
    if !exists {
        return Err(SchemaError::NotMigrated);
    }
    let have: i32 = client
        .query_one("select coalesce(max(version), 0) from keap_sync.schema_migrations", &[])
        .await?
        .get(0);
    let want = MIGRATIONS.last().map_or(0, |m| m.version);
    if have < want {
        return Err(SchemaError::Outdated { have, want });
    }
    if have > want {
        return Err(SchemaError::TooNew(have));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_sql_file_is_embedded_in_order() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("sql");
        let mut files: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .filter_map(|e| e.ok())
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n.len() > 5 && n[..4].chars().all(|c| c.is_ascii_digit()) && n.ends_with(".sql"))
            .collect();
        files.sort();
        let embedded: Vec<&str> = MIGRATIONS.iter().map(|m| m.name).collect();
        assert_eq!(files, embedded);
        for (i, m) in MIGRATIONS.iter().enumerate() {
            assert_eq!(m.version as usize, i + 1);
            assert!(m.name.starts_with(&format!("{:04}_", m.version)));
        }
    }
}
