-- Supabase installs pgcrypto into the `extensions` schema. The embedded server's
-- build has no OpenSSL and so no pgcrypto; nothing in the migrations needs it yet.
create schema if not exists extensions;
grant usage on schema extensions to public;
do $$
begin
  if exists (select 1 from pg_available_extensions where name = 'pgcrypto') then
    create extension if not exists pgcrypto with schema extensions;
  end if;
end
$$;
