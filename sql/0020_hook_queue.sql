-- Keap talks back through hooks (issue 29, scope 4): the ids Keap's REST hooks name, queued
-- by the receiver and taken by the daemon, which reads each contact as it is now (design
-- invariant 2: state, not events). One row per contact: a contact named again before it was
-- read is coalesced into its row (`deliveries` counts them, `queued_at` moves), so duplicate,
-- late and out-of-order deliveries cost one read. The daemon deletes a row once the contact's
-- read is stored, and only if it was not queued again meanwhile (`queued_at` unchanged).
create table keap_sync.hook_queue (
    contact_id bigint primary key,
    queued_at timestamptz not null default clock_timestamp(),
    deliveries integer not null default 1
);
