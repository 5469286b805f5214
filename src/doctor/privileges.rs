//! The daemon role's privileges: what it needs (`SELECT` on the key and every column the
//! mapping reads; `SELECT` and `UPDATE` on the columns Keap's data lands in, `[inbound]`'s and
//! the Keap-owned and shared properties'; the use of schema keap_sync, as
//! `sql/role.example.sql` grants it) is a failure when missing, and what it does not need but could do harm with (superuser and the
//! other role attributes, writing or owning the users table) is a warning.
//!
//! Why both: a missing column grant does not stop the daemon from starting (the catalog is
//! readable by every role); each change of a user would then fail to read the row, over and
//! over. A role with more than it needs works, but a leaked password then gives away more
//! than keap-sync, and a role that may drop or disable the capture triggers can silently stop
//! capture.

use tokio_postgres::Client;

use super::{Check, Step, PRIVILEGES};
use crate::config::UsersConfig;
use crate::db::{quote_ident, DbError};
use crate::schema::UserTable;

/// What later checks need to know of the role's grants.
pub(super) struct Grants {
    /// The role may use schema keap_sync as the daemon does (read and write its tables): the
    /// Keap checks count their calls there.
    pub(super) keap_sync: bool,
}

/// What the role lacks and what it has beyond its needs, in words, and the fixes.
#[derive(Default)]
struct Findings {
    missing: Vec<String>,
    fixes: Vec<String>,
    excess: Vec<String>,
    keap_sync: bool,
}

/// The role's grants checked against what the daemon does with them.
pub(super) async fn check(client: &Client, users: &UsersConfig, table: &UserTable) -> Step<Grants> {
    match examine(client, users, table).await {
        Ok((role, found)) => verdict(&role, users, table, found),
        Err(e) => Step::failed(Check::fail(
            PRIVILEGES,
            format!("cannot read the role's privileges: {e}"),
            "see the server's message",
        )),
    }
}

/// Looks at the role's attributes, its grants on the users table and on schema keap_sync.
async fn examine(
    client: &Client,
    users: &UsersConfig,
    table: &UserTable,
) -> Result<(String, Findings), DbError> {
    let mut found = Findings::default();
    let role = attributes(client, &mut found).await?;
    users_table(client, users, table, &role, &mut found).await?;
    keap_sync(client, &role, &mut found).await?;
    Ok((role, found))
}

/// The line: a failure for what is missing, a warning for what is more than needed.
fn verdict(role: &str, users: &UsersConfig, table: &UserTable, f: Findings) -> Step<Grants> {
    let grants = Grants { keap_sync: f.keap_sync };
    if !f.missing.is_empty() {
        let mut detail = format!("role {role} {}", f.missing.join("; "));
        if !f.excess.is_empty() {
            detail.push_str(&format!("; and it {}", f.excess.join("; ")));
        }
        return Step::found(Check::fail(PRIVILEGES, detail, f.fixes.join("; then ")), grants);
    }
    let columns = 1 + table.synced.iter().filter(|c| **c != users.key).count();
    let writes = match table.inbound.len() {
        0 => String::new(),
        n => format!(", writes the {n} column{} Keap's data lands in", if n == 1 { "" } else { "s" }),
    };
    let needs = format!(
        "role {role} reads the {columns} columns of {} the mapping needs{writes} and uses schema keap_sync",
        users.table
    );
    if f.excess.is_empty() {
        return Step::found(Check::ok(PRIVILEGES, format!("{needs}; nothing more")), grants);
    }
    let detail = format!("{needs}; but it {}", f.excess.join("; "));
    let fix = "run the daemon as a role with only the grants of sql/role.example.sql (login; SELECT on \
               the key and the mapped columns; the use of keap_sync), and keep the table's owner for \
               `keap-sync migrate`";
    Step::found(Check::warn(PRIVILEGES, detail, fix), grants)
}

/// The current role's name; its dangerous or needless attributes go to `found.excess`.
async fn attributes(client: &Client, found: &mut Findings) -> Result<String, DbError> {
    let r = client
        .query_one(
            "select current_user::text, r.rolsuper, r.rolcreaterole, r.rolcreatedb, r.rolreplication,
                    r.rolbypassrls
               from pg_catalog.pg_roles r where r.rolname = current_user",
            &[],
        )
        .await?;
    let said = [
        (1, "is a superuser: it may do anything, such as drop the capture triggers or read every table"),
        (2, "may create roles"),
        (3, "may create databases"),
        (4, "may start replication, which reads every row of the server"),
        (5, "bypasses row-level security"),
    ];
    found.excess.extend(said.iter().filter(|(i, _)| r.get::<_, bool>(*i)).map(|(_, s)| (*s).to_owned()));
    Ok(r.get(0))
}

/// `SELECT` on the key and every mapped column, `SELECT` and `UPDATE` on every inbound column
/// (and `USAGE` on the table's schema); writing or owning the table is noted as more than
/// needed (a column grant for the inbound columns is not: `has_table_privilege` sees only
/// table-wide grants).
async fn users_table(
    client: &Client,
    users: &UsersConfig,
    table: &UserTable,
    role: &str,
    found: &mut Findings,
) -> Result<(), DbError> {
    let mut columns = vec![users.key.clone()];
    columns.extend(table.synced.iter().cloned());
    let inbound: Vec<String> = table.inbound.iter().map(|c| c.name.clone()).collect();
    let r = client
        .query_one(
            "select pg_catalog.has_schema_privilege(c.relnamespace, 'USAGE'),
                    pg_catalog.has_table_privilege(c.oid, 'INSERT, UPDATE, DELETE, TRUNCATE'),
                    pg_catalog.pg_has_role(c.relowner, 'USAGE'),
                    coalesce((select pg_catalog.array_agg(a.attname::text order by a.attnum)
                                from pg_catalog.pg_attribute a
                               where a.attrelid = c.oid and a.attnum > 0 and not a.attisdropped
                                 and a.attname::text = any($2)
                                 and not pg_catalog.has_column_privilege(c.oid, a.attnum, 'SELECT')),
                             '{}'),
                    coalesce((select pg_catalog.array_agg(a.attname::text order by a.attnum)
                                from pg_catalog.pg_attribute a
                               where a.attrelid = c.oid and a.attnum > 0 and not a.attisdropped
                                 and a.attname::text = any($3)
                                 and not (pg_catalog.has_column_privilege(c.oid, a.attnum, 'SELECT')
                                          and pg_catalog.has_column_privilege(c.oid, a.attnum, 'UPDATE'))),
                             '{}')
               from pg_catalog.pg_class c where c.oid = pg_catalog.to_regclass($1)",
            &[&table.qualified, &columns, &inbound],
        )
        .await?;
    let (schema, _) = users.schema_and_table();
    let (usage, writes, owns, unreadable): (bool, bool, bool, Vec<String>) =
        (r.get(0), r.get(1), r.get(2), r.get(3));
    let unwritable: Vec<String> = r.get(4);
    let (to, shown) = (quote_ident(role), &users.table);
    if !usage {
        found.missing.push(format!("may not use schema {schema}, which holds {shown}"));
        found.fixes.push(format!("as its owner: grant usage on schema {} to {to}", quote_ident(schema)));
    }
    if !unreadable.is_empty() {
        let list: Vec<String> = unreadable.iter().map(|c| quote_ident(c)).collect();
        found.missing.push(format!("cannot read column {} of {shown}", unreadable.join(", ")));
        found.fixes.push(format!(
            "as the owner of {shown}: grant select ({}) on {} to {to}",
            list.join(", "),
            table.qualified
        ));
    }
    if !unwritable.is_empty() {
        let list: Vec<String> = unwritable.iter().map(|c| quote_ident(c)).collect();
        found.missing.push(format!(
            "cannot read and write column {} of {shown}, where Keap's data lands ([inbound], owner = \"keap\" or \"shared\")",
            unwritable.join(", ")
        ));
        found.fixes.push(format!(
            "as the owner of {shown}: grant select ({list}), update ({list}) on {} to {to}",
            table.qualified,
            list = list.join(", "),
        ));
    }
    if owns {
        found.excess.push(format!("owns {shown} (it could drop or disable the capture triggers)"));
    } else if writes {
        found.excess.push(format!("may write {shown} (keap-sync only reads it)"));
    }
    Ok(())
}

/// The daemon's grants on schema keap_sync, as `sql/role.example.sql` gives them: its use,
/// reading and writing every table (reading only `schema_migrations`), its sequences, and
/// calling `keap_sync.fold_changes`. Nothing to check before `migrate` created the schema.
async fn keap_sync(client: &Client, role: &str, found: &mut Findings) -> Result<(), DbError> {
    let usage: Option<bool> = client
        .query_one(
            "select (select pg_catalog.has_schema_privilege(n.oid, 'USAGE') from pg_catalog.pg_namespace n
                      where n.nspname = 'keap_sync')",
            &[],
        )
        .await?
        .get(0);
    let Some(usage) = usage else { return Ok(()) };
    let gaps: Vec<String> = client
        .query(
            "select c.relname::text || ' (' || pg_catalog.concat_ws(', ',
                      case when c.relkind = 'S' and not pg_catalog.has_sequence_privilege(c.oid, 'USAGE') then 'usage' end,
                      case when c.relkind <> 'S' and not pg_catalog.has_table_privilege(c.oid, 'SELECT') then 'select' end,
                      case when c.relkind <> 'S' and c.relname <> 'schema_migrations'
                            and not pg_catalog.has_table_privilege(c.oid, 'INSERT') then 'insert' end,
                      case when c.relkind <> 'S' and c.relname <> 'schema_migrations'
                            and not pg_catalog.has_table_privilege(c.oid, 'UPDATE') then 'update' end,
                      case when c.relkind <> 'S' and c.relname <> 'schema_migrations'
                            and not pg_catalog.has_table_privilege(c.oid, 'DELETE') then 'delete' end) || ')'
               from pg_catalog.pg_class c join pg_catalog.pg_namespace n on n.oid = c.relnamespace
              where n.nspname = 'keap_sync' and c.relkind in ('r', 'p', 'S')
              order by c.relname",
            &[],
        )
        .await?
        .iter()
        .map(|r| r.get::<_, String>(0))
        .filter(|s| !s.ends_with(" ()"))
        .collect();
    let fold: bool = client
        .query_one(
            "select coalesce(pg_catalog.has_function_privilege(
                 pg_catalog.to_regprocedure('keap_sync.fold_changes(integer)'), 'EXECUTE'), true)",
            &[],
        )
        .await?
        .get(0);
    found.keap_sync = usage && gaps.is_empty();
    keap_sync_findings(role, usage, &gaps, fold, found);
    Ok(())
}

/// The keap_sync grants found missing, in words, and the statements that give them.
fn keap_sync_findings(role: &str, usage: bool, gaps: &[String], fold: bool, found: &mut Findings) {
    let to = quote_ident(role);
    let mut grants = Vec::new();
    if !usage {
        found.missing.push("may not use schema keap_sync".into());
        grants.push(format!("grant usage on schema keap_sync to {to}"));
    }
    if !gaps.is_empty() {
        found.missing.push(format!("lacks, in schema keap_sync: {}", gaps.join(", ")));
        grants
            .push(format!("grant select, insert, update, delete on all tables in schema keap_sync to {to}"));
        grants.push(format!("grant usage, select on all sequences in schema keap_sync to {to}"));
        grants.push(format!("revoke insert, update, delete on keap_sync.schema_migrations from {to}"));
    }
    if !fold {
        found.missing.push("may not call keap_sync.fold_changes".into());
        grants.push(format!("grant execute on function keap_sync.fold_changes(integer) to {to}"));
    }
    if !grants.is_empty() {
        found.fixes.push(format!(
            "as the owner of schema keap_sync (the role that ran `keap-sync migrate`): {} \
             (sql/role.example.sql; its `alter default privileges` covers tables later migrations add)",
            grants.join("; ")
        ));
    }
}
