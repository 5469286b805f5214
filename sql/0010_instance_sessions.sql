-- Which database session each daemon instance delivers on, so the instance that takes the
-- delivery lock can tell a crashed instance's claims from a live one's. A process killed with
-- SIGKILL leaves its claims leased (for `delivery.lease_secs`, 120 s by default) although
-- nothing can be delivering them: its sessions ended with it, and with them its delivery lock.
-- The holder of the lock releases the claims of every instance none of whose recorded session
-- is still connected (pid and backend start, so a reused pid does not pass for the old
-- session), and those changes are delivered again within a heartbeat instead of after their
-- lease. Written by each heartbeat; NULL for an instance of an earlier version.
alter table keap_sync.instances
    add column backend_pid   integer,
    add column backend_start timestamptz;
