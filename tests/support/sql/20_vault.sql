-- Stand-in for Supabase Vault (supabase_vault): the SQL interface and the
-- privileges, not the encryption. Source of the privileges:
-- supabase/postgres ansible/files/postgresql_extension_custom_scripts/supabase_vault/after-create.sql
create schema if not exists vault;

create table if not exists vault.secrets (
  id uuid primary key default gen_random_uuid(),
  name text unique,
  description text not null default '',
  secret text not null,
  key_id uuid,
  nonce bytea,
  created_at timestamptz not null default now(),
  updated_at timestamptz not null default now()
);

create or replace view vault.decrypted_secrets as
  select id, name, description, secret, secret as decrypted_secret, key_id, nonce,
         created_at, updated_at
  from vault.secrets;

create or replace function vault.create_secret(
  new_secret text,
  new_name text default null,
  new_description text default '',
  new_key_id uuid default null
) returns uuid
language plpgsql
set search_path = ''
as $$
declare
  rec record;
begin
  insert into vault.secrets (secret, name, description, key_id)
  values (new_secret, new_name, new_description, new_key_id)
  returning * into rec;
  return rec.id;
end
$$;

create or replace function vault.update_secret(
  secret_id uuid,
  new_secret text default null,
  new_name text default null,
  new_description text default null,
  new_key_id uuid default null
) returns void
language plpgsql
set search_path = ''
as $$
begin
  update vault.secrets s
     set secret = coalesce(new_secret, s.secret),
         name = coalesce(new_name, s.name),
         description = coalesce(new_description, s.description),
         key_id = coalesce(new_key_id, s.key_id),
         updated_at = now()
   where s.id = secret_id;
end
$$;

revoke all on schema vault from public;
revoke all on all tables in schema vault from public, anon, authenticated;
revoke all on all functions in schema vault from public, anon, authenticated;
grant usage on schema vault to qw_postgres with grant option;
grant usage on schema vault to service_role;
grant select, delete on vault.secrets, vault.decrypted_secrets to qw_postgres with grant option;
grant select, delete on vault.secrets, vault.decrypted_secrets to service_role;
grant insert, update on vault.secrets to qw_postgres, service_role;
grant execute on function vault.create_secret(text, text, text, uuid),
                          vault.update_secret(uuid, text, text, text, uuid)
  to qw_postgres with grant option;
grant execute on function vault.create_secret(text, text, text, uuid),
                          vault.update_secret(uuid, text, text, text, uuid)
  to service_role;
