//! The capture triggers' SQL, generated from the resolved users table: one function and one
//! `create trigger` per trigger, where each belongs (the table and its partitions), and the
//! `set` clauses every generated function carries.

use super::table::UserTable;
use super::{
    APPLY_TRIGGER_NAME, DELETE_TRIGGER_NAME, KEY_TRIGGER_NAME, TRIGGER_NAME, TRUNCATE_TRIGGER_NAME,
    UPDATE_TRIGGER_NAME,
};
use crate::db::quote_ident;

/// One generated capture trigger: its name, its function (fixed names in schema keap_sync: one
/// install syncs one users table, so a name derived from the table would only make `uninstall`
/// and the checks guess it), the function's plpgsql body generated from the config, and the
/// `create trigger` text after `create trigger <name>`.
pub(super) struct CaptureTrigger {
    pub(super) name: &'static str,
    pub(super) function: &'static str,
    pub(super) body: String,
    pub(super) definition: String,
    /// The function's `set` clauses (see [`capture_triggers`]).
    pub(super) settings: &'static [Setting],
    /// How it must be enabled (`pg_trigger.tgenabled`): `A` always, `R` replica only.
    pub(super) enabled: u8,
    /// A statement-level trigger (the others are row-level).
    pub(super) per_statement: bool,
}

/// One capture trigger on one relation: the users table or one of its partitions.
pub(super) struct Placement {
    /// The relation, qualified.
    pub(super) relation: String,
    pub(super) name: &'static str,
    pub(super) function: &'static str,
    /// The `create trigger` text after `create trigger <name>`.
    pub(super) definition: String,
    pub(super) enabled: u8,
}

impl Placement {
    /// Whether the trigger fires before the row is written.
    pub(super) fn before(&self) -> bool {
        self.definition.starts_with("before ")
    }
}

/// Every capture trigger on every relation it belongs on. On the users table: the generated
/// triggers and the truncate trigger. On each partition of a partitioned table, the statement
/// triggers and the truncate trigger again: a statement that names a partition fires that
/// partition's statement triggers, not the parent's, so without them a write or a TRUNCATE
/// straight to a partition would go unseen. (A statement on the parent fires the parent's only,
/// so nothing is logged twice.) The row triggers need no copy: PostgreSQL clones a partitioned
/// table's row triggers onto its partitions.
pub(super) fn placements(table: &UserTable, triggers: &[CaptureTrigger]) -> Vec<Placement> {
    let truncate = |relation: &str| Placement {
        relation: relation.to_owned(),
        name: TRUNCATE_TRIGGER_NAME,
        function: "keap_sync.capture_truncate",
        definition: format!("after truncate on {relation} for each statement"),
        enabled: b'A',
    };
    let on = |t: &CaptureTrigger, relation: &str| Placement {
        relation: relation.to_owned(),
        name: t.name,
        function: t.function,
        definition: t.definition.replacen(
            &format!(" on {} ", table.qualified),
            &format!(" on {relation} "),
            1,
        ),
        enabled: t.enabled,
    };
    let mut out: Vec<Placement> = triggers.iter().map(|t| on(t, &table.qualified)).collect();
    out.push(truncate(&table.qualified));
    for partition in &table.partitions {
        out.extend(triggers.iter().filter(|t| t.per_statement).map(|t| on(t, partition)));
        out.push(truncate(partition));
    }
    out
}

/// A `set` clause of a generated function: `set {name} = {value}`. The catalog keeps it as
/// `name=value`, unquoted ([`FunctionDef::settings`]).
pub(super) type Setting = (&'static str, &'static str);

/// Names resolve in `pg_catalog` alone, never through the caller's path.
pub(super) const PINNED_PATH: Setting = ("search_path", "pg_catalog, pg_temp");

/// PL/pgSQL plans a trigger's statement once per session, with the transition tables' sizes
/// of its first call. Planned for one row, a join of the old and new tables is a nested loop,
/// and a later 20,000-row statement in the same session compares every row with every other
/// (13 s instead of 0.1 s, `tests/it/capture_shapes.rs`). Without nested loops the plan is a
/// hash or merge join, linear for any size.
const NO_NESTED_LOOP: Setting = ("enable_nestloop", "off");

/// A generated function as the catalog has it.
#[derive(Debug, PartialEq, Eq)]
pub(super) struct FunctionDef {
    /// `pg_proc.prosrc`.
    pub(super) body: String,
    /// `pg_proc.proconfig`, as `name=value`.
    pub(super) settings: Vec<String>,
}

impl FunctionDef {
    /// The function as `migrate` would install it.
    pub(super) fn generated(body: String, settings: &[Setting]) -> FunctionDef {
        FunctionDef {
            body,
            settings: settings
                .iter()
                .map(|(name, value)| format!("{name}={}", value.trim_matches('\'')))
                .collect(),
        }
    }
}

/// The `set …` clauses of `create function`.
pub(super) fn set_clauses(settings: &[Setting]) -> String {
    settings.iter().map(|(name, value)| format!("set {name} = {value}\n")).collect()
}

/// The capture triggers for `table`, generated from the configured columns.
///
/// Per statement, from transition tables. An insert, an update or a delete appends one
/// `(user_key)` row per changed user to `keap_sync.change` (no index, no conflict check: 0011
/// says why) and notifies once; [`fold_function`](super::fold::fold_function) moves the log into
/// the outbox later, on the daemon's side, and decides there whether the key is gone.
/// Synced columns are compared directly (`o.col is distinct from n.col`), which is why the SQL
/// is generated here and not in a migration.
///
/// A logical replication apply worker fires row triggers only, so one more row trigger, enabled
/// for `replica` mode only, logs each row a subscription inserts, updates (same key, a synced
/// column changed) or deletes. In an ordinary session it never fires; in a session that sets
/// `session_replication_role = replica` itself it logs beside the statement triggers (a change
/// logged twice is folded once).
///
/// A key change writes the outbox itself: a row-level trigger that fires only when the key
/// changes enqueues the old key as gone (taking its outbox row lock) *before* the mapping moves,
/// then the new key (invariant 13). It runs *before* the row is written: an update that moves a
/// row to another partition fires no update row trigger after it, and before it the table
/// still says whether the new key was free before this row took it. A new key that still maps
/// a user deleted before the daemon handled the deletion swaps mappings with the old key (the
/// old key's delivery then applies `on_delete` to the deleted user's contact). A key freed by
/// another row of the same statement (a shift under a deferrable key) is not free yet when
/// this row's trigger runs first, and then the mapping is not moved, as before. The update
/// statement trigger pairs the remaining rows by key.
///
/// The functions are `security definer` (application roles need no grant on keap_sync), and a
/// security definer function must not resolve a name through its caller's `search_path`, or the
/// caller could put a function, operator or type of its own in the definer's way. The update
/// and key-change functions use operators (`=`, `is distinct from`) and so pin `search_path =
/// pg_catalog, pg_temp`; the update function also plans without nested loops
/// ([`NO_NESTED_LOOP`]), and pairs old and new rows by the key's text, which needs no operator
/// of the key's type (an extension's type has its `=` outside `pg_catalog`). The insert and delete functions, the ones every insert and delete
/// runs, instead name nothing unqualified but their transition table (which the parser finds
/// before any schema) and use no operator; pinning costs each call a save, set and restore of
/// the setting and a recomputed search path for the application's own cached plans (about 2.5
/// of the trigger's 6.5 µs per statement, measured in a loop of 30,000 inserts; with `perf`,
/// the GUC save and restore and the path checks were a quarter of the trigger's samples), so
/// they do without. `tests/it/capture.rs` runs them under a hostile `search_path`.
pub(super) fn capture_triggers(table: &UserTable) -> Vec<CaptureTrigger> {
    vec![
        insert_trigger(table),
        update_trigger(table),
        delete_trigger(table),
        key_trigger(table),
        apply_trigger(table),
    ]
}

/// The body of a statement trigger's function: the keys `select` yields appended to the change
/// log, and one notification if there were any.
///
/// The notification is an assignment, not a `perform`: PL/pgSQL evaluates an assignment's
/// lone function call directly, where `perform` starts an executor for a one-row query
/// (1.2 of the trigger's 5.9 µs per statement in a loop of 30,000 inserts). The variable
/// only receives pg_notify's void.
fn log_body(select: &str) -> String {
    format!(
        "declare
    notified pg_catalog.text;
begin
    insert into keap_sync.change (user_key)
    {select};
    if found then
        notified := pg_catalog.pg_notify('keap_sync', '');
    end if;
    return null;
end"
    )
}

/// Whether a synced column differs between the rows `old` and `new`, as an SQL condition.
fn synced_differ(table: &UserTable, old: &str, new: &str) -> String {
    let each: Vec<String> = table
        .synced
        .iter()
        .map(|c| format!("{old}.{q} is distinct from {new}.{q}", q = quote_ident(c)))
        .collect();
    if each.is_empty() {
        "false".to_owned()
    } else {
        each.join(" or ")
    }
}

/// The insert statement trigger: every new row's key logged.
fn insert_trigger(table: &UserTable) -> CaptureTrigger {
    let key = &table.key;
    let t = &table.qualified;
    CaptureTrigger {
        name: TRIGGER_NAME,
        function: "keap_sync.capture_insert",
        body: log_body(&format!(
            "select n.{key}::pg_catalog.text from keap_sync_new n where n.{key} is not null"
        )),
        definition: format!("after insert on {t} referencing new table as keap_sync_new for each statement"),
        settings: &[],
        enabled: b'A',
        per_statement: true,
    }
}

/// The update statement trigger: the key of every same-key row whose synced columns changed,
/// logged.
fn update_trigger(table: &UserTable) -> CaptureTrigger {
    let key = &table.key;
    let t = &table.qualified;
    let changed = synced_differ(table, "o", "n");
    CaptureTrigger {
        name: UPDATE_TRIGGER_NAME,
        function: "keap_sync.capture_update",
        body: log_body(&format!(
            "select n.{key}::text from keap_sync_new n join keap_sync_old o on o.{key}::text = n.{key}::text
      where n.{key} is not null and ({changed}){origin}",
            origin = not_from_keap(table)
        )),
        definition: format!(
            "after update on {t} referencing old table as keap_sync_old new table as keap_sync_new for each statement"
        ),
        settings: &[PINNED_PATH, NO_NESTED_LOOP],
        enabled: b'A',
        per_statement: true,
    }
}

/// With a shared property (`owner = "shared"`), its column is both synced and written from
/// Keap: delivery writes Keap's value in a transaction that sets `keap_sync.origin = 'keap'`
/// (`deliver::take`), and the update trigger logs nothing for it, so that Keap's change is
/// never sent back (invariant 18, Heroku Connect's way). Without one, nothing is added: the
/// trigger is exactly what it was.
fn not_from_keap(table: &UserTable) -> &'static str {
    let shared = table.inbound.iter().any(|c| matches!(c.data, crate::config::InboundData::Shared { .. }));
    if shared {
        "\n        and pg_catalog.current_setting('keap_sync.origin', true) is distinct from 'keap'"
    } else {
        ""
    }
}

/// The delete statement trigger: every deleted row's key logged.
fn delete_trigger(table: &UserTable) -> CaptureTrigger {
    let key = &table.key;
    let t = &table.qualified;
    CaptureTrigger {
        name: DELETE_TRIGGER_NAME,
        function: "keap_sync.capture_delete",
        body: log_body(&format!(
            "select o.{key}::pg_catalog.text from keap_sync_old o where o.{key} is not null"
        )),
        definition: format!("after delete on {t} referencing old table as keap_sync_old for each statement"),
        settings: &[],
        enabled: b'A',
        per_statement: true,
    }
}

/// The row trigger of a key change: the old key enqueued as gone and its mapping moved (or
/// swapped) before the row is written, then the new key enqueued.
fn key_trigger(table: &UserTable) -> CaptureTrigger {
    let key = &table.key;
    let t = &table.qualified;
    let eq = &table.key_eq;
    CaptureTrigger {
        name: KEY_TRIGGER_NAME,
        function: "keap_sync.capture_key_change",
        body: format!(
            "declare
    theirs record;
    ours record;
    had_ours boolean;
begin
    if old.{key} is not null then
        perform keap_sync.enqueue(old.{key}::text, true);
        if new.{key} is not null then
            if exists (select from keap_sync.contact_map where user_key = new.{key}::text)
               and not exists (select from {t} u where u.{key} {eq} new.{key}) then
                -- The new key still maps a user deleted before the daemon handled it. The two
                -- mappings change places: ours follows the user, and the old key, now gone,
                -- carries the deleted user's contact to its deletion (on_delete).
                -- (Separate statements: one would still see the rows it deleted as taken.)
                delete from keap_sync.contact_map where user_key = new.{key}::text
                    returning contact_id, fingerprint, synced_at, sent into theirs;
                delete from keap_sync.contact_map where user_key = old.{key}::text
                    returning contact_id, fingerprint, synced_at, sent into ours;
                had_ours := found;
                insert into keap_sync.contact_map (user_key, contact_id, fingerprint, synced_at, sent)
                values (old.{key}::text, theirs.contact_id, theirs.fingerprint, theirs.synced_at, theirs.sent);
                if had_ours then
                    insert into keap_sync.contact_map (user_key, contact_id, fingerprint, synced_at, sent)
                    values (new.{key}::text, ours.contact_id, ours.fingerprint, ours.synced_at, ours.sent);
                end if;
            else
                update keap_sync.contact_map
                   set user_key = new.{key}::text
                 where user_key = old.{key}::text
                   and not exists (select from keap_sync.contact_map where user_key = new.{key}::text);
            end if;
        end if;
    end if;
    if new.{key} is not null then
        perform keap_sync.enqueue(new.{key}::text, false);
    end if;
    return new;
end"
        ),
        definition: format!(
            "before update of {key} on {t} for each row when (old.{key} is distinct from new.{key})"
        ),
        settings: &[PINNED_PATH],
        enabled: b'A',
        per_statement: false,
    }
}

/// The row trigger for logical replication's apply worker (`replica` mode only): each row it
/// inserts, updates (same key, a synced column changed) or deletes, logged.
fn apply_trigger(table: &UserTable) -> CaptureTrigger {
    let key = &table.key;
    let t = &table.qualified;
    let row_changed = synced_differ(table, "old", "new");
    CaptureTrigger {
        name: APPLY_TRIGGER_NAME,
        function: "keap_sync.capture_apply",
        body: format!(
            "declare
    notified pg_catalog.text;
begin
    if tg_op = 'INSERT' then
        if new.{key} is null then
            return null;
        end if;
        insert into keap_sync.change (user_key) values (new.{key}::pg_catalog.text);
    elsif tg_op = 'DELETE' then
        if old.{key} is null then
            return null;
        end if;
        insert into keap_sync.change (user_key) values (old.{key}::pg_catalog.text);
    elsif new.{key} is null or old.{key}::pg_catalog.text <> new.{key}::pg_catalog.text
          or old.{key} is null or not ({row_changed}) then
        -- A key change is the key trigger's (it fires always); other columns are not synced.
        return null;
    else
        insert into keap_sync.change (user_key) values (new.{key}::pg_catalog.text);
    end if;
    notified := pg_catalog.pg_notify('keap_sync', '');
    return null;
end"
        ),
        definition: format!("after insert or update or delete on {t} for each row"),
        settings: &[PINNED_PATH],
        enabled: b'R',
        per_statement: false,
    }
}
