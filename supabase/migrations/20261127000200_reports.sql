-- queue-worker: reports. A reports_queue job names a report type; its data comes
-- from the function queue_worker.report_<type>(params jsonb) returns jsonb, which
-- the worker calls through the REST API, renders (HTML summary + CSV) and mails.
--
-- Applied after 20261127000100_payments.sql (the payments table). Every
-- statement is idempotent.
--
-- A report function:
--   - takes the job's `params` object and validates it again (the worker checks
--     first; this keeps direct callers honest), raising class 22 errors
--     (HTTP 400): the worker archives the job with the message;
--   - is STABLE and SECURITY INVOKER: it only reads, with service_role's rights;
--   - is callable by service_role only.

-- Reports select payments by creation time.
create index if not exists payments_created_at_idx
  on queue_worker.payments (created_at);

-- ---------------------------------------------------------------------------
-- report_payments_summary: the payments created in a period, totalled per
-- currency and status, and listed one by one (the CSV).
--
-- params (unknown keys are refused):
--   "from"      required, "YYYY-MM-DD": first day, inclusive, from 00:00 UTC
--   "to"        required, "YYYY-MM-DD": end day, exclusive (00:00 UTC); after "from".
--               November 2026 is {"from": "2026-11-01", "to": "2026-12-01"}.
--   "currency"  optional, three uppercase letters: only that currency
--   "status"    optional, pending | succeeded | canceled | refunded: only that status
--
-- Returns:
--   {"from": "2026-11-01", "to": "2026-12-01", "currency": null, "status": null,
--    "payment_count": 3,
--    "totals": [   -- per currency, then status (pending, succeeded, refunded, canceled)
--      {"currency": "EUR", "status": "succeeded", "count": 2, "amount": "30.50"}],
--    "payments": [ -- oldest first, then by provider and payment_id
--      {"created_at": "2026-11-05 10:00:00", "updated_at": "2026-11-05 10:01:00",
--       "provider": "stripe", "payment_id": "pi_1", "status": "succeeded",
--       "amount": "10.25", "currency": "EUR", "customer_email": "a@example.com",
--       "metadata": {}}]}
-- Amounts are exact decimal strings (JSON numbers would become floats in most
-- clients), with trailing zeros beyond two decimal places dropped. Times are UTC,
-- to the second.
--
-- A report holds at most 100000 payments: a larger period is refused (22023),
-- as a mail could not carry it; ask for a shorter one.
-- ---------------------------------------------------------------------------
create or replace function queue_worker.report_payments_summary(params jsonb)
returns jsonb
language plpgsql
stable
set search_path = ''
as $$
declare
  max_payments constant integer := 100000;
  v_unknown text;
  v_key text;
  v_from date;
  v_to date;
  v_currency text;
  v_status text;
  v_start timestamptz;
  v_end timestamptz;
  v_count bigint;
  v_totals jsonb;
  v_payments jsonb;
begin
  if params is null or pg_catalog.jsonb_typeof(params) <> 'object' then
    raise exception 'params must be a JSON object' using errcode = '22023';
  end if;
  select pg_catalog.string_agg(k, ', ' order by k) into v_unknown
    from pg_catalog.jsonb_object_keys(params) k
   where k not in ('from', 'to', 'currency', 'status');
  if v_unknown is not null then
    raise exception 'params: unknown key(s): %', v_unknown
      using errcode = '22023', hint = 'Allowed keys: from, to, currency, status.';
  end if;

  foreach v_key in array array['from', 'to'] loop
    if pg_catalog.jsonb_typeof(params -> v_key) is distinct from 'string'
       or (params ->> v_key) !~ '^[0-9]{4}-[0-9]{2}-[0-9]{2}$' then
      raise exception 'params.%: must be a date as YYYY-MM-DD', v_key using errcode = '22007';
    end if;
    begin
      if v_key = 'from' then
        v_from := (params ->> v_key)::date;
      else
        v_to := (params ->> v_key)::date;
      end if;
    exception when data_exception then
      raise exception 'params.%: % is not a valid date', v_key, params ->> v_key
        using errcode = '22008';
    end;
  end loop;
  if v_to <= v_from then
    raise exception 'params.to: must be after params.from (to is exclusive)'
      using errcode = '22023';
  end if;

  if params ? 'currency' and pg_catalog.jsonb_typeof(params -> 'currency') <> 'null' then
    v_currency := params ->> 'currency';
    if pg_catalog.jsonb_typeof(params -> 'currency') <> 'string' or v_currency !~ '^[A-Z]{3}$' then
      raise exception 'params.currency: must be three uppercase letters, like EUR'
        using errcode = '22023';
    end if;
  end if;
  if params ? 'status' and pg_catalog.jsonb_typeof(params -> 'status') <> 'null' then
    v_status := params ->> 'status';
    if pg_catalog.jsonb_typeof(params -> 'status') <> 'string'
       or v_status not in ('pending', 'succeeded', 'canceled', 'refunded') then
      raise exception 'params.status: must be one of pending, succeeded, canceled, refunded'
        using errcode = '22023';
    end if;
  end if;

  v_start := v_from::timestamp at time zone 'UTC';
  v_end := v_to::timestamp at time zone 'UTC';

  select pg_catalog.count(*) into v_count
    from queue_worker.payments p
   where p.created_at >= v_start and p.created_at < v_end
     and (v_currency is null or p.currency = v_currency)
     and (v_status is null or p.status = v_status);
  if v_count > max_payments then
    raise exception 'the report would hold % payments, more than the % one report may hold',
      v_count, max_payments
      using errcode = '22023', hint = 'Ask for a shorter period, or one currency or status.';
  end if;

  select coalesce(pg_catalog.jsonb_agg(pg_catalog.jsonb_build_object(
           'currency', t.currency,
           'status', t.status,
           'count', t.n,
           'amount', case when pg_catalog.scale(pg_catalog.trim_scale(t.total)) < 2
                          then pg_catalog.round(t.total, 2)::text
                          else pg_catalog.trim_scale(t.total)::text end)
           order by t.currency,
                    pg_catalog.array_position(
                      array['pending', 'succeeded', 'refunded', 'canceled'], t.status)),
         '[]'::jsonb)
    into v_totals
    from (select p.currency::text as currency, p.status, pg_catalog.count(*) as n,
                 pg_catalog.sum(p.amount) as total
            from queue_worker.payments p
           where p.created_at >= v_start and p.created_at < v_end
             and (v_currency is null or p.currency = v_currency)
             and (v_status is null or p.status = v_status)
           group by p.currency, p.status) t;

  select coalesce(pg_catalog.jsonb_agg(pg_catalog.jsonb_build_object(
           'created_at', pg_catalog.to_char(p.created_at at time zone 'UTC',
                                            'YYYY-MM-DD HH24:MI:SS'),
           'updated_at', pg_catalog.to_char(p.updated_at at time zone 'UTC',
                                            'YYYY-MM-DD HH24:MI:SS'),
           'provider', p.provider,
           'payment_id', p.payment_id,
           'status', p.status,
           'amount', case when pg_catalog.scale(pg_catalog.trim_scale(p.amount)) < 2
                          then pg_catalog.round(p.amount, 2)::text
                          else pg_catalog.trim_scale(p.amount)::text end,
           'currency', p.currency::text,
           'customer_email', p.customer_email,
           'metadata', p.metadata)
           order by p.created_at, p.provider, p.payment_id),
         '[]'::jsonb)
    into v_payments
    from queue_worker.payments p
   where p.created_at >= v_start and p.created_at < v_end
     and (v_currency is null or p.currency = v_currency)
     and (v_status is null or p.status = v_status);

  return pg_catalog.jsonb_build_object(
    'from', v_from, 'to', v_to, 'currency', v_currency, 'status', v_status,
    'payment_count', v_count, 'totals', v_totals, 'payments', v_payments);
end
$$;
comment on function queue_worker.report_payments_summary(jsonb) is
  'Report payments_summary: payments created in [params.from, params.to) (UTC dates), optionally one currency and/or status; returns {from, to, currency, status, payment_count, totals: [{currency, status, count, amount}], payments: [...]}, amounts as exact decimal strings. Class 22 errors for bad params. Callable by service_role.';

revoke all on function queue_worker.report_payments_summary(jsonb) from public, anon, authenticated;
grant execute on function queue_worker.report_payments_summary(jsonb) to service_role;
