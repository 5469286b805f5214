-- Deletes and merges in Keap seen by the mirror (issue 29, scope 5; design invariants 20, 21).
-- A linked contact that a hook named but Keap's listing by id did not return, or that a full
-- listing did not see, may be gone in Keap, or the listing may have missed it. Nothing is
-- unlinked on that word alone: the contact is queued here, and the daemon asks Keap for it by
-- id (`GET /v1/contacts/{id}`). A 404 unlinks the user (recorded in `keap_sync.contact_gone`,
-- the user queued to be linked again by email); any contact Keap answers stays linked. One
-- row per contact; the daemon deletes it once Keap has answered.
create table keap_sync.gone_check (
    contact_id bigint primary key,
    noticed_at timestamptz not null default now()
);
