-- Local mode only (app/local.py), run on the embedded PostgreSQL before the
-- project's migrations: the part of a Supabase project's shape that the
-- migrations need, and nothing more. Never applied to a Supabase project.
-- Idempotent: it runs at every start.

-- The API roles the migrations grant to (Supabase creates them).
do $$
begin
  if not exists (select 1 from pg_catalog.pg_roles where rolname = 'anon') then
    create role anon nologin noinherit;
  end if;
  if not exists (select 1 from pg_catalog.pg_roles where rolname = 'authenticated') then
    create role authenticated nologin noinherit;
  end if;
  if not exists (select 1 from pg_catalog.pg_roles where rolname = 'service_role') then
    create role service_role nologin noinherit bypassrls;
  end if;
end
$$;

-- Vault holds the worker's URL for the webhook trigger. Locally there is no
-- webhook to send (new messages ring through LISTEN/NOTIFY instead), so the
-- view is empty and the trigger returns at once.
create schema if not exists vault;
create or replace view vault.decrypted_secrets as
  select null::text as name, null::text as decrypted_secret
  where false;

-- pg_net's interface, so the migration finds `net.http_post` and does not ask
-- for the pg_net extension (which the embedded server does not have). Nothing
-- calls it while the Vault view above is empty.
create schema if not exists net;
create or replace function net.http_post(
  url text,
  body jsonb default '{}'::jsonb,
  params jsonb default '{}'::jsonb,
  headers jsonb default '{"Content-Type": "application/json"}'::jsonb,
  timeout_milliseconds integer default 5000
) returns bigint
language sql
set search_path = ''
as $$ select null::bigint $$;
comment on function net.http_post(text, jsonb, jsonb, jsonb, integer) is
  'Local mode stand-in for pg_net: sends nothing.';
