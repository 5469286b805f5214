-- keap-sync: least-privilege database roles. An example to adapt, not a migration
-- (`keap-sync migrate` never runs it; its name does not start with a version number).
--
-- Names used below; replace them with yours throughout:
--   app           the application's database
--   app_owner     the role that owns the users table: the application's migration role.
--                 `keap-sync migrate` runs as this role, because creating the capture trigger
--                 on a table requires owning it (and creating schema keap_sync requires the
--                 create privilege on the database, which a database owner has).
--   public.users  the users table (`users.table` in keap-sync.toml)
--   keap_sync     the daemon's login role (`keap-sync run`, `auth`, `failures`, `status`)
--
-- Order:
--   1. keap-sync migrate               as app_owner   (creates schema keap_sync, the trigger)
--   2. psql -d app -f role.example.sql as a superuser (e.g. `sudo -u postgres psql -d app -f …`)
--   3. DATABASE_URL for the daemon: postgresql://keap_sync@…/app
-- The script can be run again (after an upgrade, say) and changes nothing the second time.
--
-- The application's own roles need no grant at all: the trigger functions in keap_sync are
-- `security definer` (they run as app_owner, with a pinned search_path), so an insert into
-- users by any role that may write users also records the change in keap_sync.change.

-- The daemon's role: may log in, nothing else (no superuser, no createdb, no createrole, no
-- replication, no bypassrls). Set its password with psql's `\password keap_sync` (so it never
-- appears in a log or shell history), or use peer/cert authentication instead (under systemd
-- with DynamicUser=yes the OS user is named keap-sync: map it in pg_ident.conf, e.g.
-- `keapsync  keap-sync  keap_sync`, and `local app keap_sync peer map=keapsync` in pg_hba.conf).
do $$
begin
    if not exists (select from pg_catalog.pg_roles where rolname = 'keap_sync') then
        create role keap_sync login;
    end if;
end
$$;

grant connect on database app to keap_sync;

-- Its own schema: read and write the change log (the daemon folds it into the outbox by
-- calling keap_sync.fold_changes, which runs with the daemon's own privileges: these grants
-- and the select on the key column below), the outbox, the contact map, the OAuth token store,
-- backfill progress and the instance registry. No create, no truncate, no ddl: only `migrate`
-- (as app_owner) changes the schema. Functions are executable by every role unless revoked;
-- if your database revokes that from public, add
--   grant execute on function keap_sync.fold_changes(integer) to keap_sync;
grant usage on schema keap_sync to keap_sync;
grant select, insert, update, delete on all tables in schema keap_sync to keap_sync;
grant usage, select on all sequences in schema keap_sync to keap_sync;
-- The migration record is read (to refuse an outdated schema), never written, by the daemon.
revoke insert, update, delete on keap_sync.schema_migrations from keap_sync;

-- Tables and sequences that later migrations add (run by app_owner) get the same grants at
-- creation, so an upgrade (`keap-sync migrate`, then restart) needs no new grant.
alter default privileges for role app_owner in schema keap_sync
    grant select, insert, update, delete on tables to keap_sync;
alter default privileges for role app_owner in schema keap_sync
    grant usage, select on sequences to keap_sync;

-- The users table: read only, and only the key and the synced columns (`users.key`, `email`,
-- `given_name`, `family_name` in keap-sync.toml); the daemon never writes it (except the
-- `[inbound]` columns, below) and never reads another column. Add a column here when you add it
-- to the config.
grant usage on schema public to keap_sync;
grant select (id, email, first_name, last_name) on public.users to keap_sync;

-- With `[inbound]`, or a property mapped with owner = "keap" or "shared" (README, "Keap talks
-- back", "Ownership"): the daemon writes Keap's data into those columns, and only those: read
-- and update them, nothing else of the table (`keap-sync doctor` names any missing).
-- grant select (marketing_opt_out), update (marketing_opt_out) on public.users to keap_sync;
