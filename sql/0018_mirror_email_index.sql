-- The mirror's index of every address slot answers each new user's lookup (`[mirror] lookups`).
-- With GIN's default fast update, rows written since the last vacuum sit in a pending list that
-- every lookup scans in full: during a first sync each created contact is written to the mirror,
-- and a lookup took 1.2 ms (pg_stat_statements, the perf bench's first sync by the mirror)
-- instead of a few microseconds. A contact has one to three addresses, so updating the index at
-- once costs little; lookups then stay an index probe however many contacts were just written.
alter index keap_sync.mirror_emails set (fastupdate = off);
select gin_clean_pending_list('keap_sync.mirror_emails'::regclass);
