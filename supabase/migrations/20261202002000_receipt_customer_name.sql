-- queue-worker: the receipt greets the customer by name when the payment event gives one.
--
-- Replaces queue_worker.apply_payment_event(jsonb) from 20261201001100_refunds_only_as_paid.sql
-- (same signature, same answers, same checks). The one change: the `payment_receipt`
-- email job it enqueues on a payment's first `succeeded` carries
-- `context.customer_name` when the event's `metadata.customer_name` is a string of 1
-- to 200 characters (trimmed) without control characters; otherwise the receipt is
-- sent without a name, as before. The template greets the customer with it.
--
-- Callable by service_role (SECURITY INVOKER, as before).
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
  v_name text;
  v_now timestamptz := pg_catalog.now();
  v_inserted integer;
  v_result text;
  v_current text;
  v_row_amount numeric(20, 6);
  v_row_currency text;
  v_row_email text;
  v_captured numeric(20, 6);
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
    select p.status, p.amount, p.currency, p.customer_email
      into v_current, v_row_amount, v_row_currency, v_row_email
      from queue_worker.payments p
     where p.provider = v_provider and p.payment_id = v_payment_id
       for update;
    -- A refund gives back what was paid, to whom it was paid, in its currency: an
    -- event that says otherwise is refused whatever the payment's status, so the
    -- outcome does not depend on the order in which racing events arrive. The
    -- raise rolls back the event row too; the job is archived with this reason.
    if v_status = 'refunded' then
      if v_currency is distinct from v_row_currency then
        raise exception 'refunded event refused: it changes the payment''s currency from % to %',
          v_row_currency, v_currency using errcode = '22023';
      end if;
      if v_email is distinct from v_row_email then
        raise exception 'refunded event refused: it changes the payment''s customer_email'
          using errcode = '22023';
      end if;
      if v_current in ('succeeded', 'refunded') then
        -- What was captured: the amount of the payment's applied succeeded event (a
        -- refund overwrites payments.amount), or, for a payment first seen
        -- refunded, its amount.
        select e.amount into v_captured
          from queue_worker.payment_events e
         where e.provider = v_provider and e.payment_id = v_payment_id
           and e.status = 'succeeded' and e.result = 'applied'
         limit 1;
        v_captured := coalesce(v_captured, v_row_amount);
        if v_amount > v_captured then
          raise exception 'refunded event refused: its amount % is more than the % % captured',
            pg_catalog.trim_scale(v_amount), pg_catalog.trim_scale(v_captured), v_row_currency
            using errcode = '22023';
        end if;
      end if;
    end if;
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
    -- The customer's name, when the event's metadata gives one the mail can show.
    v_name := pg_catalog.btrim(v_metadata ->> 'customer_name');
    if pg_catalog.jsonb_typeof(v_metadata -> 'customer_name') = 'string'
       and pg_catalog.length(v_name) between 1 and 200
       and v_name !~ '[[:cntrl:]]' then
      v_job := pg_catalog.jsonb_set(v_job, '{context,customer_name}', pg_catalog.to_jsonb(v_name));
    end if;
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
  'Applies one provider payment event once per (provider, event_id): records it in payment_events, moves the payment forward only, refuses (class 22) a refunded event that changes the currency or customer_email or asks for more than was captured, enqueues the payment_receipt email on its first succeeded. Returns {"result": "applied"|"stale"|"duplicate", ...}. Callable by service_role.';

revoke all on function queue_worker.apply_payment_event(jsonb) from public, anon, authenticated;
grant execute on function queue_worker.apply_payment_event(jsonb) to service_role;

select queue_worker.record_migration('20261202002000_receipt_customer_name');
