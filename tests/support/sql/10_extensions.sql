-- Supabase installs pgcrypto into the `extensions` schema. The embedded server's
-- build has no OpenSSL and so no pgcrypto: there, a stand-in for the one pgcrypto
-- function the migrations call, `hmac(bytea, bytea, text)` (the signed webhooks of
-- 20261127000300_signed_webhooks.sql), is created instead. It computes HMAC
-- (RFC 2104) with the built-in sha256(), gives pgcrypto's output for 'sha256'
-- and refuses every other algorithm; tests/test_security.py checks it against
-- Python's hmac (and against pgcrypto where both exist).
create schema if not exists extensions;
grant usage on schema extensions to public;
do $do$
begin
  if exists (select 1 from pg_available_extensions where name = 'pgcrypto') then
    create extension if not exists pgcrypto with schema extensions;
  else
    execute $standin$
create or replace function extensions.hmac(data bytea, key bytea, type text)
returns bytea
language plpgsql
immutable strict parallel safe
set search_path = ''
as $fn$
declare
  block_size constant integer := 64;
  k bytea := key;
  inner_pad bytea;
  outer_pad bytea;
begin
  if pg_catalog.lower(type) <> 'sha256' then
    raise exception 'Cannot use "%": No such hash algorithm', type
      using errcode = '39000', hint = 'this pgcrypto stand-in knows sha256 only';
  end if;
  if pg_catalog.length(k) > block_size then
    k := pg_catalog.sha256(k);
  end if;
  k := k || pg_catalog.decode(pg_catalog.repeat('00', block_size - pg_catalog.length(k)), 'hex');
  inner_pad := k;
  outer_pad := k;
  for i in 0 .. block_size - 1 loop
    inner_pad := pg_catalog.set_byte(inner_pad, i, pg_catalog.get_byte(k, i) # 54);   -- 0x36
    outer_pad := pg_catalog.set_byte(outer_pad, i, pg_catalog.get_byte(k, i) # 92);   -- 0x5c
  end loop;
  return pg_catalog.sha256(outer_pad || pg_catalog.sha256(inner_pad || data));
end
$fn$
$standin$;
    comment on function extensions.hmac(bytea, bytea, text) is
      'Test-bed stand-in for pgcrypto hmac(bytea, bytea, text), sha256 only.';
  end if;
end
$do$;
