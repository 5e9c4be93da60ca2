-- queue-worker: pause and resume a queue; dead letters replayed, purged and expired in batches.
--
-- Pause. queue_worker.queues gains `paused_at` (null: running). While it is set,
-- claim() and read() return nothing for the queue, whichever replica asks: the
-- flag is in the database, so a replica that has not heard of the pause yet
-- still claims nothing. A claim that began before the pause committed finishes
-- (its jobs run); none that begins after it takes a message. Acks, retries and
-- archives go on, so jobs running at the pause end normally. Messages stay in
-- the queue and run once the queue is resumed.
--
--   select queue_worker.pause('sms_queue');    -- true: paused now (false: already)
--   select queue_worker.resume('sms_queue');   -- true: resumed now (false: was not paused)
--
-- Dead letters at scale. replay_dead() and purge_dead() act on the archived
-- messages of one queue that match a filter (text in the error, archived within a
-- time range), in a window of at most 1,000 archived rows by msg_id per call: the
-- caller passes the last msg_id it was given back (`after_id`) and calls again
-- until `scanned` is 0. So a million dead letters are a thousand short
-- transactions, never one statement holding a million row locks. expire_dead()
-- deletes up to max_rows dead letters archived before a time (ARCHIVE_RETENTION_DAYS
-- calls it in a loop).
--
-- Replay keeps the job's headers (an idempotency key, a trace context), less the
-- `queue_worker_error` that archive() added: until now replay() sent the body
-- alone. Replaces queue_worker.replay(text, bigint) from 20261201000000_dead_letters.sql
-- (same signature, result and grants), and claim() and read() from
-- 20261201003100_idempotency_keys.sql (same signatures, results and grants; the
-- only change is the paused check first).
--
-- Every new function is SECURITY INVOKER and callable by service_role only, which
-- may change `paused_at` and nothing else of the catalogue. Every statement is idempotent.

alter table queue_worker.queues add column if not exists paused_at timestamptz;
comment on column queue_worker.queues.paused_at is
  'When the queue was paused (queue_worker.pause); null while it runs. A paused queue is claimed by no replica. Set by queue_worker.pause and resume (service_role).';
grant update (paused_at) on queue_worker.queues to service_role;

-- ---------------------------------------------------------------------------
-- pause / resume / paused_queues
-- ---------------------------------------------------------------------------
create or replace function queue_worker.pause(queue_name text)
returns boolean
language plpgsql
set search_path = ''
as $$
declare
  changed integer;
begin
  perform queue_worker.queue_table(queue_name);
  update queue_worker.queues c set paused_at = pg_catalog.now()
   where c.queue_name = pause.queue_name and c.paused_at is null;
  get diagnostics changed = row_count;
  return changed > 0;
end
$$;
comment on function queue_worker.pause(text) is
  'Pauses an attached queue: claim and read return nothing for it until resume. True when it was running. Callable by service_role.';

create or replace function queue_worker.resume(queue_name text)
returns boolean
language plpgsql
set search_path = ''
as $$
declare
  changed integer;
begin
  perform queue_worker.queue_table(queue_name);
  update queue_worker.queues c set paused_at = null
   where c.queue_name = resume.queue_name and c.paused_at is not null;
  get diagnostics changed = row_count;
  return changed > 0;
end
$$;
comment on function queue_worker.resume(text) is
  'Resumes a paused queue. True when it was paused. Callable by service_role.';

create or replace function queue_worker.paused_queues()
returns table (queue_name text, paused_at timestamptz)
language sql
stable
set search_path = ''
as $$
  select c.queue_name, c.paused_at from queue_worker.queues c
   where c.paused_at is not null order by c.queue_name
$$;
comment on function queue_worker.paused_queues() is
  'The paused attached queues and when each was paused. Callable by service_role.';

-- Internal: true when the queue is paused (claim and read ask first).
create or replace function queue_worker._paused(queue_name text)
returns boolean
language sql
stable
set search_path = ''
as $$
  select exists (select from queue_worker.queues c
                  where c.queue_name = _paused.queue_name and c.paused_at is not null)
$$;
comment on function queue_worker._paused(text) is
  'Internal to claim and read: whether the queue is paused. Callable by service_role.';

-- ---------------------------------------------------------------------------
-- claim and read: as in 20261201003100_idempotency_keys.sql, nothing for a paused queue.
-- ---------------------------------------------------------------------------
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
  if queue_worker._paused(queue_name) then
    return;
  end if;
  if exists (select from queue_worker.idempotency_keys k where k.queue_name = claim.queue_name) then
    return query select * from queue_worker._claim_unless_done(
      queue_name, coalesce(msg_ids, '{}'), null, vt);
    return;
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
  'Claims the visible messages among msg_ids for vt seconds and returns them; one whose idempotency key has succeeded is deleted instead; nothing while the queue is paused. Callable by service_role.';

create or replace function queue_worker.read(queue_name text, vt integer, qty integer)
returns setof queue_worker.message
language plpgsql
set search_path = ''
as $$
declare
  qtable text := queue_worker.queue_table(queue_name);
begin
  if queue_worker._paused(queue_name) then
    return;
  end if;
  if exists (select from queue_worker.idempotency_keys k where k.queue_name = read.queue_name) then
    if vt is null or vt < 0 then
      raise exception 'vt must be zero or more seconds' using errcode = '22023';
    end if;
    return query select * from queue_worker._claim_unless_done(queue_name, null, qty, vt);
    return;
  end if;
  if exists (
    select from pg_catalog.pg_attribute a
      join pg_catalog.pg_type t on a.attrelid = t.typrelid
     where t.oid = 'pgmq.message_record'::pg_catalog.regtype
       and a.attname = 'headers'
       and not a.attisdropped
  ) then
    return query
      select r.msg_id, r.read_ct, r.enqueued_at, r.vt, r.message, r.headers
      from pgmq.read(queue_name, vt, qty) r;
  else
    return query
      select r.msg_id, r.read_ct, r.enqueued_at, r.vt, r.message, null::jsonb
      from pgmq.read(queue_name, vt, qty) r;
  end if;
end
$$;
comment on function queue_worker.read(text, integer, integer) is
  'Claims up to qty visible messages for vt seconds (pgmq.read); one whose idempotency key has succeeded is deleted instead; nothing while the queue is paused. Callable by service_role.';

-- ---------------------------------------------------------------------------
-- Replaying and purging dead letters.
-- ---------------------------------------------------------------------------

-- Internal: sends an archived message's body back with its headers (pgmq >= 1.5),
-- less the error archive() wrote there; returns the new msg_id.
create or replace function queue_worker._send_again(queue_name text, body jsonb, headers jsonb)
returns bigint
language plpgsql
set search_path = ''
as $$
declare
  kept jsonb := case when pg_catalog.jsonb_typeof(headers) = 'object'
                     then headers - 'queue_worker_error' end;
  new_id bigint;
begin
  if kept is null or kept = '{}'::jsonb then
    select s into new_id from pgmq.send(queue_name, body, 0) s;
  else
    select s into new_id from pgmq.send(queue_name, body, kept, 0) s;
  end if;
  return new_id;
end
$$;
comment on function queue_worker._send_again(text, jsonb, jsonb) is
  'Internal to replay and replay_dead: enqueues an archived body again with its headers, less queue_worker_error. Callable by service_role.';

-- replay: as in 20261201000000_dead_letters.sql, the job's headers kept.
create or replace function queue_worker.replay(queue_name text, msg_id bigint)
returns bigint
language plpgsql
set search_path = ''
as $$
declare
  row_json jsonb;
begin
  perform queue_worker.queue_table(queue_name);
  execute pg_catalog.format(
    'delete from pgmq.%I a where a.msg_id = $1 returning pg_catalog.to_jsonb(a)', 'a_' || queue_name)
  into row_json
  using replay.msg_id;
  if row_json is null then
    return null;
  end if;
  delete from queue_worker.dead_letters d
   where d.queue_name = replay.queue_name and d.msg_id = replay.msg_id;
  return queue_worker._send_again(queue_name, row_json -> 'message', row_json -> 'headers');
end
$$;
comment on function queue_worker.replay(text, bigint) is
  'Moves an archived message back onto its queue as a new message, with its headers, and removes its dead letter; returns the new msg_id. Callable by service_role.';

-- Internal: the statement that picks a window of archived rows (msg_id > $1, at
-- most $2) and says which of them match the filter (msg_id <= $6 when given; $3
-- text in the error, any case; archived at or after $4, before $5; a null filter
-- matches all). The bound $6 keeps a pass from meeting again what it replayed and
-- was archived anew (a new message has a higher msg_id).
create or replace function queue_worker._dead_window(queue_name text)
returns text
language plpgsql
stable
set search_path = ''
as $$
begin
  perform queue_worker.queue_table(queue_name);
  -- Each call costs its window, whatever the archive's size and whether its
  -- statistics are current: the window is read in msg_id order by the primary key
  -- alone (the $6 bound is part of the match, not of the scan, which would let the
  -- planner collect and sort the whole range), and each row's body and dead letter
  -- are then looked up by key (a join could hash a whole table on every call).
  return pg_catalog.format(
    $f$
    select w.msg_id, w.row_json -> 'message' as message, w.row_json -> 'headers' as headers,
           ($6::bigint is null or w.msg_id <= $6::bigint)
           and ($3::text is null or pg_catalog.strpos(pg_catalog.lower(coalesce(
              (select d.error from queue_worker.dead_letters d
                where d.queue_name = %2$L and d.msg_id = w.msg_id),
              w.row_json -> 'headers' -> 'queue_worker_error', 'null'::jsonb)::text),
              pg_catalog.lower($3::text)) > 0)
           and ($4::timestamptz is null or w.archived_at >= $4::timestamptz)
           and ($5::timestamptz is null or w.archived_at < $5::timestamptz) as matches
      from (
        select k.msg_id, k.archived_at,
               (select pg_catalog.to_jsonb(r) from pgmq.%1$I r where r.msg_id = k.msg_id)
                 as row_json
          from (
            select a.msg_id, a.archived_at from pgmq.%1$I a
             where a.msg_id > $1
             order by a.msg_id
             limit $2
               for update skip locked
          ) k
      ) w
     order by w.msg_id
    $f$, 'a_' || queue_name, queue_name);
end
$$;
comment on function queue_worker._dead_window(text) is
  'Internal to replay_dead and purge_dead: the query of one window of archived rows with whether each matches the filter. Callable by service_role.';

-- replay_dead: puts the matching archived messages of one window back on their
-- queue (headers kept, dead letters removed). Returns how many rows the window
-- held (`scanned`; 0: done), how many were replayed, and the last msg_id of the
-- window (pass it as after_id next time).
create or replace function queue_worker.replay_dead(
  queue_name text,
  after_id bigint default 0,
  max_rows integer default 1000,
  error_text text default null,
  archived_from timestamptz default null,
  archived_to timestamptz default null,
  up_to_id bigint default null
)
returns table (scanned integer, affected integer, last_id bigint)
language plpgsql
set search_path = ''
as $$
declare
  r record;
  n_scanned integer := 0;
  n_done integer := 0;
  last bigint := null;
  ids bigint[] := '{}';
begin
  for r in execute queue_worker._dead_window(queue_name)
    using coalesce(after_id, 0), least(greatest(coalesce(max_rows, 1000), 1), 1000),
          nullif(error_text, ''), archived_from, archived_to, up_to_id
  loop
    n_scanned := n_scanned + 1;
    last := r.msg_id;
    if r.matches then
      perform queue_worker._send_again(replay_dead.queue_name, r.message, r.headers);
      ids := ids || r.msg_id;
      n_done := n_done + 1;
    end if;
  end loop;
  if n_done > 0 then
    execute pg_catalog.format('delete from pgmq.%I a where a.msg_id = any($1)', 'a_' || queue_name)
      using ids;
    delete from queue_worker.dead_letters d
     where d.queue_name = replay_dead.queue_name and d.msg_id = any(ids);
  end if;
  return query select n_scanned, n_done, last;
end
$$;
comment on function queue_worker.replay_dead(text, bigint, integer, text, timestamptz, timestamptz, bigint) is
  'Replays the archived messages matching a filter within one window of at most max_rows (1,000) archived rows after after_id (up to up_to_id); returns scanned, affected and the window''s last msg_id. Callable by service_role.';

-- purge_dead: deletes the matching archived messages of one window and their dead
-- letters; the same result as replay_dead.
create or replace function queue_worker.purge_dead(
  queue_name text,
  after_id bigint default 0,
  max_rows integer default 1000,
  error_text text default null,
  archived_from timestamptz default null,
  archived_to timestamptz default null,
  up_to_id bigint default null
)
returns table (scanned integer, affected integer, last_id bigint)
language plpgsql
set search_path = ''
as $$
declare
  r record;
  n_scanned integer := 0;
  last bigint := null;
  ids bigint[] := '{}';
begin
  for r in execute queue_worker._dead_window(queue_name)
    using coalesce(after_id, 0), least(greatest(coalesce(max_rows, 1000), 1), 1000),
          nullif(error_text, ''), archived_from, archived_to, up_to_id
  loop
    n_scanned := n_scanned + 1;
    last := r.msg_id;
    if r.matches then
      ids := ids || r.msg_id;
    end if;
  end loop;
  if pg_catalog.cardinality(ids) > 0 then
    execute pg_catalog.format('delete from pgmq.%I a where a.msg_id = any($1)', 'a_' || queue_name)
      using ids;
    delete from queue_worker.dead_letters d
     where d.queue_name = purge_dead.queue_name and d.msg_id = any(ids);
  end if;
  return query select n_scanned, pg_catalog.cardinality(ids), last;
end
$$;
comment on function queue_worker.purge_dead(text, bigint, integer, text, timestamptz, timestamptz, bigint) is
  'Deletes the archived messages matching a filter within one window of at most max_rows (1,000) archived rows after after_id, with their dead letters; returns scanned, affected and the window''s last msg_id. Callable by service_role.';

-- expire_dead: deletes up to max_rows (at most 10,000) archived messages of a
-- queue archived before `older_than`, oldest first, with their dead letters;
-- returns how many. Uses pgmq's index on archived_at.
create or replace function queue_worker.expire_dead(
  queue_name text, older_than timestamptz, max_rows integer default 1000
)
returns integer
language plpgsql
set search_path = ''
as $$
declare
  ids bigint[];
begin
  perform queue_worker.queue_table(queue_name);
  if older_than is null then
    raise exception 'older_than is required' using errcode = '22023';
  end if;
  execute pg_catalog.format(
    $f$
    with old as (
      select a.msg_id from pgmq.%1$I a where a.archived_at < $1
       order by a.archived_at limit $2 for update skip locked
    ),
    gone as (
      delete from pgmq.%1$I a using old where a.msg_id = old.msg_id returning a.msg_id
    )
    select coalesce(pg_catalog.array_agg(gone.msg_id), '{}') from gone
    $f$, 'a_' || queue_name)
  into ids
  using older_than, least(greatest(coalesce(max_rows, 1000), 1), 10000);
  delete from queue_worker.dead_letters d
   where d.queue_name = expire_dead.queue_name and d.msg_id = any(ids);
  return pg_catalog.cardinality(ids);
end
$$;
comment on function queue_worker.expire_dead(text, timestamptz, integer) is
  'Deletes up to max_rows archived messages archived before older_than, oldest first, with their dead letters; returns how many. Callable by service_role.';

-- dead_letter_counts: archived messages per attached queue (what the console and
-- the queue_worker_queue_dead_letters gauge show). An exact count, so it reads the
-- whole archive: the service caches it (METRICS_CACHE_SECONDS).
create or replace function queue_worker.dead_letter_counts()
returns table (queue_name text, dead_letters bigint)
language plpgsql
stable
set search_path = ''
as $$
declare
  q text;
begin
  for q in
    select c.queue_name from queue_worker.queues c
    join pgmq.meta m on m.queue_name = c.queue_name
    order by c.queue_name
  loop
    return query execute pg_catalog.format(
      'select %L::text, count(*) from pgmq.%I', q, 'a_' || q);
  end loop;
end
$$;
comment on function queue_worker.dead_letter_counts() is
  'Archived (dead) messages per attached queue. Callable by service_role.';

revoke all on function
  queue_worker.pause(text),
  queue_worker.resume(text),
  queue_worker.paused_queues(),
  queue_worker._paused(text),
  queue_worker._send_again(text, jsonb, jsonb),
  queue_worker._dead_window(text),
  queue_worker.replay_dead(text, bigint, integer, text, timestamptz, timestamptz, bigint),
  queue_worker.purge_dead(text, bigint, integer, text, timestamptz, timestamptz, bigint),
  queue_worker.expire_dead(text, timestamptz, integer),
  queue_worker.dead_letter_counts()
  from public, anon, authenticated;
grant execute on function
  queue_worker.pause(text),
  queue_worker.resume(text),
  queue_worker.paused_queues(),
  queue_worker._paused(text),
  queue_worker._send_again(text, jsonb, jsonb),
  queue_worker._dead_window(text),
  queue_worker.replay_dead(text, bigint, integer, text, timestamptz, timestamptz, bigint),
  queue_worker.purge_dead(text, bigint, integer, text, timestamptz, timestamptz, bigint),
  queue_worker.expire_dead(text, timestamptz, integer),
  queue_worker.dead_letter_counts()
  to service_role;

select queue_worker.record_migration('20261202005000_pause_and_dead_letter_batches');
