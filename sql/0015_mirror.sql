-- keap-sync's picture of Keap: one row per Keap contact it has listed, filled by a full v2
-- listing (`GET /v2/contacts`, 1,000 a page) and kept fresh by sweeps of Keap's update time.
-- It lets keap-sync link a new user to the contact that holds its address without a lookup
-- per user, and compare the table with Keap (`reconcile`). Never the source of truth for a
-- write: delivery still reads Keap before it writes an array property or adopts a contact.
-- Personal data is kept only as far as the mapping reads it (the mapped properties, email
-- addresses, tag ids); `uninstall` drops it with the schema.

create table keap_sync.mirror (
    contact_id bigint primary key,
    -- Every address of the contact, lower-cased (ASCII), EMAIL1 first; and EMAIL1 alone,
    -- the address a user is linked by.
    emails text[] not null default '{}',
    email1 text,
    -- The contact's mapped properties, in v1 shape, as Keap holds them.
    contact jsonb not null,
    tag_ids bigint[] not null default '{}',
    -- EMAIL1's marketability, as Keap reported it (NULL: not reported).
    opted_in boolean,
    -- Keap's update time of the contact, and when keap-sync read it.
    updated_at timestamptz,
    read_at timestamptz not null default now()
);

create index mirror_email1 on keap_sync.mirror (email1);
create index mirror_emails on keap_sync.mirror using gin (emails);

-- One row: how far the mirror reaches. `watermark`: every change Keap made up to then is in
-- the mirror; `listing_token` and `listing_started_at`: a full listing in progress (resumed
-- from its next page after a restart); `listed_at`: when the last full listing started that
-- completed (a contact not seen by it is gone from Keap).
create table keap_sync.mirror_state (
    one boolean primary key default true check (one),
    watermark timestamptz,
    listing_token text,
    listing_started_at timestamptz,
    listed_at timestamptz
);

insert into keap_sync.mirror_state default values;
