//! Installing the capture: the generated functions created or replaced and the triggers placed
//! and enabled when they differ from the catalog; `uninstall` removes them.

use tokio_postgres::Client;

use super::capture::{capture_triggers, placements, set_clauses, FunctionDef, Placement};
use super::check::{function_def, installed};
use super::fold::{fold_function, FOLD_FUNCTION, FOLD_SETTINGS};
use super::table::{partitions, UserTable};
use super::{
    SchemaError, APPLY_TRIGGER_NAME, DELETE_TRIGGER_NAME, KEY_TRIGGER_NAME, MIGRATION_LOCK, TRIGGER_NAME,
    TRUNCATE_TRIGGER_NAME, UPDATE_TRIGGER_NAME,
};
use crate::config::UsersConfig;
use crate::db::{quote_ident, quote_literal};

/// Creates the capture triggers and their generated functions unless identical ones are
/// installed (replacing the row trigger of releases before 0010's), and makes them fire
/// `always`. Returns whether anything changed.
///
/// `enable always`: a trigger in the default (`origin`) mode does not fire while
/// `session_replication_role = replica`, which is how a logical replication apply worker and
/// `pg_restore --disable-triggers` write; their changes would never reach Keap.
pub(super) async fn install_trigger(
    tx: &tokio_postgres::Transaction<'_>,
    table: &UserTable,
) -> Result<bool, SchemaError> {
    let mut changed = false;
    let triggers = capture_triggers(table);
    for t in &triggers {
        if function_def(tx, t.function, 0).await? != Some(FunctionDef::generated(t.body.clone(), t.settings))
        {
            tx.batch_execute(&format!(
                "create or replace function {}() returns trigger
language plpgsql
security definer
{}as {}",
                t.function,
                set_clauses(t.settings),
                quote_literal(&t.body)
            ))
            .await?;
            changed = true;
        }
    }
    for p in placements(table, &triggers) {
        changed |= place(tx, &p).await?;
    }
    let fold = fold_function(table);
    if function_def(tx, FOLD_FUNCTION, 1).await? != Some(FunctionDef::generated(fold.clone(), FOLD_SETTINGS))
    {
        tx.batch_execute(&format!(
            "create or replace function {FOLD_FUNCTION}(p_limit integer, out taken integer, out held integer)
language plpgsql
{}as {}",
            set_clauses(FOLD_SETTINGS),
            quote_literal(&fold)
        ))
        .await?;
        changed = true;
    }
    Ok(changed)
}

/// Creates trigger `p` unless it is there calling its function, and enables it as it must be.
/// Returns whether anything changed.
async fn place(tx: &tokio_postgres::Transaction<'_>, p: &Placement) -> Result<bool, SchemaError> {
    let mut changed = false;
    let enabled = match installed(tx, &p.relation, p.name).await? {
        Some(i) if i.args.is_empty() && i.function == p.function && i.before == p.before() => i.enabled,
        other => {
            if other.is_some() {
                tx.batch_execute(&format!("drop trigger {} on {}", quote_ident(p.name), p.relation)).await?;
            }
            tx.batch_execute(&format!(
                "create trigger {} {} execute function {}()",
                quote_ident(p.name),
                p.definition,
                p.function
            ))
            .await?;
            changed = true;
            b'O'
        }
    };
    if enabled != p.enabled {
        tx.batch_execute(&format!(
            "alter table {} enable {} trigger {}",
            p.relation,
            if p.enabled == b'R' { "replica" } else { "always" },
            quote_ident(p.name)
        ))
        .await?;
        changed = true;
    }
    Ok(changed)
}

/// Removes the trigger (the only object on the application's side) and, with `drop_schema`,
/// everything keap-sync stored. Safe to run when nothing is installed.
pub async fn uninstall(
    client: &mut Client,
    users: &UsersConfig,
    drop_schema: bool,
) -> Result<(), SchemaError> {
    let tx = client.transaction().await?;
    tx.execute("select pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK]).await?;
    let (schema, table) = users.schema_and_table();
    let qualified = format!("{}.{}", quote_ident(schema), quote_ident(table));
    let oid = tx
        .query_opt("select pg_catalog.to_regclass($1)::oid", &[&qualified])
        .await?
        .and_then(|r| r.get::<_, Option<u32>>(0));
    if let Some(oid) = oid {
        for partition in partitions(&tx, oid).await? {
            for name in [TRIGGER_NAME, UPDATE_TRIGGER_NAME, DELETE_TRIGGER_NAME, TRUNCATE_TRIGGER_NAME] {
                tx.batch_execute(&format!("drop trigger if exists {} on {partition}", quote_ident(name)))
                    .await?;
            }
        }
        for name in [
            TRIGGER_NAME,
            UPDATE_TRIGGER_NAME,
            DELETE_TRIGGER_NAME,
            KEY_TRIGGER_NAME,
            APPLY_TRIGGER_NAME,
            TRUNCATE_TRIGGER_NAME,
        ] {
            tx.batch_execute(&format!("drop trigger if exists {} on {qualified}", quote_ident(name))).await?;
        }
    }
    if drop_schema {
        tx.batch_execute("drop schema if exists keap_sync cascade").await?;
    }
    tx.commit().await?;
    Ok(())
}
