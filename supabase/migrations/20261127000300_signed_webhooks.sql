-- queue-worker: Standard Webhooks signatures on the webhook triggers.
--
-- Replaces queue_worker.notify_webhook() from 20261127000000_queue_worker.sql.
-- When Vault holds `queue_worker_signing_secret`, every webhook is signed
-- (https://www.standardwebhooks.com): headers `webhook-id`, `webhook-timestamp`
-- (unix seconds) and `webhook-signature` (`v1,` + base64 HMAC-SHA256 of
-- `{id}.{timestamp}.{body}`), and it carries no bearer token, so the secret never
-- travels. Without that secret the trigger sends `Authorization: Bearer
-- <queue_worker_webhook_secret>` as before.
--
--   select vault.create_secret('<the WEBHOOK_SECRET value>', 'queue_worker_signing_secret');
--
-- The signing secret is the worker's WEBHOOK_SECRET in either form it accepts:
-- `whsec_<base64>` (the key is the decoded bytes) or a plain string (the key is
-- its UTF-8 bytes). The signature uses pgcrypto's hmac(), which Supabase installs
-- in the `extensions` schema. Where pgcrypto is missing this file still applies
-- (PL/pgSQL resolves functions when it runs them); a signed webhook then fails
-- with a WARNING and is not sent, and the worker's sweeper takes the message.
--
-- The webhook's record leaves out the `message` column: the worker claims the row
-- and reads the job from the database, so a job's content (addresses,
-- attachments) never travels in a webhook, and a large job is not refused by the
-- worker's body cap (MAX_WEBHOOK_BODY_BYTES).
--
-- Everything else is as before: no URL in Vault, no webhook; a failing webhook
-- never fails the insert.
--
-- SECURITY DEFINER because the inserting role (for example authenticated,
-- through pgmq_public.send) may not read Vault; the function runs as its owner
-- (postgres), reads only the queue_worker_* secrets and calls only
-- net.http_post and extensions.hmac.
create or replace function queue_worker.notify_webhook()
returns trigger
language plpgsql
security definer
set search_path = ''
as $$
declare
  base_url text;
  secret text;
  signing_secret text;
  signing_key bytea;
  payload jsonb;
  webhook_id text;
  signed_at text;
  headers jsonb := '{"Content-Type": "application/json"}'::jsonb;
begin
  begin
    select s.decrypted_secret into base_url
      from vault.decrypted_secrets s where s.name = 'queue_worker_url';
    if coalesce(base_url, '') = '' then
      return null;
    end if;
    payload := pg_catalog.jsonb_build_object(
      'type', tg_op,
      'table', tg_table_name,
      'schema', tg_table_schema,
      'record', pg_catalog.to_jsonb(new) - 'message',
      'old_record', null
    );
    select s.decrypted_secret into signing_secret
      from vault.decrypted_secrets s where s.name = 'queue_worker_signing_secret';
    if coalesce(signing_secret, '') <> '' then
      if pg_catalog.starts_with(signing_secret, 'whsec_') then
        signing_key := pg_catalog.decode(pg_catalog.substr(signing_secret, 7), 'base64');
      else
        signing_key := pg_catalog.convert_to(signing_secret, 'UTF8');
      end if;
      webhook_id := 'msg_' || pg_catalog.replace(pg_catalog.gen_random_uuid()::text, '-', '');
      signed_at := pg_catalog.floor(
        extract(epoch from pg_catalog.clock_timestamp()))::bigint::text;
      -- pg_net sends convert_to(body::text, 'UTF8'): exactly the bytes signed here.
      headers := headers || pg_catalog.jsonb_build_object(
        'webhook-id', webhook_id,
        'webhook-timestamp', signed_at,
        'webhook-signature', 'v1,' || pg_catalog.encode(
          extensions.hmac(
            pg_catalog.convert_to(webhook_id || '.' || signed_at || '.' || payload::text, 'UTF8'),
            signing_key,
            'sha256'
          ),
          'base64'
        )
      );
    else
      select s.decrypted_secret into secret
        from vault.decrypted_secrets s where s.name = 'queue_worker_webhook_secret';
      if coalesce(secret, '') <> '' then
        headers := headers || pg_catalog.jsonb_build_object('Authorization', 'Bearer ' || secret);
      end if;
    end if;
    perform net.http_post(
      url := pg_catalog.rtrim(base_url, '/') || '/webhooks/' || pg_catalog.substr(tg_table_name, 3),
      body := payload,
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
  'AFTER INSERT trigger on pgmq queue tables: POSTs a Database Webhook payload (without the message) to queue-worker via pg_net, signed (Standard Webhooks) when Vault holds queue_worker_signing_secret, else with the bearer secret.';

-- Called by its triggers only.
revoke all on function queue_worker.notify_webhook() from public, anon, authenticated;
