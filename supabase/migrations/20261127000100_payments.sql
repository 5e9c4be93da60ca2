-- queue-worker: payments. Provider payment events (payments_queue) are applied
-- to queue_worker.payments exactly once per (provider, event_id), and the first
-- `succeeded` of a payment enqueues one `payment_receipt` email job.
--
-- Applied after 20261127000000_queue_worker.sql (schema, queues and the
-- service_role grants on pgmq.q_email_queue that pgmq.send needs). Every
-- statement is idempotent.

-- ---------------------------------------------------------------------------
-- Tables. service_role (the worker, and app back ends holding the secret key)
-- reads them; anon and authenticated get nothing. RLS is on with no policies:
-- service_role bypasses RLS, every other role sees no rows even if a later
-- grant slips through.
-- ---------------------------------------------------------------------------
create table if not exists queue_worker.payments (
  provider text not null check (pg_catalog.length(provider) between 1 and 64),
  payment_id text not null check (pg_catalog.length(payment_id) between 1 and 255),
  status text not null check (status in ('pending', 'succeeded', 'canceled', 'refunded')),
  amount numeric(20, 6) not null check (amount >= 0),
  currency char(3) not null check (currency ~ '^[A-Z]{3}$'),
  customer_email text not null check (pg_catalog.length(customer_email) between 3 and 320),
  metadata jsonb not null default '{}'::jsonb check (pg_catalog.jsonb_typeof(metadata) = 'object'),
  -- msg_id in pgmq.q_email_queue of the receipt; set once, on the first `succeeded`.
  receipt_msg_id bigint,
  -- When the payment was first applied as `succeeded` (the receipt's paid_at).
  paid_at timestamptz,
  created_at timestamptz not null default pg_catalog.now(),
  updated_at timestamptz not null default pg_catalog.now(),
  primary key (provider, payment_id)
);
comment on table queue_worker.payments is
  'Current state of each provider payment, as applied from payments_queue by queue_worker.apply_payment_event. Status only moves forward: pending -> succeeded | canceled, succeeded -> refunded. receipt_msg_id is the payment_receipt email job (set once). Readable by service_role only.';

create table if not exists queue_worker.payment_events (
  provider text not null,
  event_id text not null check (pg_catalog.length(event_id) between 1 and 255),
  payment_id text not null,
  status text not null check (status in ('pending', 'succeeded', 'canceled', 'refunded')),
  amount numeric(20, 6) not null,
  currency char(3) not null,
  received_at timestamptz not null default pg_catalog.now(),
  -- applied: the payment moved to (or was created at) this status;
  -- stale: the payment was already at or past it, and was left unchanged.
  result text not null check (result in ('applied', 'stale')),
  -- Times the same (provider, event_id) arrived again and changed nothing.
  duplicates integer not null default 0,
  last_duplicate_at timestamptz,
  payload jsonb not null,
  primary key (provider, event_id)
);
comment on table queue_worker.payment_events is
  'Every provider payment event applied by queue_worker.apply_payment_event, once per (provider, event_id): result applied or stale; duplicates counts replays that changed nothing. Readable by service_role only.';

create index if not exists payment_events_payment_idx
  on queue_worker.payment_events (provider, payment_id);

alter table queue_worker.payments enable row level security;
alter table queue_worker.payment_events enable row level security;

revoke all on queue_worker.payments, queue_worker.payment_events
  from public, anon, authenticated;
grant select, insert, update on queue_worker.payments, queue_worker.payment_events
  to service_role;

-- ---------------------------------------------------------------------------
-- apply_payment_event: one provider event, in one transaction.
--
-- event: {"provider", "event_id", "payment_id", "status", "amount" (decimal
-- string), "currency", "customer_email", "metadata" (object, optional)}.
-- The worker validates events before calling (currency codes and minor units
-- live there); this function re-checks what the tables need and raises class
-- 22 errors (HTTP 400) for events it cannot store.
--
-- Returns {"result": "applied" | "stale" | "duplicate", "status": <payment's
-- status after the call>, "receipt_msg_id": <bigint or null>,
-- "receipt_enqueued": <true when this call enqueued the receipt>}.
--
-- Exactly once: the event row's primary key makes a replay a no-op (counted in
-- `duplicates`; two concurrent copies wait on the unique index, the second
-- sees the first's row); the payment row is locked before it is read, so two
-- events of one payment apply one after the other and only one of them finds
-- receipt_msg_id null. The receipt job is sent with pgmq.send in this same
-- transaction: it exists if and only if the payment says it was sent.
--
-- SECURITY INVOKER: service_role has insert/update on these tables and, from
-- the first migration, insert on pgmq.q_email_queue and its sequence.
-- ---------------------------------------------------------------------------
create or replace function queue_worker.apply_payment_event(event jsonb)
returns jsonb
language plpgsql
set search_path = ''
as $$
declare
  v_provider text;
  v_event_id text;
  v_payment_id text;
  v_status text;
  v_amount_text text;
  v_amount numeric(20, 6);
  v_currency text;
  v_email text;
  v_metadata jsonb;
  v_locale text;
  v_now timestamptz := pg_catalog.now();
  v_inserted integer;
  v_result text;
  v_current text;
  v_receipt bigint;
  v_paid_at timestamptz;
  v_enqueued boolean := false;
  v_job jsonb;
begin
  if event is null or pg_catalog.jsonb_typeof(event) <> 'object' then
    raise exception 'event must be a JSON object' using errcode = '22023';
  end if;
  v_provider := event ->> 'provider';
  v_event_id := event ->> 'event_id';
  v_payment_id := event ->> 'payment_id';
  v_status := event ->> 'status';
  v_amount_text := event ->> 'amount';
  v_currency := event ->> 'currency';
  v_email := event ->> 'customer_email';
  v_metadata := coalesce(event -> 'metadata', '{}'::jsonb);

  if coalesce(v_provider, '') = '' or coalesce(v_event_id, '') = ''
     or coalesce(v_payment_id, '') = '' or coalesce(v_email, '') = '' then
    raise exception 'event needs provider, event_id, payment_id and customer_email'
      using errcode = '22023';
  end if;
  if v_status is null or v_status not in ('pending', 'succeeded', 'canceled', 'refunded') then
    raise exception 'event status must be pending, succeeded, canceled or refunded'
      using errcode = '22023';
  end if;
  if pg_catalog.jsonb_typeof(event -> 'amount') is distinct from 'string'
     or v_amount_text !~ '^(0|[1-9][0-9]{0,13})(\.[0-9]{1,6})?$' then
    raise exception 'event amount must be a decimal string with at most 14 digits before and 6 after the point'
      using errcode = '22023';
  end if;
  v_amount := v_amount_text::numeric(20, 6);
  if v_currency is null or v_currency !~ '^[A-Z]{3}$' then
    raise exception 'event currency must be 3 uppercase letters' using errcode = '22023';
  end if;
  if pg_catalog.jsonb_typeof(v_metadata) <> 'object' then
    raise exception 'event metadata must be a JSON object' using errcode = '22023';
  end if;

  -- 1. The event, once. A copy already recorded (or being recorded by a
  --    concurrent transaction, which this insert waits for) changes nothing.
  insert into queue_worker.payment_events as e
    (provider, event_id, payment_id, status, amount, currency, received_at, result, payload)
  values
    (v_provider, v_event_id, v_payment_id, v_status, v_amount, v_currency, v_now, 'applied', event)
  on conflict (provider, event_id) do nothing;
  get diagnostics v_inserted = row_count;
  if v_inserted = 0 then
    update queue_worker.payment_events e
       set duplicates = e.duplicates + 1, last_duplicate_at = v_now
     where e.provider = v_provider and e.event_id = v_event_id;
    select p.status, p.receipt_msg_id into v_current, v_receipt
      from queue_worker.payments p
     where p.provider = v_provider and p.payment_id = v_payment_id;
    return pg_catalog.jsonb_build_object(
      'result', 'duplicate', 'status', v_current, 'receipt_msg_id', v_receipt,
      'receipt_enqueued', false);
  end if;

  -- 2. The payment: created at this status, or locked and moved forward.
  insert into queue_worker.payments as p
    (provider, payment_id, status, amount, currency, customer_email, metadata,
     created_at, updated_at)
  values
    (v_provider, v_payment_id, v_status, v_amount, v_currency, v_email, v_metadata, v_now, v_now)
  on conflict (provider, payment_id) do nothing;
  get diagnostics v_inserted = row_count;
  if v_inserted = 1 then
    v_result := 'applied';
  else
    select p.status into v_current
      from queue_worker.payments p
     where p.provider = v_provider and p.payment_id = v_payment_id
       for update;
    if (v_current, v_status) in (('pending', 'succeeded'), ('pending', 'canceled'),
                                 ('succeeded', 'refunded')) then
      v_result := 'applied';
      -- The provider's latest view of the payment.
      update queue_worker.payments p
         set status = v_status, amount = v_amount, currency = v_currency,
             customer_email = v_email, metadata = v_metadata, updated_at = v_now
       where p.provider = v_provider and p.payment_id = v_payment_id;
    else
      v_result := 'stale';
      update queue_worker.payment_events e
         set result = 'stale'
       where e.provider = v_provider and e.event_id = v_event_id;
    end if;
  end if;

  -- 3. The receipt, on the first `succeeded` only (the row is ours: inserted or
  --    locked above).
  select p.status, p.receipt_msg_id, p.paid_at into v_current, v_receipt, v_paid_at
    from queue_worker.payments p
   where p.provider = v_provider and p.payment_id = v_payment_id;
  if v_result = 'applied' and v_status = 'succeeded' and v_receipt is null then
    v_locale := v_metadata ->> 'locale';
    v_job := pg_catalog.jsonb_build_object(
      'to', v_email,
      'template', 'payment_receipt',
      'context', pg_catalog.jsonb_build_object(
        'payment_id', v_payment_id,
        'amount', v_amount_text,
        'currency', v_currency,
        'provider', v_provider,
        'paid_at', pg_catalog.to_jsonb(v_now)));
    if v_locale in ('ru', 'en') then
      v_job := v_job || pg_catalog.jsonb_build_object('locale', v_locale);
    end if;
    select s into v_receipt from pgmq.send('email_queue', v_job) s;
    v_enqueued := true;
    update queue_worker.payments p
       set receipt_msg_id = v_receipt, paid_at = v_now
     where p.provider = v_provider and p.payment_id = v_payment_id;
  end if;

  return pg_catalog.jsonb_build_object(
    'result', v_result, 'status', v_current, 'receipt_msg_id', v_receipt,
    'receipt_enqueued', v_enqueued);
end
$$;
comment on function queue_worker.apply_payment_event(jsonb) is
  'Applies one provider payment event once per (provider, event_id): records it in payment_events, moves the payment forward only, enqueues the payment_receipt email on its first succeeded. Returns {"result": "applied"|"stale"|"duplicate", ...}. Callable by service_role.';

revoke all on function queue_worker.apply_payment_event(jsonb) from public, anon, authenticated;
grant execute on function queue_worker.apply_payment_event(jsonb) to service_role;
