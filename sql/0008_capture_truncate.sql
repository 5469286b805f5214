-- TRUNCATE fires no row trigger, so a truncated users table used to leave every contact mapped
-- to users that no longer exist, silently. `keap-sync migrate` now installs a statement-level
-- `after truncate` trigger (keap_sync_capture_truncate) calling this function: every mapped
-- key, and every key still queued, is enqueued as gone, exactly as if each row had been
-- deleted, so `delivery.on_delete` decides (keep: the contacts stay and the mappings too, so a
-- reload under the same keys updates the same contacts; delete_contact: each contact is
-- deleted). A TRUNCATE and a reload in one transaction (a restore) enqueue each key as gone and
-- then as present again: the contacts are updated, never deleted.
--
-- Both capture triggers are installed `enable always` (in src/schema.rs, since the trigger
-- itself is created from the configuration): a trigger in the default `origin` mode does not
-- fire when session_replication_role = replica, which is how a logical replication apply
-- worker and `pg_restore --disable-triggers` write, and those changes would never be synced.
-- Set-based, not a call of keap_sync.enqueue per key: a large table is one statement.

create function keap_sync.capture_truncate() returns trigger
language plpgsql
security definer
set search_path = pg_catalog, pg_temp
as $$
begin
    insert into keap_sync.outbox as o (user_key, key_gone)
    select user_key, true from keap_sync.contact_map
    union
    select user_key, true from keap_sync.outbox
    on conflict (user_key) do update
       set version         = o.version + 1,
           changed_at      = now(),
           priority        = 0,
           key_gone        = true,
           next_attempt_at = case when o.parked_at is not null then now() else o.next_attempt_at end,
           attempts        = case when o.parked_at is not null then 0 else o.attempts end,
           parked_at       = null;
    perform pg_notify('keap_sync', '');
    return null;
end
$$;
