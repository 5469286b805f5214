//! The fold's SQL: `keap_sync.fold_changes`, generated from the resolved users table, which
//! moves the change log into the outbox, one upsert per user.

use super::capture::{Setting, PINNED_PATH};
use super::table::UserTable;

/// Key of the transaction advisory lock one fold holds at a time: "keapfold" in ASCII.
const FOLD_LOCK: i64 = 0x6b65_6170_666f_6c64;

/// The fold's first, batched attempt waits this long for a row lock (see [`fold_function`]).
const FOLD_LOCK_WAIT: Setting = ("lock_timeout", "'100ms'");

/// The fold function's settings.
pub(super) const FOLD_SETTINGS: &[Setting] = &[PINNED_PATH, FOLD_LOCK_WAIT];

/// Name of the generated function that folds the change log into the outbox.
pub(crate) const FOLD_FUNCTION: &str = "keap_sync.fold_changes";

/// The body of `keap_sync.fold_changes(p_limit integer, out taken integer, out held integer)`:
/// moves up to `p_limit` changes from `keap_sync.change` into the outbox, one upsert per user,
/// and says how many changes it `taken` and for how many users it `held` them back. Run by the
/// daemon with its own privileges (select on the key column, its own tables).
///
/// Each user taken becomes what the capture trigger's upsert was before 0011: a new version,
/// `priority` 0, a parked row unparked, `changed_at` the newest change's time. Log rows another
/// fold holds are skipped, and outbox rows are written in key order (no deadlock cycle).
///
/// `key_gone` is whether the key is absent from the users table *in this statement's snapshot*.
/// That is the truth unless someone wrote the outbox row after the snapshot was taken: a key
/// change that committed while this statement waited for the row's lock. Its `key_gone` is newer
/// than our snapshot, so it is kept. The test: the version the statement sees in its snapshot
/// (the subquery) differs from the locked row's (`o`, the newest). Another fold is not such a
/// writer (its snapshot may be older than ours), so folds take turns under a transaction
/// advisory lock ([`FOLD_LOCK`]; they overlap only in a fail-over), and each statement after
/// the lock sees what the previous fold wrote.
///
/// Only a key change (and a truncate) writes the outbox from an application's transaction now;
/// one left open holds that user's outbox row, and a fold that waited for it would stop every
/// capture from reaching the outbox. So the one-statement fold waits at most `lock_timeout`
/// (100 ms); then the function locks the visible outbox rows of the users it took, `skip
/// locked`: the ones an open transaction holds are found without waiting, and their changes
/// stay in the log (`held`) for the next fold, however many there are, while the others are
/// folded in one statement again. Only a row no snapshot can see yet (a key change inserting
/// its new key's outbox row) is found by waiting: then the fold goes user by user, each in a
/// subtransaction waiting 5 ms at most, stopping after 100 such waits. The usual fold, with no
/// row held, costs one statement, as before (`cargo bench --bench perf -- --profile DIR`).
pub(super) fn fold_function(table: &UserTable) -> String {
    let batch_all = fold_batch(
        table,
        "c.ctid = any (array(select ctid from keap_sync.change limit p_limit for update skip locked))",
    );
    let batch_free = fold_batch(table, "c.ctid = any (v_rows) and c.user_key <> all (v_held)");
    let gone_one = key_gone(table, "one.user_key");
    let (insert, on_conflict) = (FOLD_INSERT, FOLD_ON_CONFLICT);
    format!(
        "declare
    one record;
    v_rows tid[];
    v_keys text[];
    v_locked text[];
    v_held text[];
    v_waits integer := 0;
begin
    taken := 0;
    held := 0;
    -- One fold at a time. Two overlap only while two instances both lead (a fail-over); one
    -- that decided from an older snapshot must not write after a newer one, or a present user
    -- is left marked gone. The later fold waits (lock_timeout) for the earlier one's commit,
    -- and its next statement sees what that one wrote; if it cannot wait, the next fold runs.
    begin
        perform pg_catalog.pg_advisory_xact_lock({FOLD_LOCK});
    exception when lock_not_available then
        return;
    end;
    -- The usual case, no outbox row held: one statement, waiting at most lock_timeout.
{batch_all}    select coalesce(array_agg(c.ctid), '{{}}'), coalesce(array_agg(distinct c.user_key), '{{}}')
      into v_rows, v_keys
      from (select ctid, user_key from keap_sync.change limit p_limit for update skip locked) c;
    if cardinality(v_rows) = 0 then
        return;
    end if;
    -- Some outbox row is held. Users whose row an open transaction holds (a key change, a
    -- truncate, not yet committed): found without waiting (rows taken in key order, like every writer of the
    -- outbox), and their changes stay in the log for the next fold.
    select coalesce(array_agg(l.user_key), '{{}}') into v_locked
      from (select o.user_key from keap_sync.outbox o where o.user_key = any (v_keys)
             order by o.user_key for update skip locked) l;
    select coalesce(array_agg(o.user_key), '{{}}') into v_held
      from keap_sync.outbox o where o.user_key = any (v_keys) and o.user_key <> all (v_locked);
    held := cardinality(v_held);
{batch_free}    -- An outbox row no statement can see yet (a key change inserting its new key's row) can
    -- only be found by waiting for it: user by user, 5 ms each, and after 100 such waits the
    -- fold stops (the rest waits for the next one), so the daemon is never held up for long.
    perform set_config('lock_timeout', '5ms', true);
    for one in select c.user_key, array_agg(c.ctid) as rows, min(c.at) as first_at, max(c.at) as last_at
               from keap_sync.change c
              where c.ctid = any (v_rows) and c.user_key <> all (v_held)
              group by c.user_key
              order by c.user_key
    loop
        begin
            delete from keap_sync.change where ctid = any (one.rows);
            {insert}
            values (one.user_key, {gone_one}, one.first_at, one.last_at, one.first_at)
            {on_conflict};
            taken := taken + cardinality(one.rows);
        exception when lock_not_available then
            held := held + 1;
            v_waits := v_waits + 1;
            exit when v_waits >= 100;
        end;
    end loop;
end"
    )
}

/// The upsert of one user into the outbox, up to its rows: a fold's `insert`.
const FOLD_INSERT: &str =
    "insert into keap_sync.outbox as o (user_key, key_gone, first_changed_at, changed_at, next_attempt_at)";

/// What a fold's upsert does to a user already queued: a new version, `priority` 0, a parked row
/// unparked, and `key_gone` from this statement's snapshot unless a newer version holds it.
const FOLD_ON_CONFLICT: &str = "on conflict (user_key) do update
           set version         = o.version + 1,
               changed_at      = greatest(o.changed_at, excluded.changed_at),
               priority        = 0,
               key_gone        = case when o.version = (select s.version from keap_sync.outbox s
                                                         where s.user_key = excluded.user_key)
                                      then excluded.key_gone else o.key_gone end,
               next_attempt_at = case when o.parked_at is not null then now() else o.next_attempt_at end,
               attempts        = case when o.parked_at is not null then 0 else o.attempts end,
               parked_at       = null";

/// Whether the key `user_key` (an SQL expression of the log's text key) is absent from the users
/// table, in the statement's snapshot.
fn key_gone(table: &UserTable, user_key: &str) -> String {
    format!(
        "not exists (select from {t} u where u.{key} {eq} {user_key}::{key_type})",
        t = table.qualified,
        key = table.key,
        eq = table.key_eq,
        key_type = table.key_type,
    )
}

/// The log rows `rows` (a condition on `c`) folded in one statement, which returns from the
/// function; a lock wait past `lock_timeout` falls through to what follows it.
fn fold_batch(table: &UserTable, rows: &str) -> String {
    let gone_batch = key_gone(table, "k.user_key");
    let (insert, on_conflict) = (FOLD_INSERT, FOLD_ON_CONFLICT);
    format!(
        "    begin
        with moved as (
            delete from keap_sync.change c
             where {rows}
            returning c.user_key, c.at
        ), keys as (
            select user_key, min(at) as first_at, max(at) as last_at from moved group by user_key
        ), upserted as (
            {insert}
            select k.user_key, {gone_batch}, k.first_at, k.last_at, k.first_at
              from keys k
             order by k.user_key
            {on_conflict}
            returning 1
        )
        select count(*) into taken from moved;
        return;
    exception when lock_not_available then
        taken := 0;
    end;
"
    )
}
