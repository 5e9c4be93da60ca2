-- Cluster-wide roles as a Supabase project has them. Roles are global to the
-- server, so every statement here is idempotent: several test databases on one
-- server share them.
do $$
begin
  if not exists (select 1 from pg_roles where rolname = 'anon') then
    create role anon nologin noinherit;
  end if;
  if not exists (select 1 from pg_roles where rolname = 'authenticated') then
    create role authenticated nologin noinherit;
  end if;
  if not exists (select 1 from pg_roles where rolname = 'service_role') then
    create role service_role nologin noinherit bypassrls;
  end if;
  -- PostgREST logs in as `authenticator` and switches to the request's role.
  if not exists (select 1 from pg_roles where rolname = 'authenticator') then
    create role authenticator login noinherit;
  end if;
  -- Plays Supabase's `postgres` role: not a superuser, owns pgmq's objects and
  -- applies the migrations (`supabase db push` runs as `postgres`).
  if not exists (select 1 from pg_roles where rolname = 'qw_postgres') then
    create role qw_postgres login nosuperuser createrole noinherit;
  end if;
end
$$;

grant anon, authenticated, service_role to authenticator;
grant anon, authenticated, service_role to qw_postgres;
