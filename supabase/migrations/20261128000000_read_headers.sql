-- queue-worker: a cheaper queue_worker.read.
--
-- Replaces queue_worker.read() from 20261127000000_queue_worker.sql. That version
-- read `headers` by key from a JSON copy of each row (`to_jsonb(r) -> 'headers'`),
-- which works whether or not pgmq's message_record has the column (pgmq 1.5 added
-- it; Supabase images ship 1.4.4 or 1.5.1), but costs PostgreSQL a JSON document
-- per message: about 20% more than pgmq.read itself for a batch of 500
-- (bench/README.md, "Pull path"). The sweeper reads in batches of up to
-- SWEEP_BATCH_SIZE, so this is the database's main cost on the pull path.
--
-- This version asks the catalog once per call whether message_record has
-- `headers`, then selects the column directly, or null where pgmq predates it.
-- PL/pgSQL plans a statement when it first runs it, so the branch that names
-- `r.headers` is never planned on a pgmq without the column.
--
-- Same signature, result and privileges as before (create or replace keeps the
-- grants): callable by service_role only.

create or replace function queue_worker.read(queue_name text, vt integer, qty integer)
returns setof queue_worker.message
language plpgsql
set search_path = ''
as $$
begin
  perform queue_worker.queue_table(queue_name);
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
  'Claims up to qty visible messages for vt seconds (pgmq.read). Callable by service_role.';
