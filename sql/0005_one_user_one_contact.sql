-- One user, one contact; creates whose outcome is unknown; owned values per property
-- (ARCHITECTURE.md, invariants 12, 13 and 14).

-- What Keap holds of the properties keap-sync owns, as last written or read by it:
-- {"email": …, "given_name": …, "family_name": …} (only the synced ones). A change sends only
-- the properties whose owned value differs. NULL (mappings made before 0005): unknown, so the
-- fingerprint decides whether anything changed.
alter table keap_sync.contact_map add column sent jsonb;

-- A contact maps to at most one user key. Mappings made before 0005 may break that (two users
-- with one email were upserted onto one contact): the earliest mapping keeps the contact, the
-- others are unmapped and their users parked with a message naming the user who keeps it.
with ranked as (
    select user_key, contact_id,
           first_value(user_key) over w as keeper,
           row_number() over w as n
      from keap_sync.contact_map
    window w as (partition by contact_id order by synced_at, user_key)
), unmapped as (
    delete from keap_sync.contact_map m
     using ranked r
     where m.user_key = r.user_key and r.n > 1
    returning m.user_key, m.contact_id, r.keeper
)
insert into keap_sync.outbox as o (user_key, parked_at, attempts, last_error, first_failed_at, last_failed_at)
select user_key, now(), 0,
       format('Keap contact %s is already linked to user %s (the same email address?); one contact '
              'belongs to one user: change this user''s email, then `keap-sync failures retry %s`',
              contact_id, keeper, user_key),
       now(), now()
  from unmapped
on conflict (user_key) do update
   set parked_at = now(), last_error = excluded.last_error, lease_until = null, leased_by = null,
       first_failed_at = coalesce(o.first_failed_at, now()), last_failed_at = now();

create unique index contact_map_contact_idx on keap_sync.contact_map (contact_id);

alter table keap_sync.outbox
    -- The body of a create sent for this user whose outcome is not known yet (timeout, cut
    -- connection, crash before the result was recorded). The next attempt first looks for the
    -- contact by the email sent here, so a changed email cannot create a second contact.
    add column create_sent jsonb,
    -- True while the latest change of this key is its disappearance (the row was deleted, or
    -- its key changed to another): no mapping may be written for it.
    add column key_gone boolean not null default false;

-- Two users with one email must not create two contacts (or one twice) at the same time: a
-- create in flight holds its email.
create unique index outbox_create_email_idx on keap_sync.outbox (lower(create_sent ->> 'email'))
    where create_sent is not null;

-- As in 0002, and records whether the key is gone.
create function keap_sync.enqueue(p_user_key text, p_key_gone boolean) returns void
language sql
security definer
set search_path = pg_catalog, pg_temp
as $$
    insert into keap_sync.outbox as o (user_key, key_gone) values (p_user_key, p_key_gone)
    on conflict (user_key) do update
       set version         = o.version + 1,
           changed_at      = now(),
           priority        = 0,
           key_gone        = p_key_gone,
           next_attempt_at = case when o.parked_at is not null then now() else o.next_attempt_at end,
           attempts        = case when o.parked_at is not null then 0 else o.attempts end,
           parked_at       = null;
    select pg_notify('keap_sync', '');
$$;

-- As in 0004, with two differences. A disappearing key is enqueued as gone. And on a key
-- change the old key is enqueued *before* the mapping moves: enqueue waits for the outbox row's
-- lock, so a completion for the old key that is recording its contact right now commits first,
-- and the move (a new statement, so a new snapshot) then carries that mapping to the new key.
-- A completion that comes after the key change sees `key_gone` and writes no mapping.
create or replace function keap_sync.capture() returns trigger
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
            perform keap_sync.enqueue(old_doc ->> key_col, true);
        end if;
        return null;
    end if;

    new_doc := to_jsonb(new);
    if tg_op = 'UPDATE' then
        old_doc := to_jsonb(old);
        if (old_doc -> key_col) is distinct from (new_doc -> key_col) then
            if old_doc ->> key_col is not null then
                perform keap_sync.enqueue(old_doc ->> key_col, true);
                if new_doc ->> key_col is not null then
                    update keap_sync.contact_map
                       set user_key = new_doc ->> key_col
                     where user_key = old_doc ->> key_col
                       and not exists (select from keap_sync.contact_map where user_key = new_doc ->> key_col);
                end if;
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
        perform keap_sync.enqueue(new_doc ->> key_col, false);
    end if;
    return null;
end
$$;
