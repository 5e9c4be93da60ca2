-- queue-worker: idempotency keys, on every attached queue.
--
-- A job may carry an idempotency key in its pgmq headers (pgmq >= 1.5):
--
--   select pgmq.send('sms_queue', '{"to": "+15550100", "text": "Hi"}',
--                    '{"idempotency_key": "order-17-shipped"}');
--
-- Once a job with a key has succeeded, another job of the same queue with the
-- same key, claimed within the queue's retention window
-- (queue_worker.queues.idempotency_retention, 24 hours unless changed), is
-- deleted without running, inside the claim that took it. The key is in the
-- headers, not in the body, so that every job model (the built-in ones refuse
-- unknown fields) sees its body unchanged and the worker reads the key without
-- reading the body, which may be megabytes.
--
-- The key is recorded as processed by the ack of the job that succeeded, in the
-- same transaction as the delete: a job that failed, was archived or was cut
-- short by a crash leaves no key, so its next copy runs. Two copies claimed at the
-- same moment, before either has succeeded, may both run (the key keeps out a
-- repeat, not a concurrent twin). Keys are kept as SHA-256 digests of their
-- text (any length, no personal data at rest); expired ones are deleted, at most
-- 200 at a time, by the acks that record new ones.
--
-- Cost: queues that never saw a key pay one index probe per claim or read (not
-- per job); acks read the small `headers` column of the rows they delete. On
-- pgmq 1.4.4 (no headers column) jobs carry no keys and everything is as before.
--
-- Replaces, from earlier migrations: queue_worker.claim() (20261127000000),
-- queue_worker.read() (20261128000000), queue_worker.ack() and
-- queue_worker.send() (20261127000000; send gains `headers`). Same results and
-- callers (service_role). Every statement is idempotent.

alter table queue_worker.queues
  add column if not exists idempotency_retention interval not null default interval '24 hours';
do $$
begin
  if not exists (select from pg_catalog.pg_constraint
                 where conname = 'queues_idempotency_retention_check'
                   and conrelid = 'queue_worker.queues'::pg_catalog.regclass) then
    alter table queue_worker.queues add constraint queues_idempotency_retention_check
      check (idempotency_retention >= interval '0' and idempotency_retention <= interval '366 days');
  end if;
end
$$;
comment on column queue_worker.queues.idempotency_retention is
  'How long a succeeded job''s idempotency key keeps later copies from running. Change it in a migration: update queue_worker.queues set idempotency_retention = interval ''7 days'' where queue_name = ''sms_queue''.';

create table if not exists queue_worker.idempotency_keys (
  queue_name text not null,
  key_hash bytea not null,   -- sha256 of the key's UTF-8 text
  msg_id bigint not null,    -- the job that succeeded with it
  processed_at timestamptz not null default pg_catalog.now(),
  expires_at timestamptz not null,
  primary key (queue_name, key_hash)
);
comment on table queue_worker.idempotency_keys is
  'Idempotency keys of succeeded jobs, per queue, until expires_at. Look one up with key_hash = sha256(convert_to(''<key>'', ''UTF8'')). Written by queue_worker.ack, read by claim and read. service_role only.';
create index if not exists idempotency_keys_expires_at_idx
  on queue_worker.idempotency_keys (expires_at);
alter table queue_worker.idempotency_keys enable row level security;
revoke all on queue_worker.idempotency_keys from public, anon, authenticated;
grant select, insert, update, delete on queue_worker.idempotency_keys to service_role;

-- ---------------------------------------------------------------------------
-- claim and read share one statement when the queue has keys: lock the visible
-- rows (those of msg_ids for claim, the oldest qty for read), delete those whose
-- key has succeeded, claim the rest.
-- ---------------------------------------------------------------------------
create or replace function queue_worker._claim_unless_done(
  queue_name text, msg_ids bigint[], qty integer, vt integer
)
returns setof queue_worker.message
language plpgsql
set search_path = ''
as $$
declare
  qtable text := queue_worker.queue_table(queue_name);
  visible text;
begin
  if msg_ids is not null then
    visible := pg_catalog.format(
      'select q.msg_id, q.headers ->> ''idempotency_key'' as idem_key from %s q
        where q.msg_id = any($1) and q.vt <= pg_catalog.clock_timestamp()
        for update skip locked', qtable);
  else
    visible := pg_catalog.format(
      'select q.msg_id, q.headers ->> ''idempotency_key'' as idem_key from %s q
        where q.vt <= pg_catalog.clock_timestamp()
        order by q.msg_id limit $2
        for update skip locked', qtable);
  end if;
  return query execute pg_catalog.format(
    $q$
    with visible as (%2$s),
    done as (
      select v.msg_id from visible v
      where v.idem_key is not null and exists (
        select from queue_worker.idempotency_keys k
        where k.queue_name = $3
          and k.key_hash = pg_catalog.sha256(pg_catalog.convert_to(v.idem_key, 'UTF8'))
          and k.expires_at > pg_catalog.now())
    ),
    dropped as (
      delete from %1$s q using done where q.msg_id = done.msg_id
    )
    update %1$s q
       set vt = pg_catalog.clock_timestamp() + pg_catalog.make_interval(secs => $4),
           read_ct = q.read_ct + 1
      from visible
     where q.msg_id = visible.msg_id
       and not exists (select from done where done.msg_id = visible.msg_id)
    returning q.msg_id, q.read_ct, q.enqueued_at, q.vt, q.message, q.headers
    $q$, qtable, visible)
  using msg_ids, qty, queue_name, vt;
end
$$;
comment on function queue_worker._claim_unless_done(text, bigint[], integer, integer) is
  'Internal to claim (msg_ids) and read (qty): claims visible rows, deleting those whose idempotency key has succeeded. Callable by service_role.';

-- claim: as before; on a queue with keys, a row whose key has succeeded is
-- deleted instead of claimed.
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
  'Claims the visible messages among msg_ids for vt seconds and returns them; one whose idempotency key has succeeded is deleted instead. Callable by service_role.';

-- read: as before (pgmq.read, headers selected directly where pgmq has them);
-- on a queue with keys, the same statement as claim, oldest first.
create or replace function queue_worker.read(queue_name text, vt integer, qty integer)
returns setof queue_worker.message
language plpgsql
set search_path = ''
as $$
declare
  qtable text := queue_worker.queue_table(queue_name);
begin
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
  'Claims up to qty visible messages for vt seconds (pgmq.read); one whose idempotency key has succeeded is deleted instead. Callable by service_role.';

-- ack: delete processed messages; the idempotency key of each (from its
-- headers) is recorded as processed in the same statement, and up to 200
-- expired keys are deleted when any was recorded.
create or replace function queue_worker.ack(queue_name text, msg_ids bigint[])
returns setof bigint
language plpgsql
set search_path = ''
as $$
declare
  qtable text := queue_worker.queue_table(queue_name);
begin
  if not exists (
    select from pg_catalog.pg_attribute a
    where a.attrelid = qtable::pg_catalog.regclass and a.attname = 'headers' and not a.attisdropped
  ) then
    return query select d from pgmq.delete(queue_name, msg_ids) d;
    return;
  end if;
  return query execute pg_catalog.format(
    $q$
    with deleted as (
      delete from %1$s q where q.msg_id = any($1)
      returning q.msg_id, q.headers ->> 'idempotency_key' as idem_key
    ),
    keyed as (
      select distinct on (key_hash)
             pg_catalog.sha256(pg_catalog.convert_to(d.idem_key, 'UTF8')) as key_hash, d.msg_id
      from deleted d
      where d.idem_key is not null
      order by key_hash, d.msg_id
    ),
    recorded as (
      insert into queue_worker.idempotency_keys as k
        (queue_name, key_hash, msg_id, processed_at, expires_at)
      select $2, keyed.key_hash, keyed.msg_id, pg_catalog.now(),
             pg_catalog.now() + coalesce(
               (select c.idempotency_retention from queue_worker.queues c
                where c.queue_name = $2), interval '24 hours')
      from keyed
      on conflict (queue_name, key_hash) do update
        set msg_id = excluded.msg_id, processed_at = excluded.processed_at,
            expires_at = excluded.expires_at
      returning 1
    ),
    expired as (
      delete from queue_worker.idempotency_keys k
      where k.ctid = any (array(
              select e.ctid from queue_worker.idempotency_keys e
              where e.expires_at <= pg_catalog.now()
                and not (e.queue_name = $2 and e.key_hash in (select key_hash from keyed))
              limit 200))
        and exists (select from recorded)
    )
    select deleted.msg_id from deleted
    $q$, qtable)
  using msg_ids, queue_name;
end
$$;
comment on function queue_worker.ack(text, bigint[]) is
  'Deletes processed messages and returns the deleted ids; records the idempotency key of each as processed, in the same transaction. Callable by service_role.';

-- send: enqueue one message, with pgmq headers when given (an idempotency key:
-- {"idempotency_key": "..."}); returns its msg_id. The three-argument send is
-- replaced (two would make PostgREST's choice ambiguous).
drop function if exists queue_worker.send(text, jsonb, integer);
create or replace function queue_worker.send(
  queue_name text,
  message jsonb,
  delay_seconds integer default 0,
  headers jsonb default null
)
returns bigint
language plpgsql
set search_path = ''
as $$
declare
  new_id bigint;
begin
  perform queue_worker.queue_table(queue_name);
  if headers is null then
    select s into new_id from pgmq.send(queue_name, message, coalesce(delay_seconds, 0)::integer) s;
  else
    if pg_catalog.jsonb_typeof(headers) <> 'object' then
      raise exception 'headers must be a JSON object' using errcode = '22023';
    end if;
    select s into new_id
      from pgmq.send(queue_name, message, headers, coalesce(delay_seconds, 0)::integer) s;
  end if;
  return new_id;
end
$$;
comment on function queue_worker.send(text, jsonb, integer, jsonb) is
  'Enqueues one message (pgmq.send), with pgmq headers when given, and returns its msg_id. Callable by service_role.';

revoke all on function
  queue_worker._claim_unless_done(text, bigint[], integer, integer),
  queue_worker.send(text, jsonb, integer, jsonb)
  from public, anon, authenticated;
grant execute on function
  queue_worker._claim_unless_done(text, bigint[], integer, integer),
  queue_worker.send(text, jsonb, integer, jsonb)
  to service_role;

select queue_worker.record_migration('20261201003100_idempotency_keys');
