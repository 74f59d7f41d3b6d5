-- Operations: the figures an operator reads (deploy success, time to running, agent latency,
-- heartbeat lateness) in one round trip, and the retention that keeps the history tables bounded.
--
-- cp_operations_report reads what the other tables already record: the instance events (a deploy
-- is the event `null -> pending_deploy` that cp_record_deploy writes; its outcome is the event
-- that takes the instance out of `deploying`), the deploy's command (its
-- outcome `code` says why a deploy failed) and every command's `outcome->'agent_calls'` (each DTMA
-- call the command made), which a trigger copies into a narrow table when the command finishes.
-- docs/operations.md describes the figures; the definitions are in the comment above the function.
--
-- cp_prune_history deletes events, finished commands and agent calls older than their retention,
-- in bounded batches, keeping the newest events of every existing server; the sweep calls it
-- every minute (shared/usecases/sweep.py; settings EVENTS_RETENTION_DAYS, EVENTS_KEEP_PER_SERVER,
-- COMMANDS_RETENTION_DAYS, RETENTION_BATCH_SIZE).
--
-- Two tables here are internal bookkeeping, not data any API role reads: they live in cp_private
-- (which PostgREST does not expose and no API role may use), next to the functions that write
-- them, so they are not part of the public surface at all.

-- ---------------------------------------------------------------------------------------------
-- Indexes on the history tables
-- ---------------------------------------------------------------------------------------------

-- Deploys recorded in a window: the `null -> pending_deploy` event cp_record_deploy writes, one per
-- deploy (each deploy is a new instance). Covering (events are never updated, so the visibility
-- map stays set and the report reads the index alone). One entry per deploy.
create index idx_atie_deploy_recorded on public.account_tool_instance_events (at)
  include (account_tool_instance_id, account_tool_environment_id, message)
  where from_status is null and to_status = 'pending_deploy';
-- How each deploy ended: the one event that took its instance out of `deploying` (to running or
-- error; a recorded deploy is `deploying` from the start, cp_record_deploy moves it there in the
-- same transaction, and nothing moves an instance back there), by time: a deploy recorded in a
-- window settles in it or later, so the window's outcomes are one range scan, joined to its
-- deploys by instance. Covering; one entry per settled deploy.
create index idx_atie_deploy_settled on public.account_tool_instance_events (at)
  include (account_tool_instance_id, to_status, source)
  where from_status = 'deploying' and to_status <> 'deploying';
-- Retention walks the events oldest first, resuming where its previous batch stopped (at, id).
create index idx_atie_at on public.account_tool_instance_events (at, id);
-- Retention of finished commands, oldest first (finished_at is set exactly when a command ends:
-- done, failed or superseded).
create index idx_dtma_commands_finished on public.dtma_commands (finished_at)
  where finished_at is not null;

-- ---------------------------------------------------------------------------------------------
-- Agent calls: one row per element of a finished command's `outcome->'agent_calls'`
-- ({"op", "ms", "result", "status"}: every DTMA call the command made), copied by a trigger when
-- the command's outcome is recorded. Reading latency percentiles straight out of the commands'
-- jsonb costs a detoast and a parse per command at every report (tens of ms per 10k commands);
-- this table is what an index on those elements would be. `at` is the command's finished_at.
-- The rows go with their command (retention, or the toolbox's removal).
-- ---------------------------------------------------------------------------------------------
create table cp_private.agent_calls (
  id bigint generated always as identity primary key,
  command_id uuid not null references public.dtma_commands (id) on delete cascade,
  at timestamptz not null,
  -- Position in the command's array: 0 marks each command once (the report counts commands).
  n integer not null,
  op text not null collate "C",
  ms float8,
  -- The call's `result`: ok, rejected, unreachable, timeout, bad_response (shared/usecases/commands.py).
  result text not null,
  ok boolean not null generated always as (result = 'ok') stored
);
revoke all on cp_private.agent_calls from public;
-- The report: per op (distinct ops found by skipping through the index), the window's calls; and
-- the failed ones by result (a small index: failures are the exception).
create index idx_agent_calls_op_at on cp_private.agent_calls (op, at) include (ms, ok, n);
create index idx_agent_calls_failed on cp_private.agent_calls (at) include (op, result) where not ok;
-- The cascade from a deleted command.
create index idx_agent_calls_command on cp_private.agent_calls (command_id);

-- Never lets a malformed array fail the command's finish: elements that are not objects with a
-- string `op` are skipped, `ms` is kept only when it is a number, and any other error is a
-- warning (the command's outcome is recorded; only these figures miss it). The commands are
-- written by the RPCs (as their owner, who may write here); a write by an API role directly would
-- only lose its calls, with that warning.
create or replace function cp_private.record_agent_calls() returns trigger
language plpgsql
set search_path = ''
as $$
begin
  begin
    insert into cp_private.agent_calls (command_id, at, n, op, ms, result)
    select new.id, new.finished_at, (e.ord - 1)::int, left(e.value->>'op', 64),
           case when jsonb_typeof(e.value->'ms') = 'number'
                then greatest(least((e.value->>'ms')::numeric, 1e12), -1e12)::float8 end,
           left(coalesce(e.value->>'result', 'unknown'), 32)
      from jsonb_array_elements(new.outcome->'agent_calls') with ordinality e(value, ord)
     where jsonb_typeof(e.value) = 'object' and jsonb_typeof(e.value->'op') = 'string';
  exception when others then
    raise warning 'agent calls of command % not recorded for the operations report: %', new.id, sqlerrm;
  end;
  return null;
end
$$;
-- A command's outcome is recorded once, when it finishes (cp_finish_command); rows inserted
-- already finished (imports, tests) count too.
create trigger dtma_commands_agent_calls_on_finish after update on public.dtma_commands
  for each row when (old.finished_at is null and new.finished_at is not null
                     and jsonb_typeof(new.outcome->'agent_calls') = 'array')
  execute function cp_private.record_agent_calls();
create trigger dtma_commands_agent_calls_on_insert after insert on public.dtma_commands
  for each row when (new.finished_at is not null and jsonb_typeof(new.outcome->'agent_calls') = 'array')
  execute function cp_private.record_agent_calls();

-- Commands that finished before this migration (none on a fresh database).
insert into cp_private.agent_calls (command_id, at, n, op, ms, result)
select c.id, c.finished_at, (e.ord - 1)::int, left(e.value->>'op', 64),
       case when jsonb_typeof(e.value->'ms') = 'number'
            then greatest(least((e.value->>'ms')::numeric, 1e12), -1e12)::float8 end,
       left(coalesce(e.value->>'result', 'unknown'), 32)
  from public.dtma_commands c
 cross join lateral jsonb_array_elements(c.outcome->'agent_calls') with ordinality e(value, ord)
 where c.finished_at is not null and jsonb_typeof(c.outcome->'agent_calls') = 'array'
   and jsonb_typeof(e.value) = 'object' and jsonb_typeof(e.value->'op') = 'string';

-- ---------------------------------------------------------------------------------------------
-- cp_operations_report(p_since, p_until, p_bucket_seconds, p_stale_after_seconds): one jsonb,
-- one statement.
--
-- Window: [p_since, p_until); p_until null = now(), p_since null = p_until - 24 h. At most 1,000
-- buckets of p_bucket_seconds (MC400 otherwise).
--
-- Deploys (the cohort of the window: the deploys *recorded* in it, however late they settled, as
-- far as the history up to p_until tells):
--   started      `null -> pending_deploy` events in the window (a request refused up front,
--                e.g. 409 toolbox not active or name taken, never became a deploy);
--   succeeded    the event that took the instance out of `deploying`, before p_until, went to
--                `running` (whoever saw it: the agent's answer, a heartbeat, a status read);
--   failed       it went to `error`;
--   in_progress  no such move before p_until (still deploying, or settled after p_until);
--   success_rate succeeded / (succeeded + failed), 4 decimals; null when nothing settled;
--   failures_by_reason {reason: count}: `deadline` when the sweep failed it (deploying past
--                DEPLOY_DEADLINE_SECONDS); else the failure `code` of the deploy
--                command's outcome (image_pull_failed, container_exited, host_port_taken,
--                name_taken, conflict, toolbox_unreachable, toolbox_key_rejected, docker_down,
--                toolbox_failed, toolbox_address_refused, sealed_env_unreadable, ...); else
--                `container_failed` when a heartbeat or status read saw the container fail
--                before it ran (the agent's answer had not said so); else `unknown`;
--   time_to_running {count, p50_seconds, p95_seconds, max_seconds}: from the deploy's record to
--                its `running` event, over the succeeded deploys; percentile_cont, 3 decimals;
--   top_failing_images / top_failing_toolboxes: the 5 with most failed deploys (ties: most
--                started, then image / toolbox id), each with its failed and started counts.
-- Agent calls: the calls of the commands that finished in the window, per `op`: count, errors
--   (result other than `ok`), errors_by_result ({result: count} of those, e.g. timeout,
--   unreachable, rejected, bad_response), p50_ms, p95_ms, max_ms over all its calls with a
--   numeric `ms` (what the worker waited, whatever the answer; percentile_cont, 1 decimal).
--   `commands`: how many commands contributed. A command without the array contributes nothing;
--   DTMA reads outside commands (mcp_status?refresh=true) are not in it.
-- Toolboxes (now, not the window): counts by liveness and, over `active` toolboxes that have
--   sent a heartbeat, the seconds since it (p50 and p95 as percentile_disc: a real toolbox's age;
--   max; 1 decimal); `late` are active toolboxes silent for longer than p_stale_after_seconds (the
--   sweep's threshold: its next pass marks them unresponsive).
-- Series: one item per bucket from p_since, the deploys by the bucket they were recorded in
--   (started, succeeded, failed, in_progress, p50_time_to_running_seconds or null); the buckets
--   add up to the totals.
-- ---------------------------------------------------------------------------------------------
create or replace function public.cp_operations_report(
  p_since timestamptz default null,
  p_until timestamptz default null,
  p_bucket_seconds int default 3600,
  p_stale_after_seconds int default 210
) returns jsonb
language plpgsql stable
security definer
set search_path = ''
as $$
declare
  v_until timestamptz := coalesce(p_until, now());
  v_since timestamptz := coalesce(p_since, coalesce(p_until, now()) - interval '24 hours');
  v_buckets int;
  v_late_before timestamptz := now() - make_interval(secs => p_stale_after_seconds);
  v_result jsonb;
begin
  if p_bucket_seconds is null or p_bucket_seconds < 1 or v_since >= v_until
     or p_stale_after_seconds is null or p_stale_after_seconds < 1 then
    perform cp_private.cp_raise('MC400', 'report window out of range: since must be before until, and '
                                         'bucket_seconds and stale_after_seconds at least 1',
      jsonb_build_object('since', v_since, 'until', v_until, 'bucket_seconds', p_bucket_seconds,
                         'stale_after_seconds', p_stale_after_seconds));
  end if;
  v_buckets := ceil(date_part('epoch', v_until - v_since) / p_bucket_seconds)::int;
  if v_buckets > 1000 then
    perform cp_private.cp_raise('MC400', format('%s buckets asked for; at most 1000: widen bucket_seconds',
                                                v_buckets),
      jsonb_build_object('buckets', v_buckets, 'bucket_seconds', p_bucket_seconds));
  end if;

  with settled as (
    -- At most one per instance: nothing moves an instance back into deploying.
    select s.account_tool_instance_id, s.to_status, s.source, s.at
      from public.account_tool_instance_events s
     where s.from_status = 'deploying' and s.to_status <> 'deploying'
       and s.at >= v_since and s.at < v_until
  ), deploys as materialized (
    select d.account_tool_instance_id as instance_id,
           d.account_tool_environment_id as toolbox_id,
           d.at as started_at,
           floor(date_part('epoch', d.at - v_since) / p_bucket_seconds)::int as bucket,
           -- cp_record_deploy writes 'deploy of <image> requested' (the instance row may be gone).
           case when d.message like 'deploy of % requested'
                then substr(d.message, 11, length(d.message) - 20) end as image,
           s.to_status as settled_to,
           s.source as settled_by,
           s.at as settled_at
      from public.account_tool_instance_events d
      left join settled s on s.account_tool_instance_id = d.account_tool_instance_id
     where d.from_status is null and d.to_status = 'pending_deploy'
       and d.at >= v_since and d.at < v_until
  ), outcomes as materialized (
    select d.instance_id, d.toolbox_id, d.bucket,
           case d.settled_to when 'running' then 'succeeded' when 'error' then 'failed' else 'in_progress' end
             as outcome,
           case when d.settled_to = 'running' then date_part('epoch', d.settled_at - d.started_at) end as ttr,
           case when d.settled_to = 'error' then
             case when d.settled_by = 'sweep' then 'deadline'
                  else coalesce(
                    -- The deploy's command (one per instance) said why, unless it said nothing
                    -- conclusive (no answer in time: `accepted`).
                    nullif(nullif(nullif(
                      (select c.outcome->>'code' from public.dtma_commands c
                        where c.account_tool_instance_id = d.instance_id and c.action = 'deploy'
                        order by c.seq limit 1),
                      'created'), 'accepted'), 'done'),
                    case when d.settled_by in ('heartbeat', 'dtma') then 'container_failed' else 'unknown' end)
             end
           end as reason,
           coalesce(d.image,
                    (select i.docker_image_url from public.account_tool_instances i where i.id = d.instance_id),
                    'unknown') as image
      from deploys d
  ), ops as (
    -- The distinct ops, one index probe each (a loose index scan).
    with recursive found(op) as (
      (select a.op from cp_private.agent_calls a order by a.op limit 1)
      union all
      select (select a.op from cp_private.agent_calls a where a.op > f.op order by a.op limit 1)
        from found f where f.op is not null
    )
    select op from found where op is not null
  ), failed_calls as (
    select f.op, jsonb_object_agg(f.result, f.n) as by_result
      from (select a.op, a.result, count(*) as n from cp_private.agent_calls a
             where not a.ok and a.at >= v_since and a.at < v_until
             group by a.op, a.result) f
     group by f.op
  ), calls as (
    select o.op, x.*, coalesce(f.by_result, '{}'::jsonb) as by_result
      from ops o
     cross join lateral (
       select count(*) as n,
              count(*) filter (where a.n = 0) as commands,
              count(*) filter (where not a.ok) as errors,
              percentile_cont(array[0.5, 0.95]) within group (order by a.ms) as p,
              max(a.ms) as max_ms
         from cp_private.agent_calls a
        where a.op = o.op and a.at >= v_since and a.at < v_until
     ) x
      left join failed_calls f on f.op = o.op
     where x.n > 0
  ), boxes as (
    -- Ages as percentile_disc over the heartbeat times themselves (newest first): a real toolbox's
    -- age, no interpolation, and no interval computed per row.
    select count(*) filter (where e.status = 'active') as active,
           count(*) filter (where e.status = 'unresponsive') as unresponsive,
           count(*) filter (where e.status = 'awaiting_heartbeat') as awaiting_first_heartbeat,
           count(*) filter (where e.status = 'active'
                              and coalesce(e.last_heartbeat_at, e.status_changed_at) < v_late_before) as late,
           percentile_disc(array[0.5, 0.95]) within group (order by e.last_heartbeat_at desc)
             filter (where e.status = 'active' and e.last_heartbeat_at is not null) as beat,
           min(e.last_heartbeat_at) filter (where e.status = 'active') as oldest
      from public.account_tool_environments e
  )
  select jsonb_build_object(
    'window', jsonb_build_object('since', v_since, 'until', v_until, 'bucket_seconds', p_bucket_seconds,
                                 'generated_at', now()),
    'deploys', (
      select jsonb_build_object(
               'started', count(*),
               'succeeded', count(*) filter (where o.outcome = 'succeeded'),
               'failed', count(*) filter (where o.outcome = 'failed'),
               'in_progress', count(*) filter (where o.outcome = 'in_progress'),
               'success_rate', round((count(*) filter (where o.outcome = 'succeeded'))::numeric
                                     / nullif(count(*) filter (where o.outcome <> 'in_progress'), 0), 4),
               'failures_by_reason', coalesce((
                 select jsonb_object_agg(r.reason, r.n)
                   from (select reason, count(*) as n from outcomes where reason is not null group by reason) r),
                 '{}'::jsonb),
               'time_to_running', (
                 select jsonb_build_object(
                          'count', count(t.ttr),
                          'p50_seconds', round((percentile_cont(0.5) within group (order by t.ttr))::numeric, 3),
                          'p95_seconds', round((percentile_cont(0.95) within group (order by t.ttr))::numeric, 3),
                          'max_seconds', round(max(t.ttr)::numeric, 3))
                   from outcomes t where t.ttr is not null),
               'top_failing_images', coalesce((
                 select jsonb_agg(jsonb_build_object('image', x.image, 'failed', x.failed, 'started', x.started)
                                  order by x.failed desc, x.started desc, x.image)
                   from (select image, count(*) filter (where outcome = 'failed') as failed, count(*) as started
                           from outcomes group by image
                         having count(*) filter (where outcome = 'failed') > 0
                          order by 2 desc, 3 desc, 1 limit 5) x),
                 '[]'::jsonb),
               'top_failing_toolboxes', coalesce((
                 select jsonb_agg(jsonb_build_object('toolbox_id', x.toolbox_id, 'name', b.name,
                                                     'failed', x.failed, 'started', x.started)
                                  order by x.failed desc, x.started desc, x.toolbox_id)
                   from (select toolbox_id, count(*) filter (where outcome = 'failed') as failed,
                                count(*) as started
                           from outcomes group by toolbox_id
                         having count(*) filter (where outcome = 'failed') > 0
                          order by 2 desc, 3 desc, 1 limit 5) x
                   join public.account_tool_environments b on b.id = x.toolbox_id),
                 '[]'::jsonb))
        from outcomes o),
    'agent_calls', jsonb_build_object(
      'commands', (select coalesce(sum(c.commands), 0) from calls c),
      'by_operation', coalesce((
        select jsonb_object_agg(c.op, jsonb_build_object(
                 'count', c.n, 'errors', c.errors, 'errors_by_result', c.by_result,
                 'p50_ms', round(c.p[1]::numeric, 1), 'p95_ms', round(c.p[2]::numeric, 1),
                 'max_ms', round(c.max_ms::numeric, 1)))
          from calls c),
        '{}'::jsonb)),
    'toolboxes', (
      select jsonb_build_object(
               'active', b.active, 'unresponsive', b.unresponsive,
               'awaiting_first_heartbeat', b.awaiting_first_heartbeat, 'late', b.late,
               'stale_after_seconds', p_stale_after_seconds,
               'heartbeat_age_seconds', jsonb_build_object(
                 'p50', round(date_part('epoch', now() - b.beat[1])::numeric, 1),
                 'p95', round(date_part('epoch', now() - b.beat[2])::numeric, 1),
                 'max', round(date_part('epoch', now() - b.oldest)::numeric, 1)))
        from boxes b),
    'series', (
      select coalesce(jsonb_agg(jsonb_build_object(
               'start', v_since + make_interval(secs => n.bucket::float8 * p_bucket_seconds),
               'started', coalesce(s.started, 0), 'succeeded', coalesce(s.succeeded, 0),
               'failed', coalesce(s.failed, 0), 'in_progress', coalesce(s.in_progress, 0),
               'p50_time_to_running_seconds', s.p50) order by n.bucket), '[]'::jsonb)
        from generate_series(0, v_buckets - 1) n(bucket)
        left join (
          select o.bucket, count(*) as started,
                 count(*) filter (where o.outcome = 'succeeded') as succeeded,
                 count(*) filter (where o.outcome = 'failed') as failed,
                 count(*) filter (where o.outcome = 'in_progress') as in_progress,
                 round((percentile_cont(0.5) within group (order by o.ttr))::numeric, 3) as p50
            from outcomes o group by o.bucket
        ) s on s.bucket = n.bucket)
  ) into v_result;
  return v_result;
end
$$;

-- ---------------------------------------------------------------------------------------------
-- Retention
--
-- Where the events' walk stopped: (at, id) of the last event its previous batch examined. Events
-- that must stay (the newest p_keep of an existing server) are old too, and a stable fleet piles
-- them up at the old end; starting every batch from the oldest event would re-examine all of them
-- every minute. So each call examines the next p_batch_size old events after the cursor and moves
-- it on; when it reaches the retention cutoff, the next call starts over. Each call's work is
-- bounded, and every old event is looked at once per pass.
-- ---------------------------------------------------------------------------------------------
create table cp_private.retention_cursor (
  name text primary key check (name in ('events')),
  after_at timestamptz not null default '-infinity',
  after_id bigint not null default 0,
  passes bigint not null default 0
);
revoke all on cp_private.retention_cursor from public;
insert into cp_private.retention_cursor (name) values ('events');

-- cp_prune_history: one bounded batch of each kind. Deletes
--   * finished commands (done, failed, superseded) that finished more than
--     p_commands_retention_days ago, oldest first, at most p_batch_size (their agent calls in
--     cp_private.agent_calls go with them);
--   * of the next p_batch_size events older than p_events_retention_days (the walk above), those
--     whose server is gone, and those of an existing server that has at least
--     p_keep_events_per_instance newer events (by id, the order its timeline is read in): every
--     existing server keeps its newest p_keep_events_per_instance events, however old.
-- Deletes only: the events' append-only trigger guards UPDATE, not DELETE. Two calls at once:
-- commands are picked with SKIP LOCKED, the events walk runs in one of them (the other skips
-- it). Answers {events_deleted, events_examined, commands_deleted, more}: `more` when a batch was
-- full (the sweep simply calls again next minute).
-- Realtime subscribers of the events table are sent the deletes (the event id only).
create or replace function public.cp_prune_history(
  p_events_retention_days int,
  p_commands_retention_days int,
  p_keep_events_per_instance int,
  p_batch_size int
) returns jsonb
language plpgsql
security definer
set search_path = ''
as $$
declare
  v_events_before timestamptz;
  v_commands_before timestamptz;
  v_cursor cp_private.retention_cursor;
  v_examined int := 0;
  v_events int := 0;
  v_commands int := 0;
  v_last_at timestamptz;
  v_last_id bigint;
begin
  if p_events_retention_days is null or p_events_retention_days < 1
     or p_commands_retention_days is null or p_commands_retention_days < 1
     or p_keep_events_per_instance is null or p_keep_events_per_instance < 0
     or p_batch_size is null or p_batch_size < 1 or p_batch_size > 50000 then
    perform cp_private.cp_raise('MC400', 'retention parameters out of range',
      jsonb_build_object('events_retention_days', p_events_retention_days,
                         'commands_retention_days', p_commands_retention_days,
                         'keep_events_per_instance', p_keep_events_per_instance, 'batch_size', p_batch_size));
  end if;
  v_events_before := now() - make_interval(days => p_events_retention_days);
  v_commands_before := now() - make_interval(days => p_commands_retention_days);

  -- `= any(array(...))`: the batch's rows by primary key (a join with the picked ids is planned as a
  -- scan of the whole table).
  delete from public.dtma_commands c
   where c.id = any(array(
           select d.id from public.dtma_commands d
            where d.finished_at < v_commands_before and d.status in ('done', 'failed', 'superseded')
            order by d.finished_at
            limit p_batch_size
              for update skip locked));
  get diagnostics v_commands = row_count;

  select r.* into v_cursor from cp_private.retention_cursor r where r.name = 'events' for update skip locked;
  if found then
    with examined as materialized (
      select e.id, e.at, e.account_tool_instance_id
        from public.account_tool_instance_events e
       where e.at < v_events_before
         and (e.at, e.id) > (v_cursor.after_at, v_cursor.after_id)
       order by e.at, e.id
       limit p_batch_size
    ), deleted as (
      -- Per examined event, two index probes: its server's row (gone?), and its server's
      -- p_keep-th newest event.
      delete from public.account_tool_instance_events e
       where e.id = any(array(
               select x.id from examined x
                where p_keep_events_per_instance = 0
                   or (select i.id from public.account_tool_instances i where i.id = x.account_tool_instance_id) is null
                   or x.id < (select k.id from public.account_tool_instance_events k
                               where k.account_tool_instance_id = x.account_tool_instance_id
                               order by k.id desc
                               offset greatest(p_keep_events_per_instance - 1, 0) limit 1)))
      returning 1
    )
    select (select count(*) from examined),
           (select count(*) from deleted),
           (select x.at from examined x order by x.at desc, x.id desc limit 1),
           (select x.id from examined x order by x.at desc, x.id desc limit 1)
      into v_examined, v_events, v_last_at, v_last_id;
    if v_examined < p_batch_size then
      update cp_private.retention_cursor
         set after_at = '-infinity', after_id = 0, passes = passes + 1
       where name = 'events';
    else
      update cp_private.retention_cursor set after_at = v_last_at, after_id = v_last_id where name = 'events';
    end if;
  end if;

  return jsonb_build_object('events_deleted', v_events, 'events_examined', v_examined,
                            'commands_deleted', v_commands,
                            'more', v_commands >= p_batch_size or v_examined >= p_batch_size);
end
$$;

select cp_private.restrict_function_privileges();
