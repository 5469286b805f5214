-- Contacts Keap answered 404 for while a user was linked to them: deleted, or merged away, in
-- Keap. The user is linked again by email in the same delivery (never a duplicate); this keeps
-- what it was linked to and when that was found, for a person to look into (`keap-sync status`
-- counts them). Delivery never reads it. A contact found gone again is recorded again.
create table keap_sync.contact_gone (
    contact_id bigint not null,
    user_key text not null,
    found_at timestamptz not null default now(),
    primary key (contact_id, user_key)
);
