-- Keap talks back, no echo (issue 29, design invariant 18): a hook about a change the mirror
-- already holds costs no call. Keap's hooks fire for keap-sync's own writes too, and a
-- delivery may come twice; each object key carries a `timestamp`, read as the contact's change
-- time (unverified: if it is the send time instead, the contact is simply read, one call).
--
-- `changed_at`, `first_changed_at`: the latest and the earliest `timestamp` the deliveries
-- coalesced into the row gave; both null when any of them had none, or one that does not read
-- as a time with an offset (a null is never taken as a change already seen).
alter table keap_sync.hook_queue
    add column changed_at timestamptz,
    add column first_changed_at timestamptz;

-- Keap's update stamp of keap-sync's own last write to the contact (`last_updated` in Keap's
-- answer to a create or a PATCH), kept apart from `updated_at`: what was sent is merged into
-- the row, but a change someone made in Keap between the row's last read and the write is not,
-- so the write's stamp does not mean the row holds everything up to it. A hook row whose every
-- change is exactly that stamp is the echo of that write.
alter table keap_sync.mirror add column written_at timestamptz;
