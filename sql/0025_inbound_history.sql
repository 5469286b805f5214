-- What came in from Keap is kept whether or not a column receives it (issue 29): the inbound
-- pass records, for each linked contact it reads, Keap's value of every mapped property,
-- EMAIL1's email status and the tag ids, when they differ from the last recorded
-- (`src/mirror/history.rs`). Such a row names the property and no column; the rows of the
-- inbound columns keep naming their column (and may name no property).
alter table keap_sync.inbound_event
    add column property text,
    alter column column_name drop not null,
    add constraint inbound_event_names_something check (column_name is not null or property is not null);

create index inbound_event_property_last on keap_sync.inbound_event (contact_id, property, id desc)
    where property is not null;
