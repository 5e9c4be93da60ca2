-- queue-worker: a ledger of the queue-worker migrations a database has applied.
--
-- Every migration from this one on ends with
--   select queue_worker.record_migration('<its file name without .sql>');
-- so the service's preflight (`queue-worker check`) can tell which of the SQL files
-- a release ships are missing from a project, and `migrate` what is left to apply.
-- The migrations before this one are recorded here: the ledger only ever grows, and
-- each file is idempotent, so applying one twice records it once.

create table if not exists queue_worker.migrations (
  name text primary key check (name ~ '^[0-9]{14}_[a-z0-9_]+$'),
  applied_at timestamptz not null default pg_catalog.now()
);
comment on table queue_worker.migrations is
  'queue-worker migrations applied to this database. Written by the migrations; readable by service_role.';
-- Row level security without policies: only the owner and service_role (BYPASSRLS)
-- see rows, whatever grants a later migration adds.
alter table queue_worker.migrations enable row level security;
revoke all on queue_worker.migrations from public, anon, authenticated;
grant select on queue_worker.migrations to service_role;

-- record_migration: called at the end of each migration file, by the role that
-- applies the migrations (the owner); nobody else.
create or replace function queue_worker.record_migration(name text)
returns void
language sql
set search_path = ''
as $$
  insert into queue_worker.migrations (name) values (record_migration.name)
  on conflict do nothing
$$;
comment on function queue_worker.record_migration(text) is
  'Records a queue-worker migration as applied. Called by the migrations (the owner) only.';
revoke all on function queue_worker.record_migration(text) from public, anon, authenticated, service_role;

-- applied_migrations: the names of the applied migrations, oldest first.
create or replace function queue_worker.applied_migrations()
returns setof text
language sql
stable
set search_path = ''
as $$
  select m.name from queue_worker.migrations m order by m.name
$$;
comment on function queue_worker.applied_migrations() is
  'Names of the queue-worker migrations applied here, oldest first. Callable by service_role.';
revoke all on function queue_worker.applied_migrations() from public, anon, authenticated;
grant execute on function queue_worker.applied_migrations() to service_role;

select queue_worker.record_migration(m.name)
from pg_catalog.unnest(array[
  '20261127000000_queue_worker',
  '20261127000100_payments',
  '20261127000200_reports',
  '20261127000300_signed_webhooks',
  '20261128000000_read_headers',
  '20261130000000_migration_ledger'
]) as m(name);
