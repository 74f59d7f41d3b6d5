-- Status truth against the real DTMA agent (docs/real-agent.md has the scenarios and what the
-- agent really answers). What changes, and why:
--
-- * A container found exited that nobody asked to stop is an `error` (with its exit code when the
--   report carries one), never a clean `stopped`: an MCP server that exits with code 0 on its own
--   is still down. Only a stop the user asked for (`stopping`/`stopped`) ends in `stopped`.
-- * A report binds an instance only to a container this service created: the container id from
--   the agent's deploy answer when we have it, otherwise a container created after the instance
--   was recorded. The agent's own container or other software on the droplet is never adopted.
-- * "The agent no longer manages this container" (the agent restarted and forgot it; it answers
--   404 for it) is a state a user keeps seeing (`agent_unmanaged_at`) until the record is removed.
-- * An action that never reached the agent puts the instance back where it was.
-- * Host ports and names held by containers we do not manage are refused at deploy.
-- * Docker being down on a toolbox refuses commands and shows on every server of that toolbox.
-- * A direct read of the agent (`mcp_status?refresh=true`) records that the agent answered
--   (`dtma_last_reached_at`), so "the agent answers but its heartbeats do not arrive" is its own
--   condition.
-- * Legacy statuses of Agentopia's other tools (`active`, `installing`, ...) are mapped onto the
--   state machine when a report concerns them, instead of never changing.
-- * A heartbeat `seq` far below the last one is a new count, not a late beat: one absurd `seq`
--   can no longer make every later heartbeat of the same run be ignored.
-- * `last_heartbeat_from_dtma` is written by every heartbeat that reports the instance.

alter table public.account_tool_instances
  add column if not exists agent_unmanaged_at timestamptz;
comment on column public.account_tool_instances.agent_unmanaged_at is
  'When the toolbox agent was first seen not to manage this container (it restarted and forgot it); null while it does.';
comment on column public.account_tool_instances.last_heartbeat_from_dtma is
  'The last heartbeat that reported this instance''s container (database clock).';

alter table public.account_tool_environments
  add column if not exists dtma_last_reached_at timestamptz;
comment on column public.account_tool_environments.dtma_last_reached_at is
  'Last time the backend read the agent directly and it answered (not a liveness signal: heartbeats are).';
grant select (dtma_last_reached_at) on public.account_tool_environments to authenticated;

-- ---------------------------------------------------------------------------------------------
-- The state machine, amended (shared/lifecycle.py mirrors it; a test keeps the two equal).
-- ---------------------------------------------------------------------------------------------
delete from public.instance_status_transitions
 where (from_status, to_status) in (('deploying', 'stopped'), ('error', 'stopped'))
   and source in ('heartbeat', 'dtma');
insert into public.instance_status_transitions (from_status, to_status, source, why) values
  ('starting', 'error',   'heartbeat', 'container exited after it was started'),
  ('starting', 'error',   'dtma',      'container exited after it was started'),
  ('stopping', 'running', 'api',       'the stop never reached the toolbox agent; nothing changed'),
  ('starting', 'stopped', 'api',       'the start never reached the toolbox agent; nothing changed'),
  ('deleting', 'running', 'api',       'the removal never reached the toolbox agent; nothing changed'),
  ('deleting', 'stopped', 'api',       'the removal never reached the toolbox agent; nothing changed')
on conflict do nothing;

-- Legacy statuses (rows of Agentopia's other tools) and the status of this state machine each
-- one means. shared/lifecycle.py LEGACY_STATUSES is the same table (a test feeds both).
create or replace function public.cp_canonical_status(p_status public.account_tool_installation_status_enum)
returns public.account_tool_installation_status_enum
language sql immutable
set search_path = public, pg_temp
as $$
  select (case p_status::text
    when 'active' then 'running'
    when 'installing' then 'deploying'
    when 'pending_install' then 'pending_deploy'
    when 'pending_config' then 'pending_deploy'
    when 'error_install' then 'error'
    when 'error_uninstall' then 'error'
    when 'error_runtime' then 'error'
    when 'disabled' then 'stopped'
    when 'uninstalled' then 'stopped'
    when 'pending_delete' then 'deleting'
    when 'uninstalling' then 'deleting'
    when 'pending_uninstall' then 'deleting'
    else p_status::text
  end)::public.account_tool_installation_status_enum
$$;

-- ---------------------------------------------------------------------------------------------
-- Reconciliation, shared by the heartbeat and by mcp_status?refresh=true (see 0005 for the
-- report's shape). Each container observation may also carry:
--   created      unix seconds the container was created (binding rule below)
--   exited       true when Docker says `exited`; the status then depends on whether a stop was
--                asked for: `message` is the sentence for an asked-for stop, `unexpected` the
--                one for an exit nobody asked for
--   exit_code    the exit code when the report carries it (heartbeats do; /tools/status does not)
--   agent_instance_id  present only in a direct read: the instance id the agent associates
--                with the container, null when the agent does not manage it
-- ---------------------------------------------------------------------------------------------
create or replace function public.cp_reconcile_toolbox(p_toolbox_id uuid, p_report jsonb, p_source text)
returns jsonb
language plpgsql
set search_path = public, pg_temp
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
    perform public.cp_raise('MC400', format('reports come from a heartbeat or a DTMA read, not %s', p_source));
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
       and public.cp_canonical_status(i.status_on_toolbox) <> i.status_on_toolbox
     order by i.id
       for update
  loop
    update public.account_tool_instances
       set status_on_toolbox = public.cp_canonical_status(v_row.status_on_toolbox), status_changed_at = now()
     where id = v_row.id;
    perform public.cp_append_event(v_row, v_row.status_on_toolbox, public.cp_canonical_status(v_row.status_on_toolbox),
                                   v_source, format('legacy status %s is read as %s', v_row.status_on_toolbox,
                                                    public.cp_canonical_status(v_row.status_on_toolbox)));
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
    perform public.cp_append_event(v_obs_row.inst, (v_obs_row.inst).status_on_toolbox,
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
      perform public.cp_append_event(v_obs_row.inst, 'error', 'error', v_source, v_obs_row.message);
    else
      perform public.cp_apply_instance_transition(
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
      perform public.cp_apply_instance_transition(
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

-- ---------------------------------------------------------------------------------------------
-- The heartbeat (as in 0005), with a bounded ordering window: a beat of the same agent run whose
-- seq is at most 16 below the last applied one is late or a duplicate and changes nothing; one
-- further below means the count started again, and is applied.
-- ---------------------------------------------------------------------------------------------
create or replace function public.cp_ingest_heartbeat(p_token_sha256 text, p_report jsonb)
returns jsonb
language plpgsql
set search_path = public, pg_temp
as $$
declare
  v_box public.account_tool_environments;
  v_result jsonb;
  v_recovered boolean;
begin
  select * into v_box from public.account_tool_environments
   where dtma_token_sha256 = decode(p_token_sha256, 'hex')
   for update;
  if not found then
    perform public.cp_raise('MC401', 'unknown toolbox token');
  end if;
  if v_box.status in ('pending_deprovision', 'deprovisioning', 'deprovisioned', 'error_deprovisioning') then
    perform public.cp_raise('MC409', format('toolbox is %s; heartbeats are not accepted', v_box.status),
                            jsonb_build_object('toolbox_status', v_box.status));
  end if;

  if p_report->>'boot_id' is not null and p_report->>'seq' is not null
     and v_box.dtma_boot_id = p_report->>'boot_id'
     and v_box.dtma_last_seq >= (p_report->>'seq')::bigint
     and v_box.dtma_last_seq - (p_report->>'seq')::bigint < 16 then
    return jsonb_build_object('toolbox_id', v_box.id, 'ignored', true,
                              'reason', 'sequence not newer than the last applied heartbeat');
  end if;

  v_result := public.cp_reconcile_toolbox(v_box.id, p_report, 'heartbeat');

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
    insert into public.account_tool_instance_events
      (account_tool_instance_id, account_tool_environment_id, instance_name_on_toolbox,
       from_status, to_status, source, message)
    select i.id, i.account_tool_environment_id, i.instance_name_on_toolbox, i.status_on_toolbox,
           i.status_on_toolbox, 'heartbeat', 'toolbox is reporting again'
      from public.account_tool_instances i where i.account_tool_environment_id = v_box.id;
  end if;

  return jsonb_build_object(
    'toolbox_id', v_box.id, 'ignored', false, 'previous_status', v_box.status,
    'matched', v_result->'matched', 'transitions', v_result->'transitions',
    'rejected', v_result->'rejected', 'unmanaged', jsonb_array_length(v_result->'unmanaged'));
end
$$;

-- mcp_status?refresh=true (as in 0005), recording that the agent answered and what it said of
-- Docker: a read that found Docker down says so; one that listed containers says Docker is up.
create or replace function public.cp_refresh_from_dtma(p_user_id uuid, p_toolbox_id uuid, p_report jsonb)
returns jsonb
language plpgsql
set search_path = public, pg_temp
as $$
declare
  v_box public.account_tool_environments;
  v_result jsonb := jsonb_build_object('matched', 0, 'transitions', 0, 'unmanaged', '[]'::jsonb);
begin
  select * into v_box from public.account_tool_environments
   where id = p_toolbox_id and user_id = p_user_id
   for update;
  if not found then
    perform public.cp_raise('MC404', 'toolbox not found', jsonb_build_object('toolbox_id', p_toolbox_id));
  end if;
  if v_box.status in ('pending_deprovision', 'deprovisioning', 'deprovisioned', 'error_deprovisioning') then
    perform public.cp_raise('MC409', format('toolbox %s is %s; its reports are not applied', v_box.name,
                                            replace(v_box.status::text, '_', ' ')),
                            jsonb_build_object('toolbox_status', v_box.status));
  end if;
  if p_report->>'docker_error' is null then
    v_result := public.cp_reconcile_toolbox(v_box.id, p_report, 'dtma');
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

-- ---------------------------------------------------------------------------------------------
-- Commands: a toolbox whose Docker is down takes none (the agent would fail every one).
-- ---------------------------------------------------------------------------------------------
create or replace function public.cp_check_toolbox_commandable(p_box public.account_tool_environments,
                                                               p_allow_internal boolean)
returns void
language plpgsql
set search_path = public, pg_temp
as $$
begin
  if p_box.status <> 'active' then
    perform public.cp_raise('MC409',
      case
        when p_box.status = 'unresponsive' and p_box.dtma_last_reached_at > p_box.last_heartbeat_at then format(
          'toolbox %s is unresponsive: its agent answers the backend but its heartbeats do not arrive; check '
          'AGENTOPIA_API_BASE_URL and DTMA_AUTH_TOKEN in /etc/dtma.conf on the droplet', p_box.name)
        when p_box.status = 'unresponsive' then format(
          'toolbox %s is unresponsive (no heartbeat lately); try again when it reports', p_box.name)
        when p_box.status = 'awaiting_heartbeat' then format(
          'toolbox %s is starting up; try again when it is active', p_box.name)
        else format('toolbox %s is %s; try again when it is active',
                    p_box.name, replace(p_box.status::text, '_', ' '))
      end,
      jsonb_build_object('toolbox_status', p_box.status));
  end if;
  if p_box.dtma_report_details_json->'docker'->>'healthy' = 'false' then
    perform public.cp_raise('MC409',
      format('Docker is not answering on toolbox %s (its agent says: %s); nothing can be deployed, started or '
             'stopped there until it is back. On the droplet: systemctl status docker', p_box.name,
             left(p_box.dtma_report_details_json->'docker'->>'error', 200)),
      jsonb_build_object('toolbox_status', p_box.status, 'docker', 'down'));
  end if;
  if p_box.public_ip_address is null then
    perform public.cp_raise('MC409', format('toolbox %s has no public IP address yet', p_box.name),
                            jsonb_build_object('toolbox_status', p_box.status));
  end if;
  if not p_allow_internal and public.cp_address_is_internal(p_box.public_ip_address) then
    perform public.cp_raise('MC409',
      format('toolbox %s has the non-public address %s; the backend does not send its key there',
             p_box.name, host(p_box.public_ip_address)),
      jsonb_build_object('toolbox_status', p_box.status));
  end if;
end
$$;

-- Names and host ports held by containers of the toolbox that this service does not manage, as
-- the last heartbeat listed them.
create or replace function public.cp_unmanaged_names(p_box public.account_tool_environments)
returns table (name text, port int)
language sql stable
set search_path = public, pg_temp
as $$
  select n.name, null::int
    from jsonb_array_elements(coalesce(p_box.dtma_report_details_json->'unmanaged_containers', '[]')) c
    cross join lateral jsonb_array_elements_text(coalesce(c->'names', '[]')) n(name)
  union all
  select (c->'names'->>0), p::text::int
    from jsonb_array_elements(coalesce(p_box.dtma_report_details_json->'unmanaged_containers', '[]')) c
    cross join lateral jsonb_array_elements(coalesce(c->'ports', '[]')) p
   where jsonb_typeof(p) = 'number'
$$;

-- Deploy, step 1 (as in 0006), refusing names and host ports that containers we did not create
-- already hold on the toolbox, and allocating around every port in use there.
create or replace function public.cp_record_deploy(
  p_user_id uuid, p_toolbox_id uuid, p_spec jsonb, p_policy jsonb
) returns jsonb
language plpgsql
set search_path = public, pg_temp
as $$
declare
  v_box public.account_tool_environments;
  v_catalog public.tool_catalog;
  v_row public.account_tool_instances;
  v_name text := p_spec->>'name';
  v_port int := (p_spec->>'host_port')::int;
  v_dtma_port int;
  v_holder text;
begin
  select * into v_box from public.account_tool_environments
   where id = p_toolbox_id and user_id = p_user_id for update;
  if not found then
    perform public.cp_raise('MC404', 'toolbox not found', jsonb_build_object('toolbox_id', p_toolbox_id));
  end if;
  perform public.cp_check_toolbox_commandable(v_box, coalesce((p_policy->>'allow_internal')::boolean, false));

  select * into v_catalog from public.tool_catalog
   where id = coalesce((p_spec->>'catalog_id')::uuid, '00000000-0000-0000-0000-000000000001');
  if not found or v_catalog.status in ('deprecated', 'archived') then
    perform public.cp_raise('MC404', 'catalog entry not found or no longer available',
                            jsonb_build_object('catalog_id', p_spec->'catalog_id'));
  end if;

  if exists (select 1 from public.account_tool_instances
             where account_tool_environment_id = v_box.id and instance_name_on_toolbox = v_name) then
    perform public.cp_raise('MC409', format('an MCP server named %s already exists on toolbox %s', v_name, v_box.name),
                            jsonb_build_object('field', 'name'));
  end if;
  if exists (select 1 from public.cp_unmanaged_names(v_box) u where u.port is null and u.name = v_name) then
    perform public.cp_raise('MC409',
      format('a container named %s already runs on toolbox %s and was not created by this service (the agent '
             'itself or other software); pick another name', v_name, v_box.name),
      jsonb_build_object('field', 'name', 'container', v_name));
  end if;

  v_dtma_port := coalesce(v_box.dtma_port, (p_policy->>'dtma_port')::int);
  if v_port is null then
    select min(p) into v_port
      from generate_series((p_policy->>'port_low')::int, (p_policy->>'port_high')::int) p
     where p <> v_dtma_port
       and not exists (select 1 from public.account_tool_instances
                       where account_tool_environment_id = v_box.id and host_port = p)
       and not exists (select 1 from public.cp_unmanaged_names(v_box) u where u.port = p);
    if v_port is null then
      perform public.cp_raise('MC409', format('no free host port left on toolbox %s in %s-%s', v_box.name,
                                              p_policy->>'port_low', p_policy->>'port_high'),
                              jsonb_build_object('field', 'host_port'));
    end if;
  elsif v_port = v_dtma_port then
    perform public.cp_raise('MC400', format('host_port %s is the toolbox agent''s own port', v_port),
                            jsonb_build_object('field', 'host_port'));
  elsif exists (select 1 from public.account_tool_instances
                where account_tool_environment_id = v_box.id and host_port = v_port) then
    perform public.cp_raise('MC409', format('host port %s is already used on toolbox %s', v_port, v_box.name),
                            jsonb_build_object('field', 'host_port'));
  else
    select u.name into v_holder from public.cp_unmanaged_names(v_box) u where u.port = v_port limit 1;
    if found then
      perform public.cp_raise('MC409',
        format('host port %s is already used on toolbox %s by container %s, which this service does not manage; '
               'pick another port or leave host_port out to get a free one', v_port, v_box.name, v_holder),
        jsonb_build_object('field', 'host_port', 'container', v_holder));
    end if;
  end if;

  insert into public.account_tool_instances (
    account_tool_environment_id, tool_catalog_id, status_on_toolbox, instance_name_on_toolbox,
    docker_image_url, container_port, host_port, env_var_names, base_config_override_json,
    port_mapping_json, mcp_server_type, mcp_transport_type, mcp_endpoint_path, mcp_server_capabilities,
    mcp_discovery_metadata)
  values (
    v_box.id, v_catalog.id, 'pending_deploy', v_name,
    coalesce(p_spec->>'image', v_catalog.docker_image_url), (p_spec->>'container_port')::int, v_port,
    array(select jsonb_array_elements_text(coalesce(p_spec->'env_names', '[]'))),
    jsonb_build_object('HostConfig', jsonb_build_object('PortBindings', jsonb_build_object(
      (p_spec->>'container_port') || '/tcp', jsonb_build_array(jsonb_build_object('HostPort', v_port::text))))),
    jsonb_build_object('container_port', (p_spec->>'container_port')::int, 'host_port', v_port),
    'mcp_server', p_spec->>'transport', p_spec->>'endpoint_path', coalesce(p_spec->'capabilities', '[]'),
    jsonb_build_object('deployed_via', 'deploy_mcp_server', 'deployed_at', now()))
  returning * into v_row;

  perform public.cp_append_event(v_row, null, 'pending_deploy', 'api',
                                 format('deploy of %s requested', v_row.docker_image_url));
  v_row := public.cp_apply_instance_transition(
    v_row, 'deploying', 'api',
    format('asked the toolbox agent to pull %s and start it on port %s', v_row.docker_image_url, v_port));

  return jsonb_build_object('instance', public.cp_instance_json(v_row), 'toolbox', public.cp_toolbox_json(v_box));
end
$$;

-- Manage, step 1 (as in 0006). Start, stop and restart of a container the agent no longer
-- manages are refused without calling it (it would answer 404); removal is always possible.
-- The answer carries the status and error the action started from, so an action that never
-- reached the agent can be undone exactly (cp_revert_action).
create or replace function public.cp_begin_action(
  p_user_id uuid, p_instance_id uuid, p_action text, p_plan jsonb, p_message text,
  p_allow_internal boolean default false
) returns jsonb
language plpgsql
set search_path = public, pg_temp
as $$
declare
  v_row public.account_tool_instances;
  v_before public.account_tool_instances;
  v_box public.account_tool_environments;
begin
  select i.* into v_row from public.account_tool_instances i
    join public.account_tool_environments e on e.id = i.account_tool_environment_id
   where i.id = p_instance_id and e.user_id = p_user_id and i.mcp_server_type = 'mcp_server'
   for update of i;
  if not found then
    perform public.cp_raise('MC404', 'MCP server not found', jsonb_build_object('id', p_instance_id));
  end if;
  select * into v_box from public.account_tool_environments where id = v_row.account_tool_environment_id;
  if v_row.agent_unmanaged_at is not null and p_action <> 'remove' then
    perform public.cp_raise('MC409',
      format('the toolbox agent no longer manages %s (it restarted and forgot the container), so it cannot %s '
             'it. Remove this server (the container stays on the droplet: docker rm -f %s there), then deploy '
             'it again', v_row.instance_name_on_toolbox, p_action, v_row.instance_name_on_toolbox),
      jsonb_build_object('status', v_row.status_on_toolbox, 'action', p_action, 'agent_manages', false));
  end if;
  if not (p_plan ? v_row.status_on_toolbox::text) then
    perform public.cp_raise('MC409',
      format('cannot %s %s while it is %s', p_action, v_row.instance_name_on_toolbox, v_row.status_on_toolbox),
      jsonb_build_object('status', v_row.status_on_toolbox, 'action', p_action));
  end if;
  if p_action <> 'remove' then
    perform public.cp_check_toolbox_commandable(v_box, p_allow_internal);
  end if;
  v_before := v_row;
  v_row := public.cp_apply_instance_transition(
    v_row, (p_plan->>v_row.status_on_toolbox::text)::public.account_tool_installation_status_enum, 'api',
    p_message);
  return jsonb_build_object('instance', public.cp_instance_json(v_row), 'toolbox', public.cp_toolbox_json(v_box),
                            'previous_status', v_before.status_on_toolbox,
                            'previous_error', v_before.instance_error_message);
end
$$;

-- An action that never reached the agent: back to the status (and error) it started from, with
-- an event saying why. Guarded like cp_settle: if a report moved the instance meanwhile, the
-- newer truth stands and only the event is written.
create or replace function public.cp_revert_action(
  p_instance_id uuid, p_expected text, p_previous text, p_previous_error text, p_message text
) returns jsonb
language plpgsql
set search_path = public, pg_temp
as $$
declare
  v_row public.account_tool_instances;
begin
  select * into v_row from public.account_tool_instances where id = p_instance_id for update;
  if not found then
    perform public.cp_raise('MC404', 'MCP server not found', jsonb_build_object('id', p_instance_id));
  end if;
  if v_row.status_on_toolbox::text <> p_expected then
    perform public.cp_append_event(v_row, v_row.status_on_toolbox, v_row.status_on_toolbox, 'api', p_message);
    return public.cp_instance_json(v_row);
  end if;
  v_row := public.cp_apply_instance_transition(
    v_row, p_previous::public.account_tool_installation_status_enum, 'api', p_message);
  if p_previous = 'error' then
    update public.account_tool_instances set instance_error_message = p_previous_error
     where id = p_instance_id returning * into v_row;
  end if;
  return public.cp_instance_json(v_row);
end
$$;

-- The agent answered 404 for a container it still lists: record that it no longer manages it.
create or replace function public.cp_mark_agent_unmanaged(p_instance_id uuid, p_message text)
returns jsonb
language plpgsql
set search_path = public, pg_temp
as $$
declare
  v_row public.account_tool_instances;
begin
  select * into v_row from public.account_tool_instances where id = p_instance_id for update;
  if not found then
    perform public.cp_raise('MC404', 'MCP server not found', jsonb_build_object('id', p_instance_id));
  end if;
  if v_row.agent_unmanaged_at is null then
    update public.account_tool_instances set agent_unmanaged_at = now() where id = p_instance_id
    returning * into v_row;
    perform public.cp_append_event(v_row, v_row.status_on_toolbox, v_row.status_on_toolbox, 'api', p_message);
  end if;
  return public.cp_instance_json(v_row);
end
$$;

-- mcp_status's read (as in 0007), with what the truth rules add: whether the agent still manages
-- the container, Docker's health on the toolbox, and when the agent last answered a direct read.
create or replace function public.cp_list_mcp_servers(
  p_user_id uuid,
  p_id uuid default null,
  p_toolbox_id uuid default null,
  p_status text default null,
  p_limit int default 50,
  p_cursor jsonb default null
) returns jsonb
language plpgsql stable
set search_path = public, pg_temp
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
    perform public.cp_raise('MC404', 'MCP server not found', jsonb_build_object('id', p_id));
  end if;
  return v_result;
end
$$;

select public.cp_restrict_rpc_to_service_role();
