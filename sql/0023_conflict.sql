-- A property both sides may change (`owner = "shared"`, issue 29 scope 1; design invariant
-- 17): the same property changed in the table and in Keap since keap-sync last saw them agree
-- is a conflict. It is settled by the mapping's `prefer`, never by comparing the two systems'
-- clocks, and recorded here, once per pair of values: the column, who won, and both values.
-- Written by delivery, which reads the contact before it sends a changed shared property.
create table keap_sync.conflict (
    id bigint generated always as identity primary key,
    user_key text not null,
    contact_id bigint not null,
    column_name text not null,
    property text not null,
    winner text not null check (winner in ('app', 'keap')),
    app_value text,
    keap_value text,
    at timestamptz not null default now()
);

create index conflict_user on keap_sync.conflict (user_key, column_name, id desc);
