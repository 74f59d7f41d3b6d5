-- Heartbeat ingest: one call authenticates the agent, updates its toolbox, reconciles every
-- instance on it and writes the events, in one transaction (W23: the original made 1 + 1 + N
-- round trips and could write any instance of any toolbox, W1).
--
-- The caller (shared/usecases/heartbeat.py) has already parsed and validated the payload and turned each
-- item into an observation with a target status, so this function only matches and applies:
--
-- p_report = {
--   "dtma_version": text, "system_status": {...}, "boot_id": text|null, "seq": int|null,
--   "full_list": bool,        -- the container list is the whole truth (absences count)
--   "docker_error": text|null, -- the agent could not talk to Docker: change no instance
--   "extra": {...},            -- top-level fields we do not model, kept verbatim
--   "containers": [{"names": [text], "target": text|null, "message": text,
--                   "container_id": text, "runtime": {...}}],
--   "instances":  [{"id": uuid, "target": text|null, "message": text, "runtime": {...}|null}]
-- }
--
-- Concurrency: the toolbox row is locked first, so heartbeats of one toolbox apply one after the
-- other and heartbeats of different toolboxes never wait for each other. Every toolbox lock in
-- this schema is FOR NO KEY UPDATE: the inserts that reference a toolbox (events, commands) take
-- FOR KEY SHARE on it, which that does not block, so a heartbeat holding its toolbox while it
-- waits for an instance can never deadlock with an action holding that instance while it records
-- an event.
-- Time is the database's now(), never the agent's clock.
--
-- The matching itself (cp_reconcile_toolbox) is shared with mcp_status?refresh=true, which
-- applies a direct DTMA read (GET /tools/status) through the same rules.

-- ---------------------------------------------------------------------------------------------
-- Reconciliation, shared by the heartbeat and by mcp_status?refresh=true.
--
-- A direct DTMA read (GET /tools/status) goes through exactly the same matching and state
-- machine as a heartbeat. It touches INSTANCES only:
-- the toolbox row (last_heartbeat_at, boot/seq, status, report details) is the caller's business,
-- because only a heartbeat is a liveness signal. A read the backend initiated proves the backend
-- can reach the agent, not that the agent can reach the backend.
--
-- p_report has the shape documented above (containers / instances / full_list / docker_error).
-- p_source is 'heartbeat' or 'dtma'; it names the transitions' source (the state machine has rows
-- for both) and decides whether absences count:
--   * heartbeat: a container-format list is the full truth; a container missing from two
--     consecutive heartbeats (>= one interval apart) fails its instance;
--   * dtma: absences never count. A user can fire reads seconds apart, and two clicks on
--     "refresh" must not do what the two-heartbeat rule exists to prevent.
-- Each container observation may also carry:
--   created      unix seconds the container was created: a container binds an instance by name
--                only when it is the one this service created (the id the agent gave at deploy, or,
--                before we know an id, one created after the instance was recorded, with five
--                minutes of slack for the droplet's clock); the agent's own container, other
--                software and leftovers are never adopted
--   exited       Docker says `exited`: `message` is the sentence for a stop that was asked for
--                (the instance is `stopping` or `stopped`), `unexpected` the one for an exit
--                nobody asked for, which makes the instance an `error` (docs/real-agent.md)
--   exit_code    when the report carries it (heartbeats do; /tools/status does not): an error
--                report with a code replaces a vaguer error sentence
--   agent_instance_id  direct reads only: the instance id the agent associates with the
--                container, null when it does not manage it (`agent_unmanaged_at`)
-- Legacy statuses (cp_canonical_status) of the instances a report concerns are mapped first.
-- The caller must hold the toolbox row lock (FOR NO KEY UPDATE), which serialises all reconciliation of
-- one toolbox. Returns {matched, transitions, rejected, unmanaged: [...]}; unmanaged containers
-- carry their published ports, which deploys allocate around.
-- ---------------------------------------------------------------------------------------------
create or replace function cp_private.cp_reconcile_toolbox(p_toolbox_id uuid, p_report jsonb, p_source text)
returns jsonb
language plpgsql
set search_path = ''
as $$
declare
  v_source public.instance_event_source_enum;
  v_obs jsonb;
  v_rejected int;
  v_unmanaged jsonb;
  v_transitions int := 0;
  v_row public.account_tool_instances;
  v_obs_row record;
begin
  if p_source not in ('heartbeat', 'dtma') then
    perform cp_private.cp_raise('MC400', format('reports come from a heartbeat or a DTMA read, not %s', p_source));
  end if;
  v_source := p_source::public.instance_event_source_enum;

  -- Observations: one per instance of THIS toolbox that the report mentions. A container binds an
  -- instance by name only when it is the container this service created: the id the agent gave
  -- at deploy, or (before we know an id) one created after the instance was recorded, with five
  -- minutes of slack for the droplet's clock.
  select coalesce(jsonb_agg(o), '[]') into v_obs from (
    select * from (
      select distinct on (i.id) i.id as instance_id, c.ord, c.value->>'target' as target,
             c.value->>'message' as message, c.value->>'container_id' as container_id,
             c.value->'runtime' as runtime, coalesce((c.value->>'exited')::boolean, false) as exited,
             c.value->>'unexpected' as unexpected, (c.value->>'exit_code') is not null as has_exit_code,
             c.value ? 'agent_instance_id' as managed_known, c.value->>'agent_instance_id' as agent_instance_id
        from jsonb_array_elements(coalesce(p_report->'containers', '[]')) with ordinality c(value, ord)
        cross join lateral jsonb_array_elements_text(c.value->'names') n(name)
        join public.account_tool_instances i
          on i.account_tool_environment_id = p_toolbox_id and i.instance_name_on_toolbox = n.name
       where case when i.container_id is not null and coalesce(c.value->>'container_id', '') <> ''
                  then i.container_id = c.value->>'container_id'
                  else c.value->>'created' is null
                       or to_timestamp((c.value->>'created')::float8) >= i.created_at - interval '5 minutes'
             end
       order by i.id, c.ord
    ) by_name
    union all
    select i.id, null, x->>'target', x->>'message', null, x->'runtime', false, null, false, false, null
      from jsonb_array_elements(coalesce(p_report->'instances', '[]')) x
      join public.account_tool_instances i
        on i.id = (x->>'id')::uuid and i.account_tool_environment_id = p_toolbox_id
  ) o;

  -- W1: instance-format items naming an instance that is not on this toolbox change nothing.
  select count(*) into v_rejected
    from jsonb_array_elements(coalesce(p_report->'instances', '[]')) x
   where not exists (select 1 from public.account_tool_instances i
                     where i.id = (x->>'id')::uuid and i.account_tool_environment_id = p_toolbox_id);

  -- Containers bound to no instance: the agent itself, other software, leftovers of failed
  -- deploys. Their names and published ports are kept so deploys can avoid them.
  select coalesce(jsonb_agg(jsonb_build_object(
           'names', c.value->'names', 'image', c.value->'runtime'->'image',
           'state', c.value->'runtime'->'state', 'container_id', c.value->'container_id',
           'ports', coalesce((select jsonb_agg(p->'public_port')
                                from jsonb_array_elements(coalesce(c.value->'runtime'->'ports', '[]')) p
                               where jsonb_typeof(p->'public_port') = 'number'), '[]'))), '[]')
    into v_unmanaged
    from jsonb_array_elements(coalesce(p_report->'containers', '[]')) with ordinality c(value, ord)
   where not exists (select 1 from jsonb_to_recordset(v_obs) as o(ord bigint) where o.ord = c.ord);

  -- Legacy statuses of the instances this report concerns become statuses of the state machine
  -- (one event each), so the rules below apply to them like to any other instance.
  for v_row in
    select i.* from public.account_tool_instances i
     where i.id in (select o.instance_id from jsonb_to_recordset(v_obs) as o(instance_id uuid))
       and cp_private.cp_canonical_status(i.status_on_toolbox) <> i.status_on_toolbox
     order by i.id
       for update
  loop
    update public.account_tool_instances
       set status_on_toolbox = cp_private.cp_canonical_status(v_row.status_on_toolbox), status_changed_at = now()
     where id = v_row.id;
    perform cp_private.cp_append_event(v_row, v_row.status_on_toolbox, cp_private.cp_canonical_status(v_row.status_on_toolbox),
                                   v_source, format('legacy status %s is read as %s', v_row.status_on_toolbox,
                                                    cp_private.cp_canonical_status(v_row.status_on_toolbox)));
  end loop;

  -- What the report says about each container. A heartbeat stamps every instance it reports
  -- (last_heartbeat_from_dtma means exactly that); other fields are written when they changed
  -- (Docker's status text, "Up 5 minutes", changes every beat and is not worth a row write).
  update public.account_tool_instances i
     set runtime_details = coalesce(o.runtime, i.runtime_details),
         container_id = coalesce(o.container_id, i.container_id),
         last_heartbeat_from_dtma = case when v_source = 'heartbeat' then now() else i.last_heartbeat_from_dtma end,
         missing_heartbeats = 0
    from jsonb_to_recordset(v_obs) as o(instance_id uuid, container_id text, runtime jsonb)
   where i.id = o.instance_id
     and (v_source = 'heartbeat'
          or i.missing_heartbeats <> 0
          or i.container_id is distinct from coalesce(o.container_id, i.container_id)
          or (i.runtime_details - 'status') is distinct from (coalesce(o.runtime, i.runtime_details) - 'status'));

  -- Whether the agent still manages the container (direct reads only: heartbeats do not say).
  for v_obs_row in
    select i as inst, (o.agent_instance_id = i.id::text) as managed
      from jsonb_to_recordset(v_obs) as o(instance_id uuid, managed_known boolean, agent_instance_id text)
      join public.account_tool_instances i on i.id = o.instance_id
     where o.managed_known
       and (i.agent_unmanaged_at is null) = (o.agent_instance_id is distinct from i.id::text)
     order by i.id
       for update of i
  loop
    update public.account_tool_instances
       set agent_unmanaged_at = case when v_obs_row.managed then null else now() end
     where id = (v_obs_row.inst).id;
    perform cp_private.cp_append_event(v_obs_row.inst, (v_obs_row.inst).status_on_toolbox,
      (v_obs_row.inst).status_on_toolbox, v_source,
      case when v_obs_row.managed then format('the toolbox agent manages container %s again',
                                              (v_obs_row.inst).instance_name_on_toolbox)
           else format('the toolbox agent no longer manages container %s (it restarted and forgot it); it '
                       'cannot stop, start or remove it', (v_obs_row.inst).instance_name_on_toolbox) end);
  end loop;

  -- Status changes. An exit nobody asked for is an error; a stop that was asked for is a stop.
  for v_obs_row in
    select i as inst, x.target, x.message
      from (select o.instance_id,
                   case when o.exited and i0.status_on_toolbox not in ('stopping', 'stopped') then 'error'
                        else o.target end as target,
                   case when o.exited and i0.status_on_toolbox not in ('stopping', 'stopped') then o.unexpected
                        else o.message end as message,
                   o.has_exit_code
              from jsonb_to_recordset(v_obs) as o(instance_id uuid, target text, message text, exited boolean,
                                                  unexpected text, has_exit_code boolean)
              join public.account_tool_instances i0 on i0.id = o.instance_id) x
      join public.account_tool_instances i on i.id = x.instance_id
     where x.target is not null
       and ((i.status_on_toolbox::text <> x.target
             and exists (select 1 from public.instance_status_transitions t
                         where t.from_status = i.status_on_toolbox and t.to_status::text = x.target
                           and t.source = v_source))
            -- An error report with an exit code names the cause better than what we had.
            or (i.status_on_toolbox = 'error' and x.target = 'error' and x.has_exit_code
                and i.instance_error_message is distinct from x.message))
     order by i.id
       for update of i
  loop
    if (v_obs_row.inst).status_on_toolbox::text = v_obs_row.target then
      update public.account_tool_instances set instance_error_message = v_obs_row.message
       where id = (v_obs_row.inst).id;
      perform cp_private.cp_append_event(v_obs_row.inst, 'error', 'error', v_source, v_obs_row.message);
    else
      perform cp_private.cp_apply_instance_transition(
        v_obs_row.inst, v_obs_row.target::public.account_tool_installation_status_enum, v_source,
        v_obs_row.message);
    end if;
    v_transitions := v_transitions + 1;
  end loop;

  -- Level-triggered reconciliation (heartbeats only): a full container list that omits a
  -- container we expect to exist counts one miss; two consecutive misses make it an error (one
  -- miss can be a race with a deploy or a removal in flight).
  if v_source = 'heartbeat' and coalesce((p_report->>'full_list')::boolean, false)
     and p_report->>'docker_error' is null then
    update public.account_tool_instances i
       set missing_heartbeats = i.missing_heartbeats + 1
     where i.account_tool_environment_id = p_toolbox_id
       and i.status_on_toolbox in ('running', 'stopped')
       and not exists (select 1 from jsonb_to_recordset(v_obs) as o(instance_id uuid) where o.instance_id = i.id);
    for v_row in
      select * from public.account_tool_instances i
       where i.account_tool_environment_id = p_toolbox_id and i.missing_heartbeats >= 2
         and i.status_on_toolbox in ('running', 'stopped')
       order by i.id
         for update
    loop
      perform cp_private.cp_apply_instance_transition(
        v_row, 'error', 'heartbeat',
        format('container %s is no longer on the toolbox (missing from 2 consecutive heartbeats); remove '
               'this server and deploy it again', v_row.instance_name_on_toolbox));
      v_transitions := v_transitions + 1;
    end loop;
  end if;

  return jsonb_build_object('matched', jsonb_array_length(v_obs), 'transitions', v_transitions,
                            'rejected', v_rejected, 'unmanaged', v_unmanaged);
end
$$;

-- The heartbeat: lock the toolbox by its token, apply ordering, reconcile its instances, then
-- record the liveness signal on the toolbox row (the part a DTMA read must never do).
create or replace function public.cp_ingest_heartbeat(p_token_sha256 text, p_report jsonb)
returns jsonb
language plpgsql
security definer
set search_path = ''
as $$
declare
  v_box public.account_tool_environments;
  v_result jsonb;
  v_recovered boolean;
begin
  select * into v_box from public.account_tool_environments
   where dtma_token_sha256 = decode(p_token_sha256, 'hex')
   for no key update;
  if not found then
    perform cp_private.cp_raise('MC401', 'unknown toolbox token');
  end if;
  if v_box.status in ('pending_deprovision', 'deprovisioning', 'deprovisioned', 'error_deprovisioning') then
    perform cp_private.cp_raise('MC409', format('toolbox is %s; heartbeats are not accepted', v_box.status),
                            jsonb_build_object('toolbox_status', v_box.status));
  end if;

  if p_report->>'boot_id' is not null and p_report->>'seq' is not null
     and v_box.dtma_boot_id = p_report->>'boot_id'
     and v_box.dtma_last_seq >= (p_report->>'seq')::bigint
     and v_box.dtma_last_seq - (p_report->>'seq')::bigint < 16 then
    return jsonb_build_object('toolbox_id', v_box.id, 'ignored', true,
                              'reason', 'sequence not newer than the last applied heartbeat');
  end if;

  v_result := cp_private.cp_reconcile_toolbox(v_box.id, p_report, 'heartbeat');

  v_recovered := v_box.status = 'unresponsive';
  update public.account_tool_environments
     set last_heartbeat_at = now(),
         dtma_last_known_version = left(p_report->>'dtma_version', 64),
         dtma_health_details_json = p_report->'system_status',
         dtma_report_details_json = jsonb_build_object(
           'unmanaged_containers', v_result->'unmanaged',
           'docker', case when p_report->>'docker_error' is null then jsonb_build_object('healthy', true)
                          else jsonb_build_object('healthy', false, 'error', p_report->>'docker_error') end,
           'rejected_items', (v_result->>'rejected')::int,
           'extra', coalesce(p_report->'extra', '{}')),
         dtma_boot_id = coalesce(p_report->>'boot_id', dtma_boot_id),
         dtma_last_seq = case when p_report->>'boot_id' is null then dtma_last_seq
                              else (p_report->>'seq')::bigint end,
         status = case when status in ('provisioning', 'awaiting_heartbeat', 'unresponsive', 'error_provisioning')
                       then 'active' else status end,
         status_changed_at = case when status in ('provisioning', 'awaiting_heartbeat', 'unresponsive',
                                                  'error_provisioning') then now() else status_changed_at end,
         provisioning_error_message = case when status = 'error_provisioning' then null
                                           else provisioning_error_message end
   where id = v_box.id;

  if v_recovered then
    perform cp_private.cp_append_event(i, i.status_on_toolbox, i.status_on_toolbox, 'heartbeat',
                                   'toolbox is reporting again')
       from public.account_tool_instances i where i.account_tool_environment_id = v_box.id;
  end if;

  return jsonb_build_object(
    'toolbox_id', v_box.id, 'ignored', false, 'previous_status', v_box.status,
    'matched', v_result->'matched', 'transitions', v_result->'transitions',
    'rejected', v_result->'rejected', 'unmanaged', jsonb_array_length(v_result->'unmanaged'));
end
$$;

-- mcp_status?refresh=true: apply what the toolbox's DTMA answered to GET /tools/status. The
-- toolbox must be the caller's (else "not found", like a missing one) and its row is locked, so
-- a refresh and a heartbeat of the same toolbox apply one after the other. Nothing on the
-- toolbox row changes: see cp_reconcile_toolbox.
create or replace function public.cp_refresh_from_dtma(p_user_id uuid, p_toolbox_id uuid, p_report jsonb)
returns jsonb
language plpgsql
security definer
set search_path = ''
as $$
declare
  v_box public.account_tool_environments;
  v_result jsonb := jsonb_build_object('matched', 0, 'transitions', 0, 'unmanaged', '[]'::jsonb);
begin
  select * into v_box from public.account_tool_environments
   where id = p_toolbox_id and user_id = p_user_id
   for no key update;
  if not found then
    perform cp_private.cp_raise('MC404', 'toolbox not found', jsonb_build_object('toolbox_id', p_toolbox_id));
  end if;
  if v_box.status in ('pending_deprovision', 'deprovisioning', 'deprovisioned', 'error_deprovisioning') then
    perform cp_private.cp_raise('MC409', format('toolbox %s is %s; its reports are not applied', v_box.name,
                                            replace(v_box.status::text, '_', ' ')),
                            jsonb_build_object('toolbox_status', v_box.status));
  end if;
  if p_report->>'docker_error' is null then
    v_result := cp_private.cp_reconcile_toolbox(v_box.id, p_report, 'dtma');
  end if;
  update public.account_tool_environments
     set dtma_last_reached_at = now(),
         dtma_report_details_json = case
           when p_report->>'docker_error' is not null then jsonb_set(coalesce(dtma_report_details_json, '{}'),
             '{docker}', jsonb_build_object('healthy', false, 'error', p_report->>'docker_error'))
           when dtma_report_details_json->'docker'->>'healthy' = 'false' then jsonb_set(dtma_report_details_json,
             '{docker}', jsonb_build_object('healthy', true))
           else dtma_report_details_json end
   where id = v_box.id;
  return jsonb_build_object('toolbox_id', v_box.id, 'matched', v_result->'matched',
                            'transitions', v_result->'transitions',
                            'unmanaged', jsonb_array_length(v_result->'unmanaged'));
end
$$;

-- Whether an agent's token belongs to a toolbox, asked before its body is read (an unknown token
-- gets its 401 without the body being parsed); the ingest checks the token again. Nothing else
-- is said: no toolbox id, no status.
create or replace function public.cp_toolbox_token_known(p_token_sha256 text)
returns boolean
language sql
stable
security definer
set search_path = ''
as $$
  select exists (select 1 from public.account_tool_environments
                  where dtma_token_sha256 = decode(p_token_sha256, 'hex'));
$$;

select cp_private.restrict_function_privileges();
