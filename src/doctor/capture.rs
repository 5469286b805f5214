//! Schema keap_sync at this binary's version (`schema::ensure_current`, which the daemon
//! checks before it starts), and the capture triggers as the daemon's periodic capture check
//! sees them (`schema::trigger_problem`): present on the table and its partitions, enabled
//! always, and generated for exactly the columns the mapping reads.
//!
//! Both are repaired by `keap-sync migrate`, which creates triggers and so must run as the
//! owner of the users table, usually not the daemon's role: the fix says so.

use tokio_postgres::Client;

use super::{Check, Step, CAPTURE, SCHEMA};
use crate::config::Config;
use crate::schema::{self, SchemaError, UserTable};

/// How to run the repair: as the table's owner, whose URL is not the daemon's.
fn migrate_as_owner(table: &str) -> String {
    format!(
        "run `keap-sync migrate` as the owner of {table} (e.g. DATABASE_URL=postgresql://OWNER@HOST/DB \
         keap-sync --config … migrate), then restart the daemon"
    )
}

/// Schema keap_sync has every migration of this binary, and none newer.
pub(super) async fn schema(client: &Client, config: &Config) -> Step<()> {
    let (version, name) = schema::newest_migration();
    match schema::ensure_current(client).await {
        Ok(()) => Step::found(
            Check::ok(SCHEMA, format!("keap_sync is at migration {version} ({name}), this binary's newest")),
            (),
        ),
        Err(e @ SchemaError::TooNew(_)) => Step::failed(Check::fail(
            SCHEMA,
            e.to_string(),
            "install the keap-sync release that migrated this database (or a newer one)",
        )),
        Err(e @ (SchemaError::NotMigrated | SchemaError::Outdated { .. })) => {
            Step::failed(Check::fail(SCHEMA, e.to_string(), migrate_as_owner(&config.users.table)))
        }
        Err(e) => Step::failed(Check::fail(SCHEMA, e.to_string(), "see the server's message")),
    }
}

/// Every capture trigger present, enabled as it must be and watching the mapped columns, and
/// the fold function generated for this configuration.
pub(super) async fn triggers(client: &Client, config: &Config, table: &UserTable) -> Check {
    match schema::trigger_problem(client, table).await {
        Ok(None) => {
            let partitions = match table.partitions.len() {
                0 => String::new(),
                n => format!(" and its {n} partitions"),
            };
            Check::ok(
                CAPTURE,
                format!(
                    "installed on {}{partitions}, enabled always (the logical replication one for replica), \
                     watching {}",
                    config.users.table,
                    table.synced.join(", ")
                ),
            )
        }
        Ok(Some(problem)) => Check::fail(CAPTURE, problem, migrate_as_owner(&config.users.table)),
        Err(e) => Check::fail(CAPTURE, format!("cannot read the triggers: {e}"), "see the server's message"),
    }
}
