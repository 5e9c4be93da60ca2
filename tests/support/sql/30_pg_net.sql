-- Stand-in for pg_net's SQL interface (supabase/pg_net). The sender in
-- tests/support/pg_net.py plays pg_net's background worker: it wakes on the
-- NOTIFY below, which PostgreSQL delivers only after the inserting transaction
-- commits, takes up to batch_size rows, deletes them before sending, sends each
-- once (no retries) and records net._http_response.
create schema if not exists net;

create unlogged table if not exists net.http_request_queue (
  id bigserial not null,
  method text not null,
  url text not null,
  headers jsonb not null,
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

-- curl_easy_escape: everything but unreserved characters is percent-encoded.
create or replace function net._urlencode(value text)
returns text
language sql
immutable
set search_path = ''
as $$
  select coalesce(string_agg(
    case
      when chr(b) ~ '^[A-Za-z0-9._~-]$' then chr(b)
      else '%' || upper(lpad(to_hex(b), 2, '0'))
    end, '' order by i), '')
  from (select convert_to(value, 'UTF8') as bytes) v,
       lateral generate_series(0, length(v.bytes) - 1) as i,
       lateral get_byte(v.bytes, i) as b
$$;

create or replace function net.http_post(
  url text,
  body jsonb default '{}'::jsonb,
  params jsonb default '{}'::jsonb,
  headers jsonb default '{"Content-Type": "application/json"}'::jsonb,
  timeout_milliseconds integer default 5000
) returns bigint
language plpgsql
set search_path = ''
as $$
declare
  request_id bigint;
  full_url text := url;
  query text;
  content_type text;
  all_headers jsonb := coalesce(headers, '{}'::jsonb);
begin
  -- pg_net matches the header name case-insensitively and adds the JSON
  -- content type when the caller gave none.
  select h.value into content_type
    from jsonb_each_text(all_headers) h
   where lower(h.key) = 'content-type'
   limit 1;
  if content_type is null then
    all_headers := all_headers || '{"Content-Type": "application/json"}'::jsonb;
  elsif content_type <> 'application/json' then
    raise exception 'Content-Type header must be "application/json"';
  end if;
  select string_agg(net._urlencode(p.key) || '=' || net._urlencode(p.value), '&')
    into query
    from jsonb_each_text(coalesce(params, '{}'::jsonb)) p;
  if query is not null then
    full_url := full_url || case when position('?' in full_url) > 0 then '&' else '?' end || query;
  end if;
  insert into net.http_request_queue (method, url, headers, body, timeout_milliseconds)
  values ('POST', full_url, all_headers,
          case when body is null then null else convert_to(body::text, 'UTF8') end,
          timeout_milliseconds)
  returning id into request_id;
  perform pg_notify('pg_net_wake', '');
  return request_id;
end
$$;

grant usage on schema net to public;
grant execute on function net.http_post(text, jsonb, jsonb, jsonb, integer) to public;
grant select, insert on net.http_request_queue to public;
grant usage on sequence net.http_request_queue_id_seq to public;
grant select on net._http_response to public;
