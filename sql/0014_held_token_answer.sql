-- A refresh that Keap answered 200 has rotated the pair: the refresh token sent is spent, and
-- the answer holds the only live one. When keap-sync then refused the answer (it named another
-- Keap app than the stored grant's, or a field failed validation), it was thrown away and the
-- grant was lost for good. Such an answer is now kept here, unused, until a new grant is
-- stored; the state detail says so and how to store it (`keap-sync auth import`). It is a
-- secret, like the pair beside it: never logged, never shown by `auth status`.

alter table keap_sync.oauth_token
    add column held_answer text,
    add column held_at timestamptz;
