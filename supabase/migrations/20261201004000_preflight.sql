-- queue-worker: the database side of `queue-worker check` (the preflight).
--
-- `check` asks, in one call, what only the database can tell: whether pg_net is
-- there, which of the worker's Vault secrets are set, whether the secret the
-- triggers send matches the worker's WEBHOOK_SECRET, and whether each served
-- queue exists and has its webhook trigger. The answer holds booleans and secret
-- names only, never a secret's value.
--
-- Applied after 20261130000000_migration_ledger.sql. Idempotent.

-- preflight: SECURITY DEFINER because it reads Vault (names and, to compare, the
-- two secrets the trigger sends) and the catalog as the owner (postgres), who may;
-- search_path is empty and it returns no value it reads. `queue_names` are the
-- queues the worker serves; `secret_digests` the lowercase hex SHA-256 of each
-- webhook secret the worker accepts (WEBHOOK_SECRET and WEBHOOK_SECRET_PREVIOUS),
-- compared with the digest of the secret the trigger sends, so the answer is a
-- boolean and no secret crosses the wire.
--
-- Returns {"pg_net": bool, "vault": bool, "secrets": [names set and not empty],
--          "secret_matches": bool or null (nothing to compare),
--          "signs": bool (the trigger signs rather than sending a bearer secret),
--          "queues": {"<name>": {"exists": bool, "attached": bool, "trigger": bool}}}
-- ("attached": in queue_worker.queues, 20261201003000_queue_catalogue.sql).
create or replace function queue_worker.preflight(
  queue_names text[],
  secret_digests text[] default '{}'
)
returns jsonb
language plpgsql
stable
security definer
set search_path = ''
as $$
declare
  q text;
  v_table regclass;
  v_queues jsonb := '{}'::jsonb;
  v_vault boolean := pg_catalog.to_regclass('vault.decrypted_secrets') is not null;
  v_names text[] := '{}';
  v_signing text;
  v_bearer text;
  v_sent text;
  v_matches boolean;
begin
  if queue_names is null or pg_catalog.cardinality(queue_names) > 1000 then
    raise exception 'queue_names: give from 0 to 1000 queue names' using errcode = '22023';
  end if;
  if pg_catalog.cardinality(coalesce(secret_digests, '{}')) > 10
     or exists (select from pg_catalog.unnest(secret_digests) d where d !~ '^[0-9a-f]{64}$') then
    raise exception 'secret_digests: up to 10 lowercase hex SHA-256 digests' using errcode = '22023';
  end if;

  if v_vault then
    select coalesce(pg_catalog.array_agg(s.name::text order by s.name), '{}') into v_names
      from vault.decrypted_secrets s
     where s.name in ('queue_worker_url', 'queue_worker_webhook_secret',
                      'queue_worker_signing_secret')
       and coalesce(s.decrypted_secret, '') <> '';
    select s.decrypted_secret into v_signing
      from vault.decrypted_secrets s where s.name = 'queue_worker_signing_secret';
    select s.decrypted_secret into v_bearer
      from vault.decrypted_secrets s where s.name = 'queue_worker_webhook_secret';
    -- What the trigger sends (20261127000300_signed_webhooks.sql): a signature with
    -- the signing secret when there is one, else the bearer secret.
    v_sent := case when coalesce(v_signing, '') <> '' then v_signing else v_bearer end;
    if coalesce(v_sent, '') <> '' and pg_catalog.cardinality(coalesce(secret_digests, '{}')) > 0 then
      v_matches := pg_catalog.encode(
        pg_catalog.sha256(pg_catalog.convert_to(v_sent, 'UTF8')), 'hex') = any(secret_digests);
    end if;
  end if;

  foreach q in array queue_names loop
    if q is null or q !~ '^[a-z0-9_]{1,47}$' then
      raise exception 'queue_names: % is not a queue name', pg_catalog.left(q, 64)
        using errcode = '22023';
    end if;
    v_table := pg_catalog.to_regclass(pg_catalog.format('pgmq.%I', 'q_' || q));
    v_queues := v_queues || pg_catalog.jsonb_build_object(q, pg_catalog.jsonb_build_object(
      'exists', v_table is not null,
      'attached', exists (select from queue_worker.queues c where c.queue_name = q),
      -- Any enabled trigger of the worker's schema on the queue table rings the doorbell.
      'trigger', v_table is not null and exists (
        select from pg_catalog.pg_trigger t
          join pg_catalog.pg_proc p on p.oid = t.tgfoid
          join pg_catalog.pg_namespace n on n.oid = p.pronamespace
         where t.tgrelid = v_table and not t.tgisinternal and t.tgenabled <> 'D'
           and n.nspname = 'queue_worker')));
  end loop;

  return pg_catalog.jsonb_build_object(
    'pg_net', pg_catalog.to_regprocedure('net.http_post(text, jsonb, jsonb, jsonb, integer)')
              is not null,
    'vault', v_vault,
    'secrets', pg_catalog.to_jsonb(v_names),
    'secret_matches', v_matches,
    'signs', coalesce(v_signing, '') <> '',
    'queues', v_queues);
end
$$;
comment on function queue_worker.preflight(text[], text[]) is
  'What `queue-worker check` needs from the database: pg_net present, Vault secret names set, whether the sent webhook secret matches, each queue''s existence, attachment and webhook trigger. Booleans and names only. Callable by service_role.';
revoke all on function queue_worker.preflight(text[], text[]) from public, anon, authenticated;
grant execute on function queue_worker.preflight(text[], text[]) to service_role;

select queue_worker.record_migration('20261201004000_preflight');
