-- keap-sync core schema: the outbox, the user -> contact map, the token store.
--
-- Applied by `keap-sync migrate` inside one transaction under an advisory lock; recorded with
-- its sha256 in keap_sync.schema_migrations. Never edit this file once released: add 0002_*.sql.
-- The trigger itself is created by `migrate` from the configuration (table, key, columns).

-- One row per user key with pending work. The trigger bumps `version` on every change; the daemon
-- deletes the row only if `version` is unchanged since its claim (design invariant 2).
create table keap_sync.outbox (
    user_key          text        primary key,
    version           bigint      not null default 1,
    first_changed_at  timestamptz not null default now(),
    changed_at        timestamptz not null default now(),
    attempts          integer     not null default 0,
    next_attempt_at   timestamptz not null default now(),
    lease_until       timestamptz,
    leased_by         text,
    last_error        text,
    parked_at         timestamptz
);

create index outbox_due_idx on keap_sync.outbox (next_attempt_at) where parked_at is null;

-- Which Keap contact a user is. A mapped user is PATCHed by id, so an email change updates the
-- same contact; `fingerprint` is the hash of the last payload Keap accepted, so an unchanged
-- payload costs no call (invariants 4 and 5).
create table keap_sync.contact_map (
    user_key     text        primary key,
    contact_id   bigint      not null,
    fingerprint  text        not null,
    synced_at    timestamptz not null default now()
);

-- The OAuth grant: at most one row. Refreshed under `select ... for update` (invariant 7).
create table keap_sync.oauth_token (
    id                       smallint    primary key default 1 check (id = 1),
    access_token             text        not null,
    refresh_token            text        not null,
    expires_at               timestamptz not null,
    scope                    text,
    granted_at               timestamptz not null default now(),
    refresh_token_issued_at  timestamptz not null default now(),
    refreshed_at             timestamptz,
    state                    text        not null default 'ok'
                                         check (state in ('ok', 'reauthorization_needed')),
    state_detail             text,
    updated_at               timestamptz not null default now()
);

-- Records one change of a user. `security definer` with a pinned search_path: the application's
-- roles need no grant on keap_sync, and cannot redirect the names used here (invariant 9).
create function keap_sync.enqueue(p_user_key text) returns void
language sql
security definer
set search_path = pg_catalog, pg_temp
as $$
    insert into keap_sync.outbox as o (user_key) values (p_user_key)
    on conflict (user_key) do update
       set version         = o.version + 1,
           changed_at      = now(),
           -- a parked change is tried again at once; a change in retry backoff keeps its schedule
           next_attempt_at = case when o.parked_at is not null then now() else o.next_attempt_at end,
           attempts        = case when o.parked_at is not null then 0 else o.attempts end,
           parked_at       = null;
    -- only a wake-up: the daemon drains the outbox whether or not it hears this
    select pg_notify('keap_sync', '');
$$;

-- Row trigger body. Arguments: the key column, then the synced columns. An update that changes
-- none of the synced columns (or rewrites the same values) enqueues nothing. A key change
-- enqueues both keys: the old one so its contact mapping is dealt with, the new one to sync.
create function keap_sync.capture() returns trigger
language plpgsql
security definer
set search_path = pg_catalog, pg_temp
as $$
declare
    key_col  text := tg_argv[0];
    new_doc  jsonb;
    old_doc  jsonb;
    changed  boolean := false;
    i        integer;
begin
    if tg_op = 'DELETE' then
        old_doc := to_jsonb(old);
        if old_doc ->> key_col is not null then
            perform keap_sync.enqueue(old_doc ->> key_col);
        end if;
        return null;
    end if;

    new_doc := to_jsonb(new);
    if tg_op = 'UPDATE' then
        old_doc := to_jsonb(old);
        if (old_doc -> key_col) is distinct from (new_doc -> key_col) then
            if old_doc ->> key_col is not null then
                perform keap_sync.enqueue(old_doc ->> key_col);
            end if;
            changed := true;
        else
            for i in 1 .. tg_nargs - 1 loop
                if (old_doc -> tg_argv[i]) is distinct from (new_doc -> tg_argv[i]) then
                    changed := true;
                    exit;
                end if;
            end loop;
        end if;
        if not changed then
            return null;
        end if;
    end if;

    if new_doc ->> key_col is not null then
        perform keap_sync.enqueue(new_doc ->> key_col);
    end if;
    return null;
end
$$;
