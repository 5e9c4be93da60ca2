-- queue-worker: the webhook trigger refuses Vault values that would split a header.
--
-- Replaces queue_worker.notify_webhook() from 20261127000300_signed_webhooks.sql
-- (same name, signature and behaviour otherwise). pg_net sends header values as they
-- are: a CR or LF inside one ends the header line on the wire and starts another, so
-- a bearer secret pasted into Vault with its trailing newline breaks every webhook,
-- and a crafted value such as `s3cret\r\nX-Injected: 1` adds a header of its choosing.
-- Now, before anything is sent:
--
-- * queue_worker_url must be a plausible base URL: http:// or https://, a host name
--   or an IP address, an optional port and path; no user name, query, fragment,
--   spaces or control characters; at most 2048 characters.
-- * queue_worker_webhook_secret or queue_worker_signing_secret (whichever is used)
--   must hold no control character (C0, DEL, C1) and no U+2028 / U+2029, and be at
--   most 4096 characters.
--
-- Otherwise the trigger raises a WARNING naming the Vault secret and what is wrong
-- (never its value) and sends nothing. The insert still succeeds and the worker's
-- sweeper takes the message within SWEEP_INTERVAL_SECONDS. Fix the value with
-- `select vault.update_secret(id, '<value without the newline>')`.
--
-- SECURITY DEFINER because the inserting role (for example authenticated, through
-- pgmq_public.send) may not read Vault; the function runs as its owner (postgres),
-- reads only the queue_worker_* secrets and calls only net.http_post and
-- extensions.hmac.
create or replace function queue_worker.notify_webhook()
returns trigger
language plpgsql
security definer
set search_path = ''
as $$
declare
  -- C0 controls (CR, LF, tab, ...), DEL, C1 controls, and the Unicode line and
  -- paragraph separators. NUL cannot occur in text.
  control constant text := '[\x01-\x1f\x7f-\x9f\u2028\u2029]';
  label constant text := '[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?';
  base_url text;
  secret text;
  secret_name text;
  signing_secret text;
  signing_key bytea;
  refused text;
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
    if base_url ~ control then
      refused := 'Vault secret queue_worker_url holds a control character '
        || '(a line break or tab, often a newline pasted with it)';
    elsif pg_catalog.length(base_url) > 2048
       or base_url !~* ('^https?://(' || label || '(\.' || label || ')*|\[[0-9a-f:.]+\])'
                        || '(:[0-9]{1,5})?(/[a-z0-9._~!$&''()*+,;=:@%/-]*)?$') then
      refused := 'Vault secret queue_worker_url is not a plausible base URL '
        || '(http:// or https://, a host, an optional port and path; no query, '
        || 'user name, spaces or control characters; at most 2048 characters)';
    end if;

    select s.decrypted_secret into signing_secret
      from vault.decrypted_secrets s where s.name = 'queue_worker_signing_secret';
    if coalesce(signing_secret, '') <> '' then
      secret_name := 'queue_worker_signing_secret';
      secret := signing_secret;
    else
      select s.decrypted_secret into secret
        from vault.decrypted_secrets s where s.name = 'queue_worker_webhook_secret';
      secret_name := 'queue_worker_webhook_secret';
    end if;
    if refused is null and secret ~ control then
      refused := 'Vault secret ' || secret_name || ' holds a control character '
        || '(a line break or tab, often a newline pasted with it)';
    elsif refused is null and pg_catalog.length(secret) > 4096 then
      refused := 'Vault secret ' || secret_name || ' is longer than 4096 characters';
    end if;
    if refused is not null then
      raise warning 'queue_worker.notify_webhook: webhook for %.% not sent: %',
        tg_table_schema, tg_table_name, refused;
      return null;
    end if;

    payload := pg_catalog.jsonb_build_object(
      'type', tg_op,
      'table', tg_table_name,
      'schema', tg_table_schema,
      'record', pg_catalog.to_jsonb(new) - 'message',
      'old_record', null
    );
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
    elsif coalesce(secret, '') <> '' then
      headers := headers || pg_catalog.jsonb_build_object('Authorization', 'Bearer ' || secret);
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
  'AFTER INSERT trigger on pgmq queue tables: POSTs a Database Webhook payload (without the message) to queue-worker via pg_net, signed (Standard Webhooks) when Vault holds queue_worker_signing_secret, else with the bearer secret. Sends nothing, with a WARNING naming the secret, when the URL is not a plausible http(s) base URL or a secret holds a control character.';

-- Called by its triggers only.
revoke all on function queue_worker.notify_webhook() from public, anon, authenticated;

select queue_worker.record_migration('20261201001000_webhook_refuses_control_characters');
