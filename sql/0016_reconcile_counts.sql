-- The last `keap-sync reconcile`'s counts, by class, for `status` and `/metrics`: when it ran,
-- how many users it compared, and how many stood in each class other than in sync
-- (`{"differs": 3, "contact_gone": 1, …}`). Counts only: no user key, no value.

alter table keap_sync.mirror_state
    add column reconciled_at timestamptz,
    add column reconciled_users bigint,
    add column drift jsonb;
