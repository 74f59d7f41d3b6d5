-- Running means answering: whether each MCP server's endpoint answers the MCP handshake, and the
-- tools it offers (shared/usecases/mcp_health.py decides when to ask and what an answer means;
-- shared/adapters/mcp_probe.py asks).
--
-- Where the answers live: a table of their own, `mcp_endpoint_probes`, one row per server, not a
-- column of account_tool_instances. Owners may write that row's `mcp_discovery_metadata` through
-- PostgREST (0004_security.sql: the web app's annotations), so nothing health depends on may
-- live there; here the API roles may only read their own servers' rows, and only the service
-- role (through the functions below) writes. A separate row also keeps a check every minute from
-- rewriting the instance row (its updated_at, a Realtime message per check): what users must see
-- at once, readiness turning on or off, is appended to the server's events instead, which
-- Realtime carries.
--
-- A probe belongs to one run of the container: it counts only while it is newer than the
-- instance's last status change (checked_at >= status_changed_at). A server that stopped and
-- started again is "not checked yet" until its next probe, whatever the row from before says.

create table public.mcp_endpoint_probes (
  account_tool_instance_id uuid primary key
    references public.account_tool_instances (id) on delete cascade,
  -- The last recorded answer: true when the endpoint completed the MCP handshake. Null while the
  -- row only holds a sweep's claim (below) and nothing was recorded yet.
  ready boolean,
  -- When that answer was recorded (database clock).
  checked_at timestamptz,
  -- A sweep took this server into its batch at this time; another sweep leaves it alone until
  -- the lease passes (cp_mcp_probe_batch), and recording an answer clears it.
  claimed_at timestamptz,
  -- What the endpoint said, bounded and cleaned by shared/usecases/mcp_health.py: endpoint,
  -- sentence (why it is not ready, a sentence a user can act on), error_kind, protocol_version,
  -- server_name, server_version, capabilities, resources_count, prompts_count, duration_ms,
  -- probed_at (the prober's clock).
  result jsonb not null default '{}',
  -- [{name, description, input_schema}] from tools/list, capped in size (tool_count is the real
  -- count). Read only by mcp_status for one server.
  tools jsonb not null default '[]',
  tool_count integer check (tool_count is null or tool_count >= 0),
  constraint mcp_endpoint_probes_result_is_object check (jsonb_typeof(result) = 'object'),
  constraint mcp_endpoint_probes_tools_is_array check (jsonb_typeof(tools) = 'array')
);
-- Owners read the answers of their own servers; nobody but the service role writes (no insert,
-- update or delete grant, so a user cannot make a server read healthy through PostgREST).
alter table public.mcp_endpoint_probes enable row level security;
revoke all on public.mcp_endpoint_probes from anon, authenticated;
grant all on public.mcp_endpoint_probes to service_role;
grant select on public.mcp_endpoint_probes to authenticated;
create policy "Owners can view the MCP checks of their servers" on public.mcp_endpoint_probes
  for select to authenticated using (
    exists (select 1 from public.account_tool_instances i
              join public.account_tool_environments e on e.id = i.account_tool_environment_id
             where i.id = account_tool_instance_id and e.user_id = (select auth.uid())));

-- ---------------------------------------------------------------------------------------------
-- Record many answers in one round trip (the command worker after it saw a server start, one
-- mcp_status?refresh=true, one sweep batch).
--
-- p_results: [{instance_id, ok, message, tool_count, tools, result}], built by
-- shared/usecases/mcp_health.py: `message` is what the server's progress says if its readiness
-- changes ("MCP endpoint answers: 12 tools" when ok, the sentence of why not otherwise).
-- An answer for an instance that is gone, is no longer a running MCP server, or whose row is
-- being changed right now (locked: a heartbeat or a command is writing it) is ignored: the next
-- check tells. One event, not one per check, when readiness flips within the container's current
-- run: it answers (first answer of the run, or again after it did not), or it stopped answering
-- after it answered. A run whose first check fails gets no event (the server's `error` says it;
-- a server that never answers does not add an event to every start). Source: who checked (`api`:
-- the worker or mcp_status, `sweep`).
-- Rows are taken in instance id order (as cp_mcp_probe_batch claims them), so two calls at once
-- cannot deadlock.
-- ---------------------------------------------------------------------------------------------
create or replace function public.cp_record_mcp_probes(p_results jsonb, p_source text default 'api')
returns jsonb
language plpgsql
security definer
set search_path = ''
as $$
declare
  v_item jsonb;
  v_inst public.account_tool_instances;
  v_probe public.mcp_endpoint_probes;
  v_prev boolean;
  v_ready boolean;
  v_tools jsonb;
  v_message text;
  v_recorded int := 0;
  v_ignored int := 0;
  v_events int := 0;
begin
  if jsonb_typeof(p_results) is distinct from 'array' then
    perform cp_private.cp_raise('MC400', 'p_results must be a JSON array of check results');
  end if;
  if p_source is null or p_source not in ('api', 'sweep', 'dtma') then
    perform cp_private.cp_raise('MC400', 'p_source must be api, sweep or dtma',
                                jsonb_build_object('source', p_source));
  end if;

  for v_item in
    select r.value from jsonb_array_elements(p_results) r
     where jsonb_typeof(r.value) = 'object'
       and r.value->>'instance_id' ~ '^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$'
     order by (r.value->>'instance_id')::uuid
  loop
    select i.* into v_inst from public.account_tool_instances i
     where i.id = (v_item->>'instance_id')::uuid
       for share skip locked;
    if not found or v_inst.status_on_toolbox <> 'running' or v_inst.mcp_server_type is distinct from 'mcp_server' then
      v_ignored := v_ignored + 1;
      continue;
    end if;

    v_ready := coalesce((v_item->>'ok')::boolean, false);
    v_tools := case when v_ready and jsonb_typeof(v_item->'tools') = 'array' then v_item->'tools' else '[]' end;
    insert into public.mcp_endpoint_probes (account_tool_instance_id) values (v_inst.id)
    on conflict (account_tool_instance_id) do nothing;
    select * into v_probe from public.mcp_endpoint_probes where account_tool_instance_id = v_inst.id for update;
    -- Readiness so far in this run of the container (null: not checked since it last changed status).
    v_prev := case when v_probe.checked_at >= v_inst.status_changed_at then v_probe.ready end;

    update public.mcp_endpoint_probes
       set ready = v_ready,
           -- clock_timestamp(): later than the status change this transaction just read, even when
           -- that change's transaction started after this one.
           checked_at = clock_timestamp(),
           claimed_at = null,
           result = case when jsonb_typeof(v_item->'result') = 'object' then v_item->'result' else '{}' end,
           -- Unchanged tools keep their stored value (no new TOAST copy every minute).
           tools = case when tools = v_tools then tools else v_tools end,
           tool_count = case when v_ready then greatest((v_item->>'tool_count')::int, 0) end
     where account_tool_instance_id = v_inst.id;
    v_recorded := v_recorded + 1;

    if (v_ready and v_prev is not true) or (not v_ready and v_prev) then
      v_message := left(coalesce(nullif(v_item->>'message', ''),
                                 case when v_ready then 'MCP endpoint answers' else 'no reason given' end), 600);
      v_message := case when v_ready then v_message else 'MCP endpoint stopped answering: ' || v_message end;
      perform cp_private.cp_append_event(v_inst, v_inst.status_on_toolbox, v_inst.status_on_toolbox,
                                         p_source::public.instance_event_source_enum, v_message);
      v_events := v_events + 1;
    end if;
  end loop;

  return jsonb_build_object('recorded', v_recorded, 'ignored', v_ignored, 'events', v_events);
end
$$;

-- ---------------------------------------------------------------------------------------------
-- A sweep's batch: at most p_limit running MCP servers to check, those never checked first, then
-- the longest unchecked; each is claimed for p_lease_seconds so that a sweep running at the same
-- time picks others.
--
-- Only servers the backend can reach and whose state is current: running, an HTTP transport
-- (streamable_http, sse: stdio has no network endpoint), published on every address of the
-- droplet (a loopback or private binding is not reachable from the backend: the same rule as
-- shared/usecases/view.py `_published`), a host port and a public address (not an internal one
-- unless p_allow_internal: ALLOW_PRIVATE_TOOLBOX_IPS), on an active toolbox heard from within
-- p_stale_after_seconds whose Docker answers. Servers checked within
-- p_min_age_seconds (by the worker after a start, or a refresh) wait for a later sweep.
-- Claims are serialised by a transaction-scoped advisory lock and written in instance id order.
-- ---------------------------------------------------------------------------------------------
create or replace function public.cp_mcp_probe_batch(
  p_limit int,
  p_stale_after_seconds int,
  p_min_age_seconds int default 30,
  p_lease_seconds int default 120,
  p_allow_internal boolean default false
) returns jsonb
language plpgsql
security definer
set search_path = ''
as $$
declare
  v_targets jsonb;
begin
  if p_limit is null or p_limit < 1 or p_limit > 10000 or p_stale_after_seconds is null
     or p_stale_after_seconds < 1 or p_min_age_seconds < 0 or p_lease_seconds < 1 then
    perform cp_private.cp_raise('MC400', 'probe batch parameters out of range',
                                jsonb_build_object('limit', p_limit, 'stale_after_seconds', p_stale_after_seconds,
                                                   'min_age_seconds', p_min_age_seconds,
                                                   'lease_seconds', p_lease_seconds));
  end if;
  -- An arbitrary constant of this function: two sweeps claim one after the other, the second
  -- seeing the first's claims.
  perform pg_catalog.pg_advisory_xact_lock(7402113902);

  with picked as (
    select i.id, i.instance_name_on_toolbox as name, host(e.public_ip_address) as host, i.host_port as port,
           coalesce(i.mcp_endpoint_path, '') as path, i.mcp_transport_type as transport, pr.checked_at
      from public.account_tool_instances i
      join public.account_tool_environments e on e.id = i.account_tool_environment_id
      left join public.mcp_endpoint_probes pr on pr.account_tool_instance_id = i.id
     where i.mcp_server_type = 'mcp_server'
       and i.status_on_toolbox = 'running'
       and i.mcp_transport_type in ('streamable_http', 'sse')
       and i.host_port is not null
       and e.public_ip_address is not null
       and (p_allow_internal or not cp_private.cp_address_is_internal(e.public_ip_address))
       and (coalesce(i.port_mapping_json->>'publish', 'public') = 'public' or i.port_mapping_json->>'host_ip' is null)
       and e.status = 'active'
       and e.last_heartbeat_at >= now() - make_interval(secs => p_stale_after_seconds)
       and (e.dtma_report_details_json->'docker'->>'healthy') is distinct from 'false'
       and (pr.checked_at is null or pr.checked_at < now() - make_interval(secs => p_min_age_seconds))
       and (pr.claimed_at is null or pr.claimed_at < now() - make_interval(secs => p_lease_seconds))
     order by pr.checked_at nulls first, i.id
     limit p_limit
  ), claimed as (
    insert into public.mcp_endpoint_probes (account_tool_instance_id, claimed_at)
    select p.id, now() from picked p order by p.id
    on conflict (account_tool_instance_id) do update set claimed_at = excluded.claimed_at
    returning account_tool_instance_id
  )
  select coalesce(jsonb_agg(jsonb_build_object('instance_id', p.id, 'name', p.name, 'host', p.host, 'port', p.port,
                                               'path', p.path, 'transport', p.transport, 'checked_at', p.checked_at)
                            order by p.checked_at nulls first, p.id), '[]')
    into v_targets
    from picked p join claimed c on c.account_tool_instance_id = p.id;

  return jsonb_build_object('targets', v_targets);
end
$$;

-- ---------------------------------------------------------------------------------------------
-- mcp_status's read (0007_status_and_sweep.sql), now with each server's last MCP check:
-- `mcp_probe` {ready, checked_at, current (made in the container's current run), result,
-- tool_count}, null when none was recorded; and, when one server is read (p_id), `tools`.
-- Everything else is exactly as in 0007.
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
               'events', coalesce(ev.events, '[]'::jsonb),
               'mcp_probe', case when pr.checked_at is not null then jsonb_build_object(
                 'ready', pr.ready, 'checked_at', pr.checked_at, 'current', pr.checked_at >= p.status_changed_at,
                 'result', pr.result, 'tool_count', pr.tool_count) end)
             || case when p_id is not null then jsonb_build_object('tools', coalesce(pr.tools, '[]'::jsonb))
                     else '{}'::jsonb end as item
        from page p
        join public.account_tool_environments e on e.id = p.account_tool_environment_id
        left join public.mcp_endpoint_probes pr on pr.account_tool_instance_id = p.id
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

select cp_private.restrict_function_privileges();
