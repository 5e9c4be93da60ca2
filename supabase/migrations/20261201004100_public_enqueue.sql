-- queue-worker: the app enqueues as its signed-in users, on the queues that allow it.
--
-- An app holding only the publishable (anon) key, with a user's session, calls
--   supabase.schema('queue_worker').rpc('enqueue', {queue_name, message, delay_seconds})
-- and the job lands on the queue if, and only if, the queue's owner allowed that
-- role in a migration of their own:
--   select queue_worker.allow_enqueue('contact_queue');                    -- authenticated
--   select queue_worker.allow_enqueue('contact_queue', array['anon', 'authenticated']);
--   select queue_worker.allow_enqueue('contact_queue', '{}');              -- nobody again
-- anon and authenticated still get no rights on any queue table, nor on any other
-- function of this schema: `enqueue` is the one door, it checks the queue, the
-- message's shape and size and the delay, and it calls only pgmq.send.
--
-- The per-queue setting is two columns of the queue catalogue, queue_worker.queues
-- (20261201003000_queue_catalogue.sql): only an attached queue can allow a role,
-- and detaching a queue forgets who could enqueue on it (attached again, nobody may
-- until allowed again).
--
-- Applied after 20261201004000_preflight.sql. Idempotent.

alter table queue_worker.queues
  add column if not exists enqueue_roles text[] not null default '{}',
  add column if not exists enqueue_max_bytes integer not null default 65536;
do $$
begin
  if not exists (select from pg_catalog.pg_constraint
                  where conrelid = 'queue_worker.queues'::pg_catalog.regclass
                    and conname = 'queues_enqueue_max_bytes_check') then
    alter table queue_worker.queues add constraint queues_enqueue_max_bytes_check
      check (enqueue_max_bytes between 1 and 1048576);
  end if;
end
$$;
comment on column queue_worker.queues.enqueue_roles is
  'Roles besides service_role that may enqueue on this queue through queue_worker.enqueue (set by queue_worker.allow_enqueue).';
comment on column queue_worker.queues.enqueue_max_bytes is
  'Largest message (bytes of its JSON text) queue_worker.enqueue takes from those roles.';
-- allow_enqueue: the queue's owner says who may enqueue on it, in a migration.
-- Owner only: who may write to a queue is the schema's decision, not the worker's.
create or replace function queue_worker.allow_enqueue(
  queue_name text,
  roles text[] default array['authenticated'],
  max_bytes integer default 65536
)
returns void
language plpgsql
set search_path = ''
as $$
declare
  v_unknown text;
begin
  -- The queue must be attached (queue_table refuses any other).
  perform queue_worker.queue_table(queue_name);
  if roles is null or pg_catalog.cardinality(roles) > 16 then
    raise exception 'roles: give up to 16 role names ({} for nobody)' using errcode = '22023';
  end if;
  select pg_catalog.string_agg(r, ', ') into v_unknown
    from pg_catalog.unnest(roles) r
   where r is null or not exists (select from pg_catalog.pg_roles pr where pr.rolname = r);
  if v_unknown is not null then
    raise exception 'roles: no such role: %', v_unknown using errcode = '22023';
  end if;
  if max_bytes is null or max_bytes not between 1 and 1048576 then
    raise exception 'max_bytes: must be from 1 to 1048576' using errcode = '22023';
  end if;
  update queue_worker.queues q
     set enqueue_roles = roles, enqueue_max_bytes = max_bytes
   where q.queue_name = allow_enqueue.queue_name;
end
$$;
comment on function queue_worker.allow_enqueue(text, text[], integer) is
  'Lets these roles enqueue on a queue through queue_worker.enqueue, messages up to max_bytes. Called by the owner in a migration only.';
revoke all on function queue_worker.allow_enqueue(text, text[], integer)
  from public, anon, authenticated, service_role;

-- enqueue: one job onto a queue, for the roles the queue allows.
--
-- The caller is the session's role: what PostgREST sets from the request's key or
-- user token (`role`), else the login role. It cannot be forged (only a role the
-- session may become can be set), and it is read here because inside a SECURITY
-- DEFINER function current_user is the owner. service_role and the owner may
-- enqueue on any queue (they may call pgmq.send anyway), with no size bound.
--
-- SECURITY DEFINER because the callers have no rights on the queue tables; it runs
-- as the owner, with an empty search_path, and calls only pgmq.send (whose insert
-- fires the webhook trigger, itself SECURITY DEFINER).
-- Errors: 42501 (HTTP 401 for anon, 403 for a user) when the role may not enqueue
-- there, or the queue is not attached, alike; PT413 (HTTP 413) for a message over
-- the queue's bound; 22023 (HTTP 400) for a message that is not a JSON object or a
-- delay outside 0..604800 seconds.
create or replace function queue_worker.enqueue(
  queue_name text,
  message jsonb,
  delay_seconds integer default 0
)
returns bigint
language plpgsql
security definer
set search_path = ''
as $$
declare
  v_role text := pg_catalog.current_setting('role');
  v_privileged boolean;
  v_roles text[];
  v_max integer;
  v_size integer;
  new_id bigint;
begin
  if v_role is null or v_role = 'none' then
    v_role := session_user;
  end if;
  v_privileged := v_role = current_user
                  or pg_catalog.pg_has_role(v_role, 'service_role', 'MEMBER');
  select q.enqueue_roles, q.enqueue_max_bytes into v_roles, v_max
    from queue_worker.queues q
   where q.queue_name = enqueue.queue_name;
  if not v_privileged and not (v_role = any(coalesce(v_roles, '{}'))) then
    raise exception 'queue % does not take jobs from role %',
      pg_catalog.left(coalesce(queue_name, 'null'), 64), v_role
      using errcode = '42501',
            hint = 'The queue''s owner allows a role with queue_worker.allow_enqueue().';
  end if;
  if message is null or pg_catalog.jsonb_typeof(message) <> 'object' then
    raise exception 'message must be a JSON object' using errcode = '22023';
  end if;
  if not v_privileged then
    v_size := pg_catalog.octet_length(message::text);
    if v_size > v_max then
      raise exception 'message is % bytes; queue % takes at most %', v_size, queue_name, v_max
        using errcode = 'PT413';
    end if;
  end if;
  if delay_seconds is not null and delay_seconds not between 0 and 604800 then
    raise exception 'delay_seconds must be from 0 to 604800 (7 days)' using errcode = '22023';
  end if;
  perform queue_worker.queue_table(queue_name);
  select s into new_id from pgmq.send(queue_name, message, coalesce(delay_seconds, 0)) s;
  return new_id;
end
$$;
comment on function queue_worker.enqueue(text, jsonb, integer) is
  'Enqueues one job (pgmq.send) for the roles queue_worker.allow_enqueue let in on that queue, and for service_role; returns its msg_id. Callable by anon, authenticated and service_role; refuses with 42501 unless allowed.';
revoke all on function queue_worker.enqueue(text, jsonb, integer) from public;
grant execute on function queue_worker.enqueue(text, jsonb, integer)
  to anon, authenticated, service_role;
-- To reach that one function, anon and authenticated need the schema's USAGE; it
-- gives no right on anything else in it (every other function and table is revoked).
grant usage on schema queue_worker to anon, authenticated;

select queue_worker.record_migration('20261201004100_public_enqueue');
