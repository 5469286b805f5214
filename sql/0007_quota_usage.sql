-- The day's count of Keap calls, in Postgres so that it is shared by every instance and survives
-- restarts and fail-overs (design invariant 15). One row per credential kind and UTC day (Keap's
-- daily quota resets at 00:00 UTC).
--
-- `calls` counts calls *reserved*, not calls made: the daemon reserves them in blocks ahead of
-- need (one statement per block, never one per call), capped at the configured per-day limit,
-- and gives back what it did not use when it stops cleanly. A daemon that crashes loses its
-- unused reservations, which only makes the count higher than the calls made: conservative.
--
-- `last_grant` is what the latest reservation granted: the reservation is a single upsert, and
-- RETURNING sees only the new row, so the statement writes the difference here to return it.
create table keap_sync.quota_usage (
    credential_kind  text    not null check (credential_kind in ('oauth', 'api_key')),
    day              date    not null,
    calls            bigint  not null check (calls >= 0),
    last_grant       bigint  not null default 0,
    updated_at       timestamptz not null default now(),
    primary key (credential_kind, day)
);
