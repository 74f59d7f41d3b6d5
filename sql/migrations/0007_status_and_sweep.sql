-- mcp_status and mcp_status_sweep: reading the caller's MCP servers with their toolbox and
-- recent history in one round trip, and the scheduled sweep that keeps stored state honest when
-- agents go silent. (A direct DTMA read is applied by cp_refresh_from_dtma, in 0005.)
--
-- Time is always the database's now(): ages and deadlines are computed
-- here, never from a function instance's clock.

-- ---------------------------------------------------------------------------------------------
-- Small helpers
-- ---------------------------------------------------------------------------------------------

-- "10 min" for whole minutes, "90 s" otherwise: deadline messages quote the configured value in
-- the unit an operator would have typed.
create or replace function cp_private.cp_duration_text(p_seconds numeric)
returns text
language sql immutable
set search_path = ''
as $$
  select case when p_seconds >= 60 and p_seconds % 60 = 0 then (p_seconds / 60)::bigint || ' min'
              else floor(p_seconds)::bigint || ' s' end
$$;

-- ---------------------------------------------------------------------------------------------
-- mcp_status: the caller's MCP servers, one statement.
--
-- Each item carries the instance columns the API renders, its toolbox (with the heartbeat age
-- computed with the database clock) and its last 5 events (newest first from the
-- (account_tool_instance_id, id desc) index, returned oldest first). Only mcp_server_type =
-- 'mcp_server' rows of toolboxes owned by p_user_id are visible.
--
-- Order: (created_at, id) ascending. New servers sort after every existing one, so a client
-- paging through while servers are being deployed sees no duplicates and no gaps.
-- Cursor (keyset): {"created_at": "<timestamptz as jsonb renders it>", "id": "<uuid>"} of the last
-- item of the previous page; next_cursor is null on the last page. The API hands it to clients
-- as an opaque base64url string.
-- p_id given: that one server (other filters and the cursor are ignored), or MC404 when it does
-- not exist or is not the caller's (the same answer, so ids of other users do not leak).
-- ---------------------------------------------------------------------------------------------
create or replace function public.cp_list_mcp_servers(
  p_user_id uuid,
  p_id uuid default null,
  p_toolbox_id uuid default null,
  p_status text default null,
  p_limit int default 50,
  p_cursor jsonb default null
) returns jsonb
language plpgsql stable
security definer
set search_path = ''
as $$
declare
  v_limit int := least(greatest(coalesce(p_limit, 50), 1), 100);
  v_after_created timestamptz := (p_cursor->>'created_at')::timestamptz;
  v_after_id uuid := (p_cursor->>'id')::uuid;
  v_result jsonb;
begin
  with page as (
    select i.*, row_number() over (order by i.created_at, i.id) as ord
      from public.account_tool_instances i
      join public.account_tool_environments e on e.id = i.account_tool_environment_id
     where e.user_id = p_user_id
       and i.mcp_server_type = 'mcp_server'
       and (p_id is null or i.id = p_id)
       and (p_id is not null or p_toolbox_id is null or i.account_tool_environment_id = p_toolbox_id)
       and (p_id is not null or p_status is null or i.status_on_toolbox::text = p_status)
       and (p_id is not null or v_after_id is null or (i.created_at, i.id) > (v_after_created, v_after_id))
     order by i.created_at, i.id
     limit v_limit + 1
  )
  select jsonb_build_object(
           'items', coalesce(jsonb_agg(x.item order by x.ord) filter (where x.ord <= v_limit), '[]'::jsonb),
           'next_cursor', case when count(*) > v_limit
                               then (array_agg(x.cursor order by x.ord desc) filter (where x.ord <= v_limit))[1]
                          end,
           'now', now())
    into v_result
    from (
      select p.ord,
             jsonb_build_object('created_at', p.created_at, 'id', p.id) as cursor,
             jsonb_build_object(
               'id', p.id,
               'name', p.instance_name_on_toolbox,
               'status', p.status_on_toolbox,
               'status_changed_at', p.status_changed_at,
               'status_age_seconds', extract(epoch from now() - p.status_changed_at),
               'error_message', p.instance_error_message,
               'image', p.docker_image_url,
               'host_port', p.host_port,
               'container_port', p.container_port,
               'port_mapping', p.port_mapping_json,
               'container_id', p.container_id,
               'endpoint_path', p.mcp_endpoint_path,
               'transport', p.mcp_transport_type,
               'capabilities', p.mcp_server_capabilities,
               'discovery_metadata', p.mcp_discovery_metadata,
               'runtime', p.runtime_details,
               'last_report_at', p.last_heartbeat_from_dtma,
               'agent_unmanaged_at', p.agent_unmanaged_at,
               'created_at', p.created_at,
               'updated_at', p.updated_at,
               'toolbox', jsonb_build_object(
                 'id', e.id, 'name', e.name, 'region_slug', e.region_slug, 'status', e.status,
                 'public_ip_address', host(e.public_ip_address), 'dtma_port', e.dtma_port,
                 'dtma_key_version', e.dtma_key_version, 'last_heartbeat_at', e.last_heartbeat_at,
                 'heartbeat_age_seconds', extract(epoch from now() - e.last_heartbeat_at),
                 'provisioning_error_message', e.provisioning_error_message,
                 'dtma_last_reached_at', e.dtma_last_reached_at,
                 'reached_age_seconds', extract(epoch from now() - e.dtma_last_reached_at),
                 'docker_error', case when e.dtma_report_details_json->'docker'->>'healthy' = 'false'
                                      then coalesce(e.dtma_report_details_json->'docker'->>'error', 'unknown error')
                                 end),
               'events', coalesce(ev.events, '[]'::jsonb)) as item
        from page p
        join public.account_tool_environments e on e.id = p.account_tool_environment_id
        left join lateral (
          select jsonb_agg(jsonb_build_object('at', l.at, 'from', l.from_status, 'to', l.to_status,
                                              'message', l.message, 'source', l.source) order by l.id) as events
            from (select * from public.account_tool_instance_events ev
                   where ev.account_tool_instance_id = p.id
                   order by ev.id desc
                   limit 5) l
        ) ev on true
    ) x;

  if p_id is not null and jsonb_array_length(v_result->'items') = 0 then
    perform cp_private.cp_raise('MC404', 'MCP server not found', jsonb_build_object('id', p_id));
  end if;
  return v_result;
end
$$;

-- ---------------------------------------------------------------------------------------------
-- mcp_status_sweep: one pass, bounded, idempotent, safe when two run at once.
--
-- 1. Active toolboxes silent for longer than p_stale_after_seconds become `unresponsive`, with an
--    event on each of their instances. The instances' stored status is kept, so recovery (the
--    next heartbeat, cp_ingest_heartbeat) is exact. mcp_status shows them `unknown` from the
--    heartbeat age alone, whether or not a sweep has run: this step records, it does not decide
--    what users see.
-- 2. Toolboxes `awaiting_heartbeat` longer than the first-contact grace become
--    `error_provisioning`, with the reason in provisioning_error_message.
-- 3. Instances past their deadline in a transitional status become `error` (through
--    cp_apply_instance_transition, source 'sweep') with a message naming what never happened.
--    A deadline verdict needs a report to stand on: instances on a toolbox we have not heard
--    from within p_stale_after_seconds are left alone (staleness is not failure; they read as
--    unknown and the first heartbeat after recovery settles them or lets the next sweep fail
--    them). pending_deploy never reached the toolbox, so it has no such condition.
--
-- The guard (Kubernetes' rule for a zone whose nodes all go silent): when the toolboxes going silent are more
-- than p_guard_fraction of the active fleet, the likelier cause is our ingest path (or the
-- network in front of it), not the droplets. Then steps 1 and 2, the verdicts that rest on "no
-- heartbeat arrived", mark nothing, and the answer says guard_tripped. Step 3 carries on: it
-- only fails instances on toolboxes whose heartbeats do arrive, and an ingest outage leaves none.
--   silent  = active toolboxes silent beyond the threshold now (whatever the batch size),
--   recent  = toolboxes marked unresponsive within the last p_stale_after_seconds (an outage
--             that spreads over several sweeps still adds up instead of being marked piecemeal),
--   trips when silent > 0 and silent + recent >= p_guard_min_toolboxes
--              and silent + recent > p_guard_fraction * (active + recent).
--   p_guard_min_toolboxes (default 3): in a fleet of one or two toolboxes any silence is "more
--   than half", and the likeliest cause of one droplet going quiet is that droplet. A fraction
--   means something once several independent toolboxes fall silent together.
--
-- Concurrency: every change picks its rows with FOR (NO KEY) UPDATE SKIP LOCKED, and every predicate is
-- re-checked on the locked row version, so two sweeps at once split the work and change each
-- row once; a heartbeat holding a toolbox's lock is simply skipped (it is proof of life).
-- Each kind of change is bounded by p_batch_size; `more` says a kind hit it (run again).
-- ---------------------------------------------------------------------------------------------
create or replace function public.cp_sweep(
  p_stale_after_seconds int,
  p_first_contact_grace_seconds int,
  p_deploy_deadline_seconds int,
  p_action_deadline_seconds int,
  p_batch_size int,
  p_guard_fraction float8,
  p_guard_min_toolboxes int default 3
) returns jsonb
language plpgsql
security definer
set search_path = ''
as $$
declare
  v_stale interval := make_interval(secs => p_stale_after_seconds);
  v_silent_before timestamptz := now() - make_interval(secs => p_stale_after_seconds);
  v_active int;
  v_silent int;
  v_recent int;
  v_tripped boolean;
  v_marked int := 0;
  v_events int := 0;
  v_first_contact int := 0;
  v_deadlines jsonb := '{}';
  v_failed int := 0;
  v_row record;
  v_box public.account_tool_environments;
  v_inst public.account_tool_instances;
begin
  if p_batch_size < 1 or p_guard_fraction <= 0 or p_guard_fraction > 1 or p_stale_after_seconds < 1 then
    perform cp_private.cp_raise('MC400', 'sweep parameters out of range',
                            jsonb_build_object('batch_size', p_batch_size, 'guard_fraction', p_guard_fraction,
                                               'stale_after_seconds', p_stale_after_seconds));
  end if;

  select count(*) into v_active from public.account_tool_environments where status = 'active';
  select count(*) into v_silent from public.account_tool_environments
   where status = 'active'
     and (last_heartbeat_at < v_silent_before
          or (last_heartbeat_at is null and status_changed_at < v_silent_before));
  select count(*) into v_recent from public.account_tool_environments
   where status = 'unresponsive' and status_changed_at >= now() - v_stale;
  v_tripped := v_silent > 0 and v_silent + v_recent >= p_guard_min_toolboxes
               and (v_silent + v_recent) > p_guard_fraction * (v_active + v_recent);

  if not v_tripped then
    -- 1. silent toolboxes -> unresponsive, one event per instance (through cp_append_event)
    for v_box in
      select e.* from public.account_tool_environments e
       where e.status = 'active'
         and (e.last_heartbeat_at < v_silent_before
              or (e.last_heartbeat_at is null and e.status_changed_at < v_silent_before))
       order by e.last_heartbeat_at nulls first, e.id
       limit p_batch_size
         for no key update skip locked
    loop
      update public.account_tool_environments set status = 'unresponsive', status_changed_at = now()
       where id = v_box.id;
      v_marked := v_marked + 1;
      for v_inst in select * from public.account_tool_instances i where i.account_tool_environment_id = v_box.id
      loop
        perform cp_private.cp_append_event(v_inst, v_inst.status_on_toolbox, v_inst.status_on_toolbox, 'sweep',
          format('toolbox %s silent for %s s; status unknown until it reports again', coalesce(v_box.name, v_box.id::text),
                 floor(extract(epoch from now() - coalesce(v_box.last_heartbeat_at, v_box.status_changed_at)))::bigint));
        v_events := v_events + 1;
      end loop;
    end loop;

    -- 2. never made first contact -> error_provisioning
    with picked as (
      select e.id from public.account_tool_environments e
       where e.status = 'awaiting_heartbeat'
         and e.status_changed_at < now() - make_interval(secs => p_first_contact_grace_seconds)
       order by e.status_changed_at, e.id
       limit p_batch_size
       for no key update skip locked
    ), failed as (
      update public.account_tool_environments e
         set status = 'error_provisioning', status_changed_at = now(),
             provisioning_error_message = format(
               'the toolbox agent sent no heartbeat within %s of provisioning; check that the droplet '
               'booted, that cloud-init installed and started the DTMA (/var/log/cloud-init-output.log), '
               'and that the droplet can reach the backend',
               cp_private.cp_duration_text(p_first_contact_grace_seconds))
        from picked
       where e.id = picked.id
      returning 1
    )
    select count(*) into v_first_contact from failed;
  end if;

  -- 3. deadlines
  for v_row in
    select i as inst, i.status_on_toolbox::text as status
      from public.account_tool_instances i
      join public.account_tool_environments e on e.id = i.account_tool_environment_id
     where i.status_on_toolbox in ('pending_deploy', 'deploying', 'starting', 'stopping', 'deleting')
       and i.status_changed_at < now() - make_interval(secs => least(p_deploy_deadline_seconds,
                                                                      p_action_deadline_seconds))
       and ((i.status_on_toolbox = 'pending_deploy'
            and i.status_changed_at < now() - make_interval(secs => p_deploy_deadline_seconds))
        or (i.status_on_toolbox = 'deploying'
            and i.status_changed_at < now() - make_interval(secs => p_deploy_deadline_seconds)
            and e.status = 'active' and e.last_heartbeat_at >= v_silent_before)
        or (i.status_on_toolbox in ('starting', 'stopping', 'deleting')
            and i.status_changed_at < now() - make_interval(secs => p_action_deadline_seconds)
            and e.status = 'active' and e.last_heartbeat_at >= v_silent_before))
     order by i.status_changed_at, i.id
     limit p_batch_size
       for update of i skip locked
  loop
    perform cp_private.cp_apply_instance_transition(
      v_row.inst, 'error', 'sweep',
      case v_row.status
        when 'pending_deploy' then format(
          'deploy of %s was recorded but never sent to the toolbox within %s; deploy it again',
          (v_row.inst).instance_name_on_toolbox, cp_private.cp_duration_text(p_deploy_deadline_seconds))
        when 'deploying' then format(
          'no heartbeat reported container %s running within %s of the deploy; check the image and '
          'its logs on the toolbox, then deploy again',
          (v_row.inst).instance_name_on_toolbox, cp_private.cp_duration_text(p_deploy_deadline_seconds))
        when 'starting' then format('no report confirmed container %s started within %s',
          (v_row.inst).instance_name_on_toolbox, cp_private.cp_duration_text(p_action_deadline_seconds))
        when 'stopping' then format('no report confirmed container %s stopped within %s',
          (v_row.inst).instance_name_on_toolbox, cp_private.cp_duration_text(p_action_deadline_seconds))
        else format('the toolbox never confirmed container %s was removed within %s; remove it again',
          (v_row.inst).instance_name_on_toolbox, cp_private.cp_duration_text(p_action_deadline_seconds))
      end);
    v_deadlines := jsonb_set(v_deadlines, array[v_row.status],
                             to_jsonb(coalesce((v_deadlines->>v_row.status)::int, 0) + 1));
    v_failed := v_failed + 1;
  end loop;

  return jsonb_build_object(
    'guard_tripped', v_tripped,
    'active_toolboxes', v_active,
    'silent_toolboxes', v_silent,
    'recently_unresponsive', v_recent,
    'marked_unresponsive', v_marked,
    'instance_events', v_events,
    'first_contact_failed', v_first_contact,
    'deadlines_failed', v_failed,
    'deadlines', v_deadlines,
    'more', v_marked >= p_batch_size or v_first_contact >= p_batch_size or v_failed >= p_batch_size);
end
$$;

select cp_private.restrict_function_privileges();
