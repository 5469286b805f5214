-- Keap talks back, first part (issue 29): the columns of the users table that `[inbound]`
-- makes Keap's are written from the mirror (design invariants 17, 18, 21).
--
-- `inbound_due`: the mirror row was stored (by a sweep, a listing or a lookup's catch-up) and
-- its inbound values have not been applied since. Every store sets it; the daemon's inbound
-- pass clears it only while `read_at` is still the one it read, so a contact stored again
-- meanwhile is applied again. Existing rows start due: turning `[inbound]` on applies what the
-- mirror already holds. Without `[inbound]` nothing reads or clears it.
alter table keap_sync.mirror add column inbound_due boolean not null default true;
create index mirror_inbound_due on keap_sync.mirror (contact_id) where inbound_due;

-- What came in from Keap for a linked user, per inbound column: the value Keap held, and
-- whether it changed the users row (false: the row already held it). A value is recorded when
-- it differs from the last one recorded for that contact and column, or when it changed the
-- row, so a contact listed again by overlapping sweeps adds no row. Never read by delivery.
create table keap_sync.inbound_event (
    id bigint generated always as identity primary key,
    contact_id bigint not null,
    user_key text not null,
    column_name text not null,
    value jsonb not null,
    changed boolean not null,
    at timestamptz not null default now()
);

create index inbound_event_last on keap_sync.inbound_event (contact_id, column_name, id desc);
