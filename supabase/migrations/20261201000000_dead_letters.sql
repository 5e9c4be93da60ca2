-- queue-worker: every dead letter keeps its reason, whatever the pgmq version.
--
-- Replaces queue_worker.archive(text, bigint[], jsonb), queue_worker.archived(text,
-- integer, bigint) and queue_worker.replay(text, bigint) from
-- 20261127000000_queue_worker.sql: same signatures, same results, same grants
-- (create or replace keeps them): callable by service_role only.
--
-- Until now the error that ended a job was kept only in the archived row's
-- `headers` column. Supabase projects on pgmq 1.4.4 have no such column (pgmq 1.5
-- added it), so there the reason was lost and `archived()` showed null. Now each
-- archived message's error is a row of queue_worker.dead_letters, written by
-- archive() in the same transaction as the archive itself, read by archived(), and
-- removed by replay(). Where `headers` exists the error is still written there as
-- before, so SQL that reads `a_<queue>.headers -> 'queue_worker_error'` keeps
-- working; archived() prefers the dead letter and falls back to `headers` for
-- messages archived before this migration.
--
-- The functions stay SECURITY INVOKER: service_role gets what it needs on the new
-- table (select, insert, update, delete), and nobody else gets anything. RLS is on
-- with no policies, as on the worker's other tables: service_role bypasses RLS, any
-- other role sees no rows even if a later grant slips through.

create table if not exists queue_worker.dead_letters (
  queue_name text not null,
  msg_id bigint not null,
  error jsonb not null,
  recorded_at timestamptz not null default pg_catalog.now(),
  constraint dead_letters_pkey primary key (queue_name, msg_id)
);
comment on table queue_worker.dead_letters is
  'Why each message in a pgmq archive (pgmq.a_<queue>) died: written by queue_worker.archive, read by queue_worker.archived, removed by queue_worker.replay. Readable and writable by service_role only.';

alter table queue_worker.dead_letters enable row level security;
revoke all on queue_worker.dead_letters from public, anon, authenticated;
grant select, insert, update, delete on queue_worker.dead_letters to service_role;

-- archive: move messages to pgmq's archive table, the dead-letter store, and record
-- why each one died. `errors` maps a msg_id (as text) to its error. An archived
-- message without an entry in `errors` has no dead letter (a stale one, left by a
-- queue dropped and created again, goes).
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
  reasons jsonb := coalesce(errors, '{}'::jsonb);
  archived_ids bigint[];
begin
  if reasons <> '{}'::jsonb and exists (
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
    using msg_ids, reasons;
  end if;
  select coalesce(pg_catalog.array_agg(a), '{}') into archived_ids
    from pgmq.archive(archive.queue_name, msg_ids) a;
  delete from queue_worker.dead_letters d
   where d.queue_name = archive.queue_name
     and d.msg_id = any(archived_ids)
     and not reasons ? d.msg_id::text;
  insert into queue_worker.dead_letters as d (queue_name, msg_id, error)
  select archive.queue_name, id, reasons -> id::text
    from pg_catalog.unnest(archived_ids) id
   where reasons ? id::text
  on conflict on constraint dead_letters_pkey
  do update set error = excluded.error, recorded_at = excluded.recorded_at;
  return query select pg_catalog.unnest(archived_ids);
end
$$;
comment on function queue_worker.archive(text, bigint[], jsonb) is
  'Moves messages to pgmq.a_<queue> and records each one''s error in queue_worker.dead_letters (and in its headers where the column exists); returns the archived ids. Callable by service_role.';

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
           coalesce(d.error, pg_catalog.to_jsonb(a) -> 'headers' -> 'queue_worker_error')
    from pgmq.%I a
    left join queue_worker.dead_letters d on d.queue_name = $3 and d.msg_id = a.msg_id
    where $1 is null or a.msg_id < $1
    order by a.msg_id desc
    limit least(greatest(coalesce($2, 50), 1), 500)
    $f$, 'a_' || queue_name)
  using before_id, max_rows, queue_name;
end
$$;
comment on function queue_worker.archived(text, integer, bigint) is
  'Archived (dead) messages of a queue with their recorded error, newest first. Callable by service_role.';

-- replay: put an archived message back on its queue as a new message; returns the
-- new msg_id, or null when no such archived message exists. Its dead letter goes.
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
  delete from queue_worker.dead_letters d
   where d.queue_name = replay.queue_name and d.msg_id = replay.msg_id;
  select s into new_id from pgmq.send(replay.queue_name, body) s;
  return new_id;
end
$$;
comment on function queue_worker.replay(text, bigint) is
  'Moves an archived message back onto its queue as a new message and removes its dead letter; returns the new msg_id. Callable by service_role.';

select queue_worker.record_migration('20261201000000_dead_letters');
