-- Priorities (live changes before retries before backfill) and failure records for parked
-- changes (`keap-sync failures list`).

alter table keap_sync.outbox
    -- 0: a live change; 1: a retry after a transient failure; 2: backfill (lowest)
    add column priority         smallint not null default 0,
    add column last_status      integer,       -- Keap's HTTP status of the last failure, if any
    add column last_body        text,          -- Keap's answer to the last failure (trimmed)
    add column payload          jsonb,         -- what was sent when it failed
    add column first_failed_at  timestamptz,
    add column last_failed_at   timestamptz;

drop index keap_sync.outbox_due_idx;
create index outbox_claim_idx on keap_sync.outbox (priority, next_attempt_at) where parked_at is null;

-- As in 0001, and a change makes the row a live change again (priority 0).
create or replace function keap_sync.enqueue(p_user_key text) returns void
language sql
security definer
set search_path = pg_catalog, pg_temp
as $$
    insert into keap_sync.outbox as o (user_key) values (p_user_key)
    on conflict (user_key) do update
       set version         = o.version + 1,
           changed_at      = now(),
           priority        = 0,
           -- a parked change is tried again at once; a change in retry backoff keeps its schedule
           next_attempt_at = case when o.parked_at is not null then now() else o.next_attempt_at end,
           attempts        = case when o.parked_at is not null then 0 else o.attempts end,
           parked_at       = null;
    select pg_notify('keap_sync', '');
$$;
