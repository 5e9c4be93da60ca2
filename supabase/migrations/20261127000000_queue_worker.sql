-- queue-worker: queues, the worker's RPC surface and the webhook triggers.
--
-- Apply with `supabase db push` (runs as the `postgres` role, which is not a
-- superuser) or paste into the SQL editor. Every statement is idempotent, so
-- applying the file twice changes nothing.
--
-- Uses only what pgmq 1.5.1 (and 1.4.4) provides; see README "Supabase setup".

-- ---------------------------------------------------------------------------
-- Extensions. On Supabase both are available; the guards keep this file
-- working where pgmq was installed from its SQL script (no pg_extension row)
-- and where pg_net's schema already exists.
-- ---------------------------------------------------------------------------
do $$
begin
  if not exists (
    select 1 from pg_catalog.pg_proc p
    join pg_catalog.pg_namespace n on n.oid = p.pronamespace
    where n.nspname = 'pgmq' and p.proname = 'create'
  ) then
    create extension if not exists pgmq;
  end if;
  if not exists (
    select 1 from pg_catalog.pg_proc p
    join pg_catalog.pg_namespace n on n.oid = p.pronamespace
    where n.nspname = 'net' and p.proname = 'http_post'
  ) then
    create extension if not exists pg_net;
  end if;
end
$$;

-- ---------------------------------------------------------------------------
-- The queues.
-- ---------------------------------------------------------------------------
do $$
declare
  q text;
begin
  foreach q in array array['email_queue', 'reports_queue', 'payments_queue'] loop
    if not exists (select 1 from pgmq.meta m where m.queue_name = q) then
      perform pgmq.create(q);
    end if;
  end loop;
end
$$;

-- ---------------------------------------------------------------------------
-- The worker's schema. Expose it to the API (Dashboard > Settings > API >
-- Exposed schemas, or `schemas` under [api] in supabase/config.toml).
-- Only service_role may use it: anon and authenticated get nothing.
-- ---------------------------------------------------------------------------
create schema if not exists queue_worker;
comment on schema queue_worker is
  'RPC surface of queue-worker: callable by service_role only.';
revoke all on schema queue_worker from public;
grant usage on schema queue_worker to service_role;

-- The functions below are SECURITY INVOKER: they run with service_role's own
-- rights, which are exactly these grants on the worker's three queues.
grant usage on schema pgmq to service_role;
do $$
declare
  q text;
begin
  foreach q in array array['email_queue', 'reports_queue', 'payments_queue'] loop
    execute format('grant select, insert, update, delete on pgmq.%I, pgmq.%I to service_role',
                   'q_' || q, 'a_' || q);
    execute format('grant usage, select on sequence pgmq.%I to service_role',
                   'q_' || q || '_msg_id_seq');
  end loop;
end
$$;
grant select on pgmq.meta to service_role;

-- A claimed message as the worker sees it: pgmq's message_record without the
-- columns that differ between pgmq versions (last_read_at; headers is read by
-- key, so queues created before pgmq 1.5 return null).
do $$
begin
  if not exists (select 1 from pg_catalog.pg_type t
                 join pg_catalog.pg_namespace n on n.oid = t.typnamespace
                 where n.nspname = 'queue_worker' and t.typname = 'message') then
    create type queue_worker.message as (
      msg_id bigint,
      read_ct integer,
      enqueued_at timestamptz,
      vt timestamptz,
      message jsonb,
      headers jsonb
    );
  end if;
end
$$;

-- Resolves a queue name to its table, refusing names pgmq does not know.
-- Queue names come from the caller, so they are checked before any dynamic SQL.
create or replace function queue_worker.queue_table(queue_name text)
returns text
language plpgsql
stable
set search_path = ''
as $$
begin
  if queue_name is null or queue_name !~ '^[a-z0-9_]{1,47}$'
     or not exists (select 1 from pgmq.meta m where m.queue_name = queue_table.queue_name) then
    raise exception 'unknown queue: %', queue_name
      using errcode = 'P0001', hint = 'Create it with pgmq.create() or check the name.';
  end if;
  return pg_catalog.format('pgmq.%I', 'q_' || queue_name);
end
$$;
comment on function queue_worker.queue_table(text) is
  'Internal: validated pgmq table name for a queue. Callable by service_role.';

-- claim: take the given messages if, and only if, they are visible now.
-- A message already claimed (vt in the future), locked by a concurrent reader,
-- or gone is skipped, so a repeated webhook can never run a job twice.
create or replace function queue_worker.claim(queue_name text, msg_ids bigint[], vt integer)
returns setof queue_worker.message
language plpgsql
set search_path = ''
as $$
declare
  qtable text := queue_worker.queue_table(queue_name);
begin
  if vt is null or vt < 1 then
    raise exception 'vt must be a positive number of seconds' using errcode = '22023';
  end if;
  return query execute pg_catalog.format(
    $q$
    with visible as (
      select q.msg_id from %1$s q
      where q.msg_id = any($1) and q.vt <= pg_catalog.clock_timestamp()
      for update skip locked
    )
    update %1$s q
       set vt = pg_catalog.clock_timestamp() + pg_catalog.make_interval(secs => $2),
           read_ct = q.read_ct + 1
      from visible
     where q.msg_id = visible.msg_id
    returning q.msg_id, q.read_ct, q.enqueued_at, q.vt, q.message,
              pg_catalog.to_jsonb(q) -> 'headers'
    $q$, qtable)
  using msg_ids, vt;
end
$$;
comment on function queue_worker.claim(text, bigint[], integer) is
  'Claims the visible messages among msg_ids for vt seconds and returns them. Callable by service_role.';

-- read: claim up to qty visible messages, oldest first (pgmq.read).
create or replace function queue_worker.read(queue_name text, vt integer, qty integer)
returns setof queue_worker.message
language plpgsql
set search_path = ''
as $$
begin
  perform queue_worker.queue_table(queue_name);
  return query
    select r.msg_id, r.read_ct, r.enqueued_at, r.vt, r.message,
           pg_catalog.to_jsonb(r) -> 'headers'
    from pgmq.read(queue_name, vt, qty) r;
end
$$;
comment on function queue_worker.read(text, integer, integer) is
  'Claims up to qty visible messages for vt seconds (pgmq.read). Callable by service_role.';

-- ack: delete processed messages; returns the ids that were deleted.
create or replace function queue_worker.ack(queue_name text, msg_ids bigint[])
returns setof bigint
language plpgsql
set search_path = ''
as $$
begin
  perform queue_worker.queue_table(queue_name);
  return query select d from pgmq.delete(queue_name, msg_ids) d;
end
$$;
comment on function queue_worker.ack(text, bigint[]) is
  'Deletes processed messages (pgmq.delete) and returns the deleted ids. Callable by service_role.';

-- set_vt: make messages visible again vt seconds from now. The worker uses it to
-- retry with a delay (vt = backoff), to extend a running job's lease (the
-- heartbeat) and to release a job it gives up at shutdown (vt = 0).
create or replace function queue_worker.set_vt(queue_name text, msg_ids bigint[], vt integer)
returns setof bigint
language plpgsql
set search_path = ''
as $$
declare
  id bigint;
begin
  perform queue_worker.queue_table(queue_name);
  if vt is null or vt < 0 then
    raise exception 'vt must be zero or more seconds' using errcode = '22023';
  end if;
  -- pgmq 1.5.1 has only the single-message set_vt(text, bigint, integer).
  foreach id in array coalesce(msg_ids, '{}') loop
    if exists (select 1 from pgmq.set_vt(queue_name, id, vt)) then
      return next id;
    end if;
  end loop;
end
$$;
comment on function queue_worker.set_vt(text, bigint[], integer) is
  'Makes messages visible at now() + vt seconds; returns the ids found. Callable by service_role.';

-- archive: move messages to pgmq's archive table, the dead-letter store. `errors`
-- maps a msg_id (as text) to the error that ended it; it is kept in the archived
-- row's headers under "queue_worker_error" (queues created by pgmq >= 1.5 have a
-- headers column; on older queues the error is not recorded).
create or replace function queue_worker.archive(
  queue_name text,
  msg_ids bigint[],
  errors jsonb default '{}'::jsonb
)
returns setof bigint
language plpgsql
set search_path = ''
as $$
declare
  qtable text := queue_worker.queue_table(queue_name);
begin
  if coalesce(errors, '{}'::jsonb) <> '{}'::jsonb and exists (
    select 1 from pg_catalog.pg_attribute a
    where a.attrelid = qtable::regclass and a.attname = 'headers' and not a.attisdropped
  ) then
    execute pg_catalog.format(
      $q$
      update %s q
         set headers = coalesce(q.headers, '{}'::jsonb)
                       || jsonb_build_object('queue_worker_error', $2 -> q.msg_id::text)
       where q.msg_id = any($1) and $2 ? q.msg_id::text
      $q$, qtable)
    using msg_ids, errors;
  end if;
  return query select a from pgmq.archive(queue_name, msg_ids) a;
end
$$;
comment on function queue_worker.archive(text, bigint[], jsonb) is
  'Moves messages to pgmq.a_<queue>, recording each one''s error in its headers; returns the archived ids. Callable by service_role.';

-- send: enqueue one message; returns its msg_id.
create or replace function queue_worker.send(queue_name text, message jsonb, delay_seconds integer default 0)
returns bigint
language plpgsql
set search_path = ''
as $$
declare
  new_id bigint;
begin
  perform queue_worker.queue_table(queue_name);
  select s into new_id from pgmq.send(queue_name, message, coalesce(delay_seconds, 0)::integer) s;
  return new_id;
end
$$;
comment on function queue_worker.send(text, jsonb, integer) is
  'Enqueues one message (pgmq.send) and returns its msg_id. Callable by service_role.';

-- metrics: depth, visible length and age of each of the worker's queues, in one
-- call (the service caches it for a few seconds, so scrapes never hammer the
-- database). Computed here rather than from pgmq.metrics, whose columns differ
-- between pgmq versions.
create or replace function queue_worker.metrics()
returns table (
  queue_name text,
  queue_length bigint,
  visible_length bigint,
  oldest_msg_age_sec integer,
  newest_msg_age_sec integer
)
language plpgsql
stable
set search_path = ''
as $$
declare
  q text;
begin
  for q in
    select m.queue_name from pgmq.meta m
    where m.queue_name in ('email_queue', 'reports_queue', 'payments_queue')
    order by m.queue_name
  loop
    return query execute pg_catalog.format(
      $f$
      select %L::text, count(*), count(*) filter (where vt <= pg_catalog.now()),
             extract(epoch from (pg_catalog.now() - min(enqueued_at)))::integer,
             extract(epoch from (pg_catalog.now() - max(enqueued_at)))::integer
      from %s
      $f$, q, queue_worker.queue_table(q));
  end loop;
end
$$;
comment on function queue_worker.metrics() is
  'Length, visible length, oldest and newest message age of the worker''s queues. Callable by service_role.';

-- archived: dead messages of a queue with the error that ended them, newest first,
-- paginated by msg_id (pass the last msg_id seen as before_id).
create or replace function queue_worker.archived(
  queue_name text,
  max_rows integer default 50,
  before_id bigint default null
)
returns table (
  msg_id bigint,
  read_ct integer,
  enqueued_at timestamptz,
  archived_at timestamptz,
  message jsonb,
  error jsonb
)
language plpgsql
stable
set search_path = ''
as $$
begin
  perform queue_worker.queue_table(queue_name);
  return query execute pg_catalog.format(
    $f$
    select a.msg_id, a.read_ct, a.enqueued_at, a.archived_at, a.message,
           pg_catalog.to_jsonb(a) -> 'headers' -> 'queue_worker_error'
    from pgmq.%I a
    where $1 is null or a.msg_id < $1
    order by a.msg_id desc
    limit least(greatest(coalesce($2, 50), 1), 500)
    $f$, 'a_' || queue_name)
  using before_id, max_rows;
end
$$;
comment on function queue_worker.archived(text, integer, bigint) is
  'Archived (dead) messages of a queue with their recorded error, newest first. Callable by service_role.';

-- replay: put an archived message back on its queue as a new message; returns the
-- new msg_id, or null when no such archived message exists.
create or replace function queue_worker.replay(queue_name text, msg_id bigint)
returns bigint
language plpgsql
set search_path = ''
as $$
declare
  body jsonb;
  new_id bigint;
  moved integer;
begin
  perform queue_worker.queue_table(queue_name);
  execute pg_catalog.format(
    'delete from pgmq.%I a where a.msg_id = $1 returning a.message', 'a_' || queue_name)
  into body
  using replay.msg_id;
  get diagnostics moved = row_count;
  if moved = 0 then
    return null;
  end if;
  select s into new_id from pgmq.send(queue_name, body) s;
  return new_id;
end
$$;
comment on function queue_worker.replay(text, bigint) is
  'Moves an archived message back onto its queue as a new message; returns the new msg_id. Callable by service_role.';

-- ---------------------------------------------------------------------------
-- Webhook triggers: each new queue row rings the worker's doorbell through
-- pg_net. The URL and the bearer secret come from Vault:
--   select vault.create_secret('https://my-worker.fly.dev', 'queue_worker_url');
--   select vault.create_secret('<long random secret>', 'queue_worker_webhook_secret');
-- Without a URL secret the trigger does nothing. A failing webhook never fails
-- the insert: the queue is the source of truth and the worker's sweeper picks
-- up anything a webhook missed.
--
-- SECURITY DEFINER because the inserting role (for example authenticated,
-- through pgmq_public.send) may not read Vault; the function runs as its owner
-- (postgres), reads only the two secrets and calls only net.http_post.
-- ---------------------------------------------------------------------------
create or replace function queue_worker.notify_webhook()
returns trigger
language plpgsql
security definer
set search_path = ''
as $$
declare
  base_url text;
  secret text;
  headers jsonb := '{"Content-Type": "application/json"}'::jsonb;
begin
  begin
    select s.decrypted_secret into base_url
      from vault.decrypted_secrets s where s.name = 'queue_worker_url';
    if coalesce(base_url, '') = '' then
      return null;
    end if;
    select s.decrypted_secret into secret
      from vault.decrypted_secrets s where s.name = 'queue_worker_webhook_secret';
    if coalesce(secret, '') <> '' then
      headers := headers || jsonb_build_object('Authorization', 'Bearer ' || secret);
    end if;
    perform net.http_post(
      url := pg_catalog.rtrim(base_url, '/') || '/webhooks/' || pg_catalog.substr(tg_table_name, 3),
      body := jsonb_build_object(
        'type', tg_op,
        'table', tg_table_name,
        'schema', tg_table_schema,
        'record', pg_catalog.to_jsonb(new),
        'old_record', null
      ),
      headers := headers,
      timeout_milliseconds := 5000
    );
  exception when others then
    raise warning 'queue_worker.notify_webhook: webhook for %.% not sent: %',
      tg_table_schema, tg_table_name, sqlerrm;
  end;
  return null;
end
$$;
comment on function queue_worker.notify_webhook() is
  'AFTER INSERT trigger on pgmq queue tables: POSTs a Database Webhook payload to queue-worker via pg_net.';

do $$
declare
  q text;
begin
  foreach q in array array['email_queue', 'reports_queue', 'payments_queue'] loop
    execute pg_catalog.format(
      'create or replace trigger queue_worker_webhook after insert on pgmq.%I
         for each row execute function queue_worker.notify_webhook()', 'q_' || q);
  end loop;
end
$$;

-- Nobody but service_role calls the worker's functions; the trigger function
-- is called by its trigger only.
revoke all on all functions in schema queue_worker from public, anon, authenticated;
grant execute on function
  queue_worker.queue_table(text),
  queue_worker.claim(text, bigint[], integer),
  queue_worker.read(text, integer, integer),
  queue_worker.ack(text, bigint[]),
  queue_worker.set_vt(text, bigint[], integer),
  queue_worker.archive(text, bigint[], jsonb),
  queue_worker.send(text, jsonb, integer),
  queue_worker.metrics(),
  queue_worker.archived(text, integer, bigint),
  queue_worker.replay(text, bigint)
to service_role;
