-- queue-worker: jobs on a schedule, with pg_cron (Supabase Cron).
--
--   select queue_worker.schedule(<name>, <cron expression>, <attached queue>, <job>);
--   select * from queue_worker.list_schedules();
--   select queue_worker.unschedule(<name>);
--
-- docs/guides/schedules.md sets the weekly payments report this way.
--
-- schedule() keeps the job in queue_worker.schedules and asks pg_cron to run
--   select queue_worker.run_schedule('<name>')
-- on that schedule; run_schedule() enqueues the stored job with pgmq.send, so the
-- webhook trigger and the worker's sweeper take it as any other job. The schedule
-- lives in the database: however many replicas of the worker run, each run enqueues
-- one job, and pgmq hands it to one of them.
--
-- The job body never becomes SQL text. The cron command holds only the schedule's
-- name, which must match ^[a-z0-9][a-z0-9_-]{0,47}$ and is quoted with format('%L')
-- all the same; the body is read from the table at run time, as data.
--
-- pg_cron is optional for this file: PL/pgSQL resolves names when a statement first
-- runs, so these functions are created whether or not the extension is there, and
-- nothing here names cron.* outside them. Without pg_cron (a project that has not
-- enabled it, the embedded server), schedule() says how to enable it.
--
-- pg_cron runs a job as the role that scheduled it and needs USAGE on schema cron
-- to schedule one. On Supabase the `postgres` role (which applies these migrations
-- and owns these functions) has both; service_role has neither. So schedule(),
-- unschedule(), list_schedules() and cron_status() are SECURITY DEFINER: they run
-- as the owner, whose pg_cron jobs they are, and they touch only those jobs (named
-- 'queue_worker:<name>'). Callable by service_role only.
--
-- Times are pg_cron's time zone: GMT (UTC) unless cron.timezone (pg_cron >= 1.5)
-- says otherwise; cron_status() reports it.

create table if not exists queue_worker.schedules (
  name text primary key
    constraint schedules_name_check check (name ~ '^[a-z0-9][a-z0-9_-]{0,47}$'),
  cron text not null,
  queue_name text not null,
  job jsonb not null
    constraint schedules_job_check check (pg_catalog.jsonb_typeof(job) = 'object'),
  created_at timestamptz not null default pg_catalog.now(),
  updated_at timestamptz not null default pg_catalog.now()
);
comment on table queue_worker.schedules is
  'Jobs enqueued on a schedule by pg_cron (queue_worker.schedule). Written and read through the schedule functions only.';
revoke all on queue_worker.schedules from public, anon, authenticated, service_role;
-- The schema is exposed to the API: row security with no policy keeps the table shut
-- even to a role granted rights on it by mistake. The owner's functions are unaffected.
alter table queue_worker.schedules enable row level security;

-- cron_status: whether pg_cron is there for the schedule functions, and how it reads
-- schedules. `usable` is whether the owner (who schedules the jobs) may use schema
-- cron; `seconds` whether 'N seconds' schedules exist (pg_cron 1.5 and later).
create or replace function queue_worker.cron_status()
returns table (version text, usable boolean, time_zone text, seconds boolean)
language plpgsql
stable
security definer
set search_path = ''
as $$
begin
  select e.extversion into version from pg_catalog.pg_extension e where e.extname = 'pg_cron';
  if version is null then
    usable := false;
    seconds := false;
  else
    usable := pg_catalog.has_schema_privilege('cron', 'usage');
    -- pg_cron before 1.5 has no cron.timezone and reads schedules in GMT.
    time_zone := coalesce(nullif(pg_catalog.current_setting('cron.timezone', true), ''),
                          'GMT');
    seconds := false;
    if version ~ '^[0-9]+(\.[0-9]+)*(-.*)?$' then
      seconds := pg_catalog.string_to_array(pg_catalog.split_part(version, '-', 1), '.')::integer[]
                 >= array[1, 5];
    end if;
  end if;
  return next;
end
$$;
comment on function queue_worker.cron_status() is
  'pg_cron as the schedule functions see it: version (null when not enabled), usable by the owner, time_zone, seconds schedules supported. Callable by service_role.';

-- cron_expression: a schedule as pg_cron reads it, checked here so that a mistake is
-- named (pg_cron says only "invalid schedule"), in lower case with single spaces:
--   five fields, minute (0-59) hour (0-23) day-of-month (1-31) month (1-12 or jan-dec)
--   day-of-week (0-7, 0 and 7 are Sunday, or sun-sat); each a comma list of *, N or
--   N-M, optionally /step after * or a range;
--   @hourly, @daily, @midnight, @weekly, @monthly, @yearly, @annually;
--   'N seconds' (N from 1 to 59) where `seconds` is true (pg_cron >= 1.5).
-- Owner only: schedule() calls it.
create or replace function queue_worker.cron_expression(expression text, seconds boolean)
returns text
language plpgsql
immutable
set search_path = ''
as $$
declare
  labels constant text[] := array['minute', 'hour', 'day-of-month', 'month', 'day-of-week'];
  lows constant integer[] := array[0, 0, 1, 1, 0];
  highs constant integer[] := array[59, 23, 31, 12, 7];
  months constant text[] := array['jan', 'feb', 'mar', 'apr', 'may', 'jun',
                                  'jul', 'aug', 'sep', 'oct', 'nov', 'dec'];
  days constant text[] := array['sun', 'mon', 'tue', 'wed', 'thu', 'fri', 'sat'];
  help constant text := 'Five fields: minute hour day-of-month month day-of-week, in pg_cron''s '
    'time zone (GMT unless cron.timezone is set): ''0 9 * * 1'' is Mondays at 09:00, '
    '''*/15 * * * *'' every 15 minutes. Or @hourly, @daily, @weekly, @monthly, @yearly; '
    'or ''N seconds'' (1 to 59) with pg_cron 1.5 or later.';
  expr text;
  fields text[];
  item text;
  token text;
  parts text[];
  bounds integer[];
  value integer;
  step integer;
begin
  if expression is null or pg_catalog.length(expression) > 100 then
    raise exception 'invalid cron expression: must be given, in at most 100 characters'
      using errcode = '22023', hint = help;
  end if;
  expr := pg_catalog.lower(pg_catalog.btrim(
    pg_catalog.regexp_replace(expression, '[[:space:]]+', ' ', 'g')));

  parts := pg_catalog.regexp_match(expr, '^([0-9]{1,3}) seconds?$');
  if parts is not null then
    if parts[1]::integer not between 1 and 59 then
      raise exception 'invalid cron expression "%": seconds must be from 1 to 59', expr
        using errcode = '22023', hint = 'For a minute or longer, use five fields: ''* * * * *'' is every minute.';
    end if;
    if not coalesce(seconds, false) then
      raise exception 'invalid cron expression "%": this database''s pg_cron has no seconds schedules (pg_cron 1.5 and later have them; Supabase runs 1.6)', expr
        using errcode = '22023', hint = 'Use five fields (''* * * * *'' is every minute), or upgrade pg_cron.';
    end if;
    return parts[1]::integer || ' seconds';
  end if;

  if pg_catalog.left(expr, 1) = '@' then
    if expr in ('@hourly', '@daily', '@midnight', '@weekly', '@monthly', '@yearly', '@annually') then
      return expr;
    end if;
    if expr in ('@reboot', '@restart') then
      raise exception 'invalid cron expression "%": it runs only when the database server starts, which is no schedule for a job', expr
        using errcode = '22023', hint = help;
    end if;
    raise exception 'invalid cron expression "%": unknown shorthand', expr
      using errcode = '22023', hint = help;
  end if;

  fields := pg_catalog.string_to_array(expr, ' ');
  if coalesce(pg_catalog.array_length(fields, 1), 0) <> 5 then
    raise exception 'invalid cron expression "%": it has % fields, not five', expr,
      coalesce(pg_catalog.array_length(fields, 1), 0)
      using errcode = '22023', hint = help;
  end if;
  for i in 1 .. 5 loop
    foreach item in array pg_catalog.string_to_array(fields[i], ',') loop
      -- * | a | a-b, then /step: groups 1 (all before the step), 2 (a), 4 (b), 6 (step)
      parts := pg_catalog.regexp_match(item,
        '^(\*|([0-9]{1,2}|[a-z]{3})(-([0-9]{1,2}|[a-z]{3}))?)(/([0-9]{1,2}))?$');
      if parts is null then
        raise exception 'invalid cron expression "%": % field: "%" is not *, a value, a range or a step',
          expr, labels[i], item
          using errcode = '22023', hint = help;
      end if;
      if parts[1] = '*' then
        bounds := array[lows[i], highs[i]];
      else
        if parts[4] is null and parts[6] is not null then
          raise exception 'invalid cron expression "%": % field: a step goes after * or a range (*/10, 0-30/10), not after "%"',
            expr, labels[i], parts[2]
            using errcode = '22023', hint = help;
        end if;
        bounds := array[]::integer[];
        foreach token in array array[parts[2], coalesce(parts[4], parts[2])] loop
          value := case
            when token ~ '^[0-9]+$' then token::integer
            when i = 4 then pg_catalog.array_position(months, token)
            when i = 5 then pg_catalog.array_position(days, token) - 1
          end;
          if value is null then
            raise exception 'invalid cron expression "%": % field: "%" is not a number%', expr, labels[i], token,
              case i when 4 then ' or a month (jan-dec)' when 5 then ' or a day (sun-sat)' else '' end
              using errcode = '22023', hint = help;
          end if;
          if value not between lows[i] and highs[i] then
            raise exception 'invalid cron expression "%": % field: % is outside %-%',
              expr, labels[i], value, lows[i], highs[i]
              using errcode = '22023', hint = help;
          end if;
          bounds := bounds || value;
        end loop;
        if bounds[1] > bounds[2] then
          raise exception 'invalid cron expression "%": % field: the range %-% is backwards',
            expr, labels[i], bounds[1], bounds[2]
            using errcode = '22023', hint = help;
        end if;
      end if;
      step := parts[6]::integer;
      if step is not null and step not between 1 and bounds[2] - bounds[1] + 1 then
        raise exception 'invalid cron expression "%": % field: the step % must be from 1 to %',
          expr, labels[i], step, bounds[2] - bounds[1] + 1
          using errcode = '22023', hint = help;
      end if;
    end loop;
  end loop;
  return expr;
end
$$;
comment on function queue_worker.cron_expression(text, boolean) is
  'Internal: a schedule checked and normalized as pg_cron reads it; class 22 errors name the mistake. Called by queue_worker.schedule (the owner) only.';

-- run_schedule: enqueue a schedule's job now; returns its msg_id. The command of every
-- pg_cron job schedule() creates; pg_cron runs it as the owner. Owner only.
create or replace function queue_worker.run_schedule(name text)
returns bigint
language plpgsql
set search_path = ''
as $$
declare
  v_queue text;
  v_job jsonb;
  new_id bigint;
begin
  select s.queue_name, s.job into v_queue, v_job
    from queue_worker.schedules s where s.name = run_schedule.name;
  if not found then
    raise exception 'no schedule named %', pg_catalog.left(run_schedule.name, 64)
      using errcode = 'P0002',
            hint = 'A pg_cron job outlived its schedule: remove it with queue_worker.unschedule().';
  end if;
  perform queue_worker.queue_table(v_queue);
  select s into new_id from pgmq.send(v_queue, v_job) s;
  return new_id;
end
$$;
comment on function queue_worker.run_schedule(text) is
  'Enqueues a schedule''s job (pgmq.send) and returns its msg_id: the command pg_cron runs for each schedule. Called by pg_cron as the owner only.';

-- schedule: create or replace a schedule: enqueue `job` into `queue` on `cron`.
-- Returns the pg_cron job id. A name already scheduled gets the new expression, queue
-- and job (its pg_cron job is kept). The queue is any queue the worker's functions
-- accept (queue_worker.queue_table: an attached queue), so running as the owner never
-- reaches a queue service_role has no rights on. Class 22 and P0001 errors for bad
-- arguments; 0A000 when pg_cron is not enabled or not usable by the owner.
create or replace function queue_worker.schedule(name text, cron text, queue text, job jsonb)
returns bigint
language plpgsql
security definer
set search_path = ''
as $$
declare
  status record;
  v_cron text;
begin
  if schedule.name is null or schedule.name !~ '^[a-z0-9][a-z0-9_-]{0,47}$' then
    raise exception 'invalid schedule name %', pg_catalog.quote_nullable(pg_catalog.left(schedule.name, 64))
      using errcode = '22023',
            hint = '1 to 48 characters: lower-case letters, digits, _ and -, starting with a letter or digit.';
  end if;
  perform queue_worker.queue_table(schedule.queue);
  if schedule.job is null or pg_catalog.jsonb_typeof(schedule.job) <> 'object' then
    raise exception 'invalid job: must be a JSON object' using errcode = '22023';
  end if;
  if pg_catalog.octet_length(schedule.job::text) > 65536 then
    raise exception 'invalid job: larger than 65536 bytes' using errcode = '22023',
      hint = 'A scheduled job names its work; keep large data in a table it points to.';
  end if;

  select * into status from queue_worker.cron_status();
  if status.version is null then
    raise exception 'pg_cron is not enabled in this database: schedules need the pg_cron extension'
      using errcode = '0A000',
            hint = 'Enable the pg_cron extension: on Supabase, Dashboard > Integrations > Cron; elsewhere, add pg_cron to shared_preload_libraries and run create extension pg_cron.';
  end if;
  if not status.usable then
    raise exception 'pg_cron is enabled, but the role % may not use schema cron', current_user
      using errcode = '0A000',
            hint = pg_catalog.format('grant usage on schema cron to %I; grant all on all functions in schema cron to %I;', current_user, current_user);
  end if;
  v_cron := queue_worker.cron_expression(schedule.cron, status.seconds);

  insert into queue_worker.schedules (name, cron, queue_name, job)
  values (schedule.name, v_cron, schedule.queue, schedule.job)
  on conflict on constraint schedules_pkey do update
    set cron = excluded.cron, queue_name = excluded.queue_name, job = excluded.job,
        updated_at = pg_catalog.now();
  -- pg_cron creates the job, or updates the one of that name and owner.
  return cron.schedule(
    'queue_worker:' || schedule.name,
    v_cron,
    pg_catalog.format('select queue_worker.run_schedule(%L)', schedule.name));
end
$$;
comment on function queue_worker.schedule(text, text, text, jsonb) is
  'Creates or replaces a schedule: pg_cron enqueues job into queue on cron (pgmq.send). Returns the pg_cron job id. Callable by service_role.';

-- unschedule: remove a schedule and its pg_cron job; true when there was one.
create or replace function queue_worker.unschedule(name text)
returns boolean
language plpgsql
security definer
set search_path = ''
as $$
declare
  removed boolean;
  v_jobid bigint;
begin
  delete from queue_worker.schedules s where s.name = unschedule.name;
  removed := found;
  if (select c.version from queue_worker.cron_status() c) is not null then
    -- The owner's own jobs (pg_cron's row security shows no others to a non-superuser).
    for v_jobid in
      select j.jobid from cron.job j
       where j.jobname = 'queue_worker:' || unschedule.name and j.username = current_user
    loop
      perform cron.unschedule(v_jobid);
      removed := true;
    end loop;
  end if;
  return removed;
end
$$;
comment on function queue_worker.unschedule(text) is
  'Removes a schedule and its pg_cron job; returns whether there was one. Callable by service_role.';

-- list_schedules: every schedule (or the one named), with its pg_cron job and last
-- run from cron.job_run_details: status (starting, running, sending, connecting,
-- succeeded, failed), start and end time and pg_cron's message ("1 row", or the
-- error). jobid is null when the schedule has no pg_cron job (pg_cron not enabled,
-- or its job removed behind the worker's back); schedule() again creates it.
create or replace function queue_worker.list_schedules(schedule_name text default null)
returns table (
  name text,
  cron text,
  queue_name text,
  job jsonb,
  jobid bigint,
  active boolean,
  last_status text,
  last_started_at timestamptz,
  last_finished_at timestamptz,
  last_message text,
  created_at timestamptz,
  updated_at timestamptz
)
language plpgsql
stable
security definer
set search_path = ''
as $$
begin
  if (select c.usable from queue_worker.cron_status() c) then
    return query
      select s.name, s.cron, s.queue_name, s.job, j.jobid, j.active,
             d.status, d.start_time, d.end_time, d.return_message,
             s.created_at, s.updated_at
        from queue_worker.schedules s
        left join cron.job j
          on j.jobname = 'queue_worker:' || s.name and j.username = current_user
        left join lateral (
          select r.status, r.start_time, r.end_time, r.return_message
            from cron.job_run_details r
           where r.jobid = j.jobid
           order by r.runid desc
           limit 1) d on true
       where list_schedules.schedule_name is null or s.name = list_schedules.schedule_name
       order by s.name;
  else
    return query
      select s.name, s.cron, s.queue_name, s.job, null::bigint, null::boolean,
             null::text, null::timestamptz, null::timestamptz, null::text,
             s.created_at, s.updated_at
        from queue_worker.schedules s
       where list_schedules.schedule_name is null or s.name = list_schedules.schedule_name
       order by s.name;
  end if;
end
$$;
comment on function queue_worker.list_schedules(text) is
  'Schedules (all, or the one named) with their pg_cron job id, active flag and last run (status, start, end, message). Callable by service_role.';

revoke all on function
  queue_worker.cron_status(),
  queue_worker.cron_expression(text, boolean),
  queue_worker.run_schedule(text),
  queue_worker.schedule(text, text, text, jsonb),
  queue_worker.unschedule(text),
  queue_worker.list_schedules(text)
from public, anon, authenticated, service_role;
grant execute on function
  queue_worker.cron_status(),
  queue_worker.schedule(text, text, text, jsonb),
  queue_worker.unschedule(text),
  queue_worker.list_schedules(text)
to service_role;

select queue_worker.record_migration('20261201006000_schedules');
