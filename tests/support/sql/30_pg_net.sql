-- Stand-in for pg_net 0.20's SQL interface (supabase/pg_net sql/pg_net.sql), as a
-- real 0.20 build has it (../shared/SUPABASE-FACTS.md). The sender in
-- tests/support/pg_net.py plays pg_net's background worker: it wakes on the NOTIFY
-- that net.wake() sends, which PostgreSQL delivers only after the inserting
-- transaction commits, takes up to batch_size rows, deletes them before sending,
-- sends each once (no retries) and records net._http_response.
--
-- Like pg_net: unlogged tables, `method` of the domain net.http_method, `headers`
-- nullable, the index on _http_response(created), every table and sequence granted
-- ALL to PUBLIC and every function left executable by PUBLIC (worker_restart
-- included). The C functions are PL/pgSQL or SQL here.
create schema if not exists net;

do $$
begin
  if not exists (
    select 1 from pg_type t join pg_namespace n on n.oid = t.typnamespace
     where n.nspname = 'net' and t.typname = 'http_method'
  ) then
    create domain net.http_method as text
      check (value ilike 'get' or value ilike 'post' or value ilike 'delete');
  end if;
end
$$;

create unlogged table if not exists net.http_request_queue (
  id bigserial,
  method net.http_method not null,
  url text not null,
  headers jsonb,
  body bytea,
  timeout_milliseconds integer not null
);

create unlogged table if not exists net._http_response (
  id bigint,
  status_code integer,
  content_type text,
  headers jsonb,
  content text,
  timed_out boolean,
  error_msg text,
  created timestamptz not null default now()
);

create index if not exists _http_response_created_idx on net._http_response (created);

-- curl_easy_escape: everything but unreserved characters is percent-encoded.
create or replace function net._urlencode_string(string varchar)
returns text
language sql
immutable
as $$
  select coalesce(string_agg(
    case
      when chr(b) ~ '^[A-Za-z0-9._~-]$' then chr(b)
      else '%' || upper(lpad(to_hex(b), 2, '0'))
    end, '' order by i), '')
  from (select convert_to(string, 'UTF8') as bytes) v,
       lateral generate_series(0, length(v.bytes) - 1) as i,
       lateral get_byte(v.bytes, i) as b
$$;

create or replace function net._encode_url_with_params_array(url text, params_array text[])
returns text
language sql
immutable
as $$
  select case
    when coalesce(cardinality(params_array), 0) = 0 then url
    else url || case when position('?' in url) > 0 then '&' else '?' end
             || array_to_string(params_array, '&')
  end
$$;

-- The C function sets the worker's latch at commit; a NOTIFY is delivered then too.
create or replace function net.wake()
returns void
language sql
as $$
  select pg_notify('pg_net_wake', '')
$$;

create or replace function net.check_worker_is_up()
returns void
language plpgsql
as $$
begin
  if not exists (
    select 1 from pg_stat_activity
     where application_name = 'pg_net worker' and datname = current_database()
  ) then
    raise exception using
      message = 'the pg_net background worker is not up',
      detail = 'the pg_net background worker is down due to an internal error and cannot process requests',
      hint = 'make sure that you didn''t modify any of pg_net internal tables';
  end if;
end
$$;
comment on function net.check_worker_is_up() is
  'raises an exception if the pg_net background worker is not up, otherwise it doesn''t return anything';

create or replace function net.wait_until_running()
returns void
language plpgsql
as $$
begin
  while not exists (
    select 1 from pg_stat_activity
     where application_name = 'pg_net worker' and datname = current_database()
  ) loop
    perform pg_sleep(0.05);
  end loop;
end
$$;
comment on function net.wait_until_running() is 'waits until the worker is running';

-- The C function restarts the worker at once; this one asks the sender at commit.
create or replace function net.worker_restart()
returns boolean
language plpgsql
as $$
begin
  perform pg_notify('pg_net_wake', 'restart');
  return true;
end
$$;

create or replace function net.http_get(
  url text,
  params jsonb default '{}'::jsonb,
  headers jsonb default '{}'::jsonb,
  timeout_milliseconds integer default 5000
) returns bigint
language plpgsql
as $$
declare
  request_id bigint;
  params_array text[];
begin
  select coalesce(array_agg(net._urlencode_string(key) || '=' || net._urlencode_string(value)), '{}')
    into params_array
    from jsonb_each_text(params);
  insert into net.http_request_queue (method, url, headers, timeout_milliseconds)
  values ('GET', net._encode_url_with_params_array(url, params_array), headers,
          timeout_milliseconds)
  returning id into request_id;
  perform net.wake();
  return request_id;
end
$$;

create or replace function net.http_post(
  url text,
  body jsonb default '{}'::jsonb,
  params jsonb default '{}'::jsonb,
  headers jsonb default '{"Content-Type": "application/json"}'::jsonb,
  timeout_milliseconds integer default 5000
) returns bigint
language plpgsql
as $$
declare
  request_id bigint;
  params_array text[];
  content_type text;
begin
  -- pg_net matches the header name case-insensitively and adds the JSON content
  -- type when the caller gave none; `null || ...` is null, so null headers stay
  -- null and curl sends its form default.
  select h.value into content_type
    from jsonb_each_text(coalesce(headers, '{}'::jsonb)) h
   where lower(h.key) = 'content-type'
   limit 1;
  if content_type is null then
    headers := headers || '{"Content-Type": "application/json"}'::jsonb;
  end if;
  if content_type <> 'application/json' then
    raise exception 'Content-Type header must be "application/json"';
  end if;
  select coalesce(array_agg(net._urlencode_string(key) || '=' || net._urlencode_string(value)), '{}')
    into params_array
    from jsonb_each_text(params);
  insert into net.http_request_queue (method, url, headers, body, timeout_milliseconds)
  values ('POST', net._encode_url_with_params_array(url, params_array), headers,
          convert_to(body::text, 'UTF8'), timeout_milliseconds)
  returning id into request_id;
  perform net.wake();
  return request_id;
end
$$;

create or replace function net.http_delete(
  url text,
  params jsonb default '{}'::jsonb,
  headers jsonb default '{}'::jsonb,
  timeout_milliseconds integer default 5000,
  body jsonb default null
) returns bigint
language plpgsql
as $$
declare
  request_id bigint;
  params_array text[];
begin
  select coalesce(array_agg(net._urlencode_string(key) || '=' || net._urlencode_string(value)), '{}')
    into params_array
    from jsonb_each_text(params);
  insert into net.http_request_queue (method, url, headers, body, timeout_milliseconds)
  values ('DELETE', net._encode_url_with_params_array(url, params_array), headers,
          convert_to(body::text, 'UTF8'), timeout_milliseconds)
  returning id into request_id;
  perform net.wake();
  return request_id;
end
$$;

grant usage on schema net to public;
grant all on all sequences in schema net to public;
grant all on all tables in schema net to public;
