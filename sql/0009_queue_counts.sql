-- Queue depth without counting the outbox, and the index the oldest-pending-age query needs.
-- Under a backlog of millions (a Keap outage, a backfill), `count(*)` over the outbox for every
-- heartbeat, `status` and backfill progress read cost a core of database CPU.
--
-- keap_sync.outbox_count holds signed deltas per kind of outbox row (its priority, and whether
-- it is parked); the depth of a kind is the sum of its rows. Triggers on the outbox append a
-- delta for every change of a row's kind: one row per kind per INSERT or DELETE statement
-- (statement-level, from the transition table, so a backfill batch of 5,000 adds one row), and
-- two per UPDATE that changes a row's kind (row-level, but only when the kind changes: a claim,
-- a lease release or a version bump fires nothing). Appending never waits: unlike one counter
-- row per kind updated in place, no application transaction ever queues behind another's lock
-- on a hot counter row. The daemon folds the deltas into one row per kind on its heartbeat
-- (`status::compact_counts`), so a read sums a handful of rows. The sums are exact: every
-- delta commits or rolls back with the change it counts.

create table keap_sync.outbox_count (
    priority smallint not null,
    parked   boolean  not null,
    n        bigint   not null
);

create function keap_sync.outbox_count_inserted() returns trigger
language plpgsql
security definer
set search_path = pg_catalog, pg_temp
as $$
begin
    insert into keap_sync.outbox_count (priority, parked, n)
    select priority, parked_at is not null, count(*) from added group by 1, 2;
    return null;
end
$$;

create function keap_sync.outbox_count_deleted() returns trigger
language plpgsql
security definer
set search_path = pg_catalog, pg_temp
as $$
begin
    insert into keap_sync.outbox_count (priority, parked, n)
    select priority, parked_at is not null, -count(*) from removed group by 1, 2;
    return null;
end
$$;

create function keap_sync.outbox_count_moved() returns trigger
language plpgsql
security definer
set search_path = pg_catalog, pg_temp
as $$
begin
    insert into keap_sync.outbox_count (priority, parked, n)
    values (old.priority, old.parked_at is not null, -1), (new.priority, new.parked_at is not null, 1);
    return null;
end
$$;

create function keap_sync.outbox_count_truncated() returns trigger
language plpgsql
security definer
set search_path = pg_catalog, pg_temp
as $$
begin
    delete from keap_sync.outbox_count;
    return null;
end
$$;

-- An INSERT … ON CONFLICT DO UPDATE (the enqueue function) fires both the insert and the update
-- triggers; the insert's transition table holds only the rows it inserted.
create trigger outbox_count_inserted after insert on keap_sync.outbox
    referencing new table as added
    for each statement execute function keap_sync.outbox_count_inserted();
create trigger outbox_count_deleted after delete on keap_sync.outbox
    referencing old table as removed
    for each statement execute function keap_sync.outbox_count_deleted();
create trigger outbox_count_moved after update on keap_sync.outbox
    for each row
    when (old.priority is distinct from new.priority
          or (old.parked_at is null) is distinct from (new.parked_at is null))
    execute function keap_sync.outbox_count_moved();
create trigger outbox_count_truncated after truncate on keap_sync.outbox
    for each statement execute function keap_sync.outbox_count_truncated();

-- The rows already queued. Creating the triggers took a lock that keeps every writer of the
-- outbox out until this transaction commits, so nothing is counted twice or missed.
insert into keap_sync.outbox_count (priority, parked, n)
select priority, parked_at is not null, count(*) from keap_sync.outbox group by 1, 2;

-- The age of the oldest pending change (status, metrics) is the first entry of this index.
create index outbox_first_changed_idx on keap_sync.outbox (first_changed_at) where parked_at is null;
