-- A user whose key changes keeps its Keap contact: the mapping moves to the new key, so the new
-- key is PATCHed (not upserted as a stranger) and the old key's queued change finds no mapping
-- (so `on_delete = delete_contact` cannot delete the contact the user still has).

create or replace function keap_sync.capture() returns trigger
language plpgsql
security definer
set search_path = pg_catalog, pg_temp
as $$
declare
    key_col  text := tg_argv[0];
    new_doc  jsonb;
    old_doc  jsonb;
    changed  boolean := false;
    i        integer;
begin
    if tg_op = 'DELETE' then
        old_doc := to_jsonb(old);
        if old_doc ->> key_col is not null then
            perform keap_sync.enqueue(old_doc ->> key_col);
        end if;
        return null;
    end if;

    new_doc := to_jsonb(new);
    if tg_op = 'UPDATE' then
        old_doc := to_jsonb(old);
        if (old_doc -> key_col) is distinct from (new_doc -> key_col) then
            if old_doc ->> key_col is not null then
                if new_doc ->> key_col is not null then
                    update keap_sync.contact_map
                       set user_key = new_doc ->> key_col
                     where user_key = old_doc ->> key_col
                       and not exists (select from keap_sync.contact_map where user_key = new_doc ->> key_col);
                end if;
                perform keap_sync.enqueue(old_doc ->> key_col);
            end if;
            changed := true;
        else
            for i in 1 .. tg_nargs - 1 loop
                if (old_doc -> tg_argv[i]) is distinct from (new_doc -> tg_argv[i]) then
                    changed := true;
                    exit;
                end if;
            end loop;
        end if;
        if not changed then
            return null;
        end if;
    end if;

    if new_doc ->> key_col is not null then
        perform keap_sync.enqueue(new_doc ->> key_col);
    end if;
    return null;
end
$$;
