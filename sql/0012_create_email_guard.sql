-- The guard of 0005 against two creates for one email in flight at once never held. Its index
-- reads `create_sent ->> 'email'`, but the body of a create (a Keap REST v1 contact) carries
-- its address in `email_addresses`, so every create in flight had NULL there and none kept
-- another out: two new users with one email, delivered at the same moment, both sent their
-- create, and Keap's upsert by email made one contact holding the second user's values over
-- the first's (design invariant 14).
--
-- The index now reads the body's EMAIL1 address, the one a lookup by email uses. Rows that
-- already hold one address twice (in-doubt creates the old index let in) keep it on the row of
-- the lowest key only: the other creates upserted that same contact, which only one user can
-- link, so looking it up first can find nothing of their own.

drop index keap_sync.outbox_create_email_idx;

update keap_sync.outbox o
   set create_sent = null
 where o.create_sent is not null
   and exists (
       select from keap_sync.outbox p
        where p.create_sent is not null
          and p.user_key < o.user_key
          and lower(jsonb_path_query_first(p.create_sent, '$.email_addresses[*] ? (@.field == "EMAIL1").email') #>> '{}')
            = lower(jsonb_path_query_first(o.create_sent, '$.email_addresses[*] ? (@.field == "EMAIL1").email') #>> '{}'));

create unique index outbox_create_email_idx on keap_sync.outbox
    (lower(jsonb_path_query_first(create_sent, '$.email_addresses[*] ? (@.field == "EMAIL1").email') #>> '{}'))
    where create_sent is not null;
