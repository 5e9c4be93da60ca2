-- queue-worker: the queue catalogue. A queue is the worker's when it is attached.
--
-- In their own migration, a user writes one line per queue:
--
--   select queue_worker.attach_queue('sms_queue');
--
-- which creates the pgmq queue if it is missing, attaches the webhook trigger
-- (queue_worker.notify_webhook(): the same Vault secrets, signing and "no URL,
-- do nothing" rules as the built-in queues), grants service_role what the
-- worker's functions need on the queue's tables and records the queue in
-- queue_worker.queues. Applying it again changes nothing.
--
--   select queue_worker.detach_queue('sms_queue');
--
-- removes the trigger and the catalogue row: the worker's functions refuse the
-- queue from then on and metrics() leaves it out. The queue, its messages, its
-- archive and the table rights stay (an app may still enqueue into it; attach
-- it again to resume).
--
-- Replaces, from 20261127000000_queue_worker.sql: the three queues created,
-- granted and triggered by a loop over their names (now attached below, by the
-- same function a user calls), queue_worker.queue_table() (now the catalogue
-- says which queues the worker serves) and queue_worker.metrics() (now every
-- attached queue). After this file no function of the worker's plumbing names a
-- queue; only apply_payment_event names email_queue, the queue its receipts go
-- to (a business rule, like a Python processor naming where it sends).
--
-- Every statement is idempotent.

-- ---------------------------------------------------------------------------
-- The catalogue. Readable by service_role (the worker's functions check it);
-- anon and authenticated get nothing. RLS on with no policies, as for the
-- other tables of the schema. Later features add columns here.
-- ---------------------------------------------------------------------------
create table if not exists queue_worker.queues (
  queue_name text primary key check (queue_name ~ '^[a-z0-9_]{1,47}$'),
  attached_at timestamptz not null default pg_catalog.now()
);
comment on table queue_worker.queues is
  'The queues queue-worker serves: one row per queue attached with queue_worker.attach_queue(). Readable by service_role only.';
alter table queue_worker.queues enable row level security;
revoke all on queue_worker.queues from public, anon, authenticated;
grant select on queue_worker.queues to service_role;

-- ---------------------------------------------------------------------------
-- attach_queue / detach_queue: for migrations, run by the owner of pgmq's
-- objects (Supabase's `postgres`). Not for service_role: attaching creates
-- tables and a trigger in pgmq, which only pgmq's owner may do, and a running
-- service holding the secret key has no business changing the schema.
-- ---------------------------------------------------------------------------
create or replace function queue_worker.attach_queue(queue_name text)
returns void
language plpgsql
set search_path = ''
as $$
declare
  q text := attach_queue.queue_name;
begin
  if q is null or q !~ '^[a-z0-9_]{1,47}$' then
    raise exception 'invalid queue name: %', q
      using errcode = '22023',
            hint = 'A queue name is 1 to 47 characters: lowercase letters, digits and _.';
  end if;
  if not exists (select from pgmq.meta m where m.queue_name = q) then
    perform pgmq.create(q);
  end if;
  execute pg_catalog.format(
    'create or replace trigger queue_worker_webhook after insert on pgmq.%I
       for each row execute function queue_worker.notify_webhook()', 'q_' || q);
  -- The worker's functions are SECURITY INVOKER: these are the rights they run with.
  execute pg_catalog.format(
    'grant select, insert, update, delete on pgmq.%I, pgmq.%I to service_role',
    'q_' || q, 'a_' || q);
  execute pg_catalog.format(
    'grant usage, select on sequence pgmq.%I to service_role', 'q_' || q || '_msg_id_seq');
  insert into queue_worker.queues as c (queue_name) values (q)
    on conflict on constraint queues_pkey do nothing;
end
$$;
comment on function queue_worker.attach_queue(text) is
  'Makes a pgmq queue the worker''s: creates it if missing, attaches the webhook trigger, grants service_role the rights the worker''s functions need, records it in queue_worker.queues. Idempotent. Callable by the owner (migrations) only.';

create or replace function queue_worker.detach_queue(queue_name text)
returns void
language plpgsql
set search_path = ''
as $$
declare
  q text := detach_queue.queue_name;
begin
  if q is null or q !~ '^[a-z0-9_]{1,47}$' then
    raise exception 'invalid queue name: %', q
      using errcode = '22023',
            hint = 'A queue name is 1 to 47 characters: lowercase letters, digits and _.';
  end if;
  if exists (select from pgmq.meta m where m.queue_name = q) then
    execute pg_catalog.format('drop trigger if exists queue_worker_webhook on pgmq.%I', 'q_' || q);
  end if;
  delete from queue_worker.queues c where c.queue_name = q;
end
$$;
comment on function queue_worker.detach_queue(text) is
  'Stops the worker serving a queue: removes its webhook trigger and its queue_worker.queues row. Never drops the queue, its messages, its archive or its grants. Callable by the owner (migrations) only.';

revoke all on function queue_worker.attach_queue(text), queue_worker.detach_queue(text)
  from public, anon, authenticated, service_role;

-- ---------------------------------------------------------------------------
-- queue_table: the catalogue, not pgmq.meta, says which queues the worker's
-- functions may touch. Same signature and grants (create or replace keeps them).
-- ---------------------------------------------------------------------------
create or replace function queue_worker.queue_table(queue_name text)
returns text
language plpgsql
stable
set search_path = ''
as $$
begin
  if queue_name is null or queue_name !~ '^[a-z0-9_]{1,47}$'
     or not exists (select 1 from queue_worker.queues c
                    where c.queue_name = queue_table.queue_name) then
    raise exception 'unknown queue: %', queue_name
      using errcode = 'P0001',
            hint = 'Attach it in a migration with select queue_worker.attach_queue(''<name>''), or check the name.';
  end if;
  return pg_catalog.format('pgmq.%I', 'q_' || queue_name);
end
$$;
comment on function queue_worker.queue_table(text) is
  'Internal: validated pgmq table name of an attached queue. Callable by service_role.';

-- ---------------------------------------------------------------------------
-- metrics: every attached queue that pgmq has (a queue dropped with
-- pgmq.drop_queue while attached is left out). Same result and grants.
-- ---------------------------------------------------------------------------
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
    select c.queue_name from queue_worker.queues c
    join pgmq.meta m on m.queue_name = c.queue_name
    order by c.queue_name
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
  'Length, visible length, oldest and newest message age of every attached queue. Callable by service_role.';

-- ---------------------------------------------------------------------------
-- The built-in queues, attached like any other.
-- ---------------------------------------------------------------------------
select queue_worker.attach_queue('email_queue');
select queue_worker.attach_queue('reports_queue');
select queue_worker.attach_queue('payments_queue');

select queue_worker.record_migration('20261201003000_queue_catalogue');
