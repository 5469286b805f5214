-- The grant belongs to one Keap app (account, tenant). Contact ids are per app, so the contact
-- map is only true for the app whose grant made it: a grant for another app must never be
-- swapped in silently (design invariant 7).
--
-- `account` is the part of Keap's `scope` after `|` (`full|abc123.infusionsoft.com` names
-- `abc123.infusionsoft.com`), lower case; null when the grant named none. `previous_account`
-- and `account_switched_at` record the last deliberate switch (`auth import|login
-- --switch-account`), which also forgets the contact map's links to the old app.

-- The reading of `scope` that src/token.rs (`account_from_scope`) also does: exactly one `|`,
-- then a host name of letters, digits, dots and dashes (surrounding blanks ignored).
create function keap_sync.grant_account(p_scope text) returns text
language sql
immutable
set search_path = pg_catalog, pg_temp
as $$
    select lower(substring(p_scope from '^[^|]*\|\s*([A-Za-z0-9.-]*[A-Za-z0-9][A-Za-z0-9.-]*)\s*$'))
$$;

alter table keap_sync.oauth_token
    add column account             text,
    add column previous_account    text,
    add column account_switched_at timestamptz;

update keap_sync.oauth_token set account = keap_sync.grant_account(scope) where scope is not null;
