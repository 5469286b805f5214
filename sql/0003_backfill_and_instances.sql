-- Backfill progress (one row) and the daemon instances seen alive.

-- `keap-sync run --backfill` / `keap-sync backfill` enqueue every existing user in key order, a
-- batch per transaction; `cursor` is the last key enqueued (as text), so a stopped backfill
-- continues where it was. `state`: running (enqueuing) -> enqueued (all queued) -> done (all
-- delivered, or parked).
create table keap_sync.backfill (
    id           smallint    primary key default 1 check (id = 1),
    state        text        not null check (state in ('running', 'enqueued', 'done')),
    cursor       text,
    enqueued     bigint      not null default 0,
    total        bigint      not null,
    started_at   timestamptz not null default now(),
    enqueued_at  timestamptz,
    finished_at  timestamptz
);

-- One row per running daemon, refreshed every few seconds: what `keap-sync status` reports.
-- `role`: only the instance holding the delivery lock delivers; the others stand by.
create table keap_sync.instances (
    instance                text        primary key,
    host                    text        not null,
    pid                     integer     not null,
    started_at              timestamptz not null default now(),
    last_seen               timestamptz not null default now(),
    role                    text        not null check (role in ('active', 'standby')),
    paused_reason           text,
    quota_minute_available  bigint,
    quota_day_available     bigint,
    throttled               bigint      not null default 0
);
