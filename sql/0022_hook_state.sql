-- Keap talks back through hooks (issue 29, scope 4): our hook subscriptions as last seen in
-- Keap (`GET /v1/hooks`), written by the daemon's watchdog and by `keap-sync hooks …`, read by
-- `keap-sync status` (which never calls Keap). One row per hook of ours; the URL is stored
-- with the receiver's secret path masked. Replaced whole at each look.
create table keap_sync.hook_state (
    key text primary key,
    event_key text not null,
    status text not null,
    url text not null,
    checked_at timestamptz not null default now()
);
