-- A user parked because the contact its email leads to is linked to another user (one contact,
-- one user: design invariant 13) waited for a change of its own or a `failures retry`, even
-- after the other user's link was gone (the other user deleted, or linked elsewhere), though
-- its message said it would try again by itself.
--
-- The parked row now records the contact it waits for, and the contact map un-parks it the
-- moment no user holds that contact any more, in the statement that frees it, with a NOTIFY to
-- wake the daemon. A row trigger with a WHEN clause: the daemon's many updates of a mapping
-- that keep its contact do not even call the function.

alter table keap_sync.outbox add column waits_for_contact bigint;

create index outbox_waits_for_contact_idx on keap_sync.outbox (waits_for_contact)
    where waits_for_contact is not null;

create function keap_sync.unpark_waiting_for_contact() returns trigger
language plpgsql
set search_path = pg_catalog, pg_temp
as $$
begin
    update keap_sync.outbox o
       set parked_at = null, next_attempt_at = now(), attempts = 0, waits_for_contact = null
     where o.waits_for_contact = old.contact_id
       and o.parked_at is not null
       and not exists (select from keap_sync.contact_map m where m.contact_id = old.contact_id);
    if found then
        perform pg_notify('keap_sync', '');
    end if;
    return null;
end
$$;

create trigger contact_map_frees_contact_on_delete
    after delete on keap_sync.contact_map
    for each row execute function keap_sync.unpark_waiting_for_contact();

create trigger contact_map_frees_contact_on_update
    after update of contact_id on keap_sync.contact_map
    for each row when (old.contact_id is distinct from new.contact_id)
    execute function keap_sync.unpark_waiting_for_contact();
