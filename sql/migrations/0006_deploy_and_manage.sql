-- Deploy and manage: recording what the web app asked for before the DTMA is called, settling
-- it afterwards, and making retries safe (W24: the original always INSERTed, so a retry hit a
-- unique constraint or made a second container).

-- ---------------------------------------------------------------------------------------------
-- Idempotency keys: the first response to (user, scope, key) is kept for the TTL and replayed.
-- `request_digest` is a keyed hash of the request (it may contain env values, which are
-- secrets), so a different body under the same key is detected without storing the body.
-- ---------------------------------------------------------------------------------------------
create table public.idempotency_keys (
  user_id uuid not null references auth.users (id) on delete cascade,
  scope text not null,
  key text not null check (length(key) between 1 and 255),
  request_digest text not null,
  status integer,
  response jsonb,
  created_at timestamptz not null default now(),
  primary key (user_id, scope, key)
);
create index idx_idempotency_keys_created_at on public.idempotency_keys (created_at);
alter table public.idempotency_keys enable row level security;
revoke all on public.idempotency_keys from anon, authenticated;
grant all on public.idempotency_keys to service_role;

-- Claim a key. Concurrent claims of the same key queue on the primary key; the winner gets
-- {"claimed": true}, the others see the winner's row: {"replay": true, status, response} once
-- it has answered, {"in_flight": true} while it is still working.
create or replace function public.cp_idempotency_claim(
  p_user_id uuid, p_scope text, p_key text, p_request_digest text, p_ttl_seconds int
) returns jsonb
language plpgsql
security definer
set search_path = ''
as $$
declare
  v_row public.idempotency_keys;
begin
  insert into public.idempotency_keys (user_id, scope, key, request_digest)
  values (p_user_id, p_scope, p_key, p_request_digest)
  on conflict (user_id, scope, key) do nothing;
  if found then
    return jsonb_build_object('claimed', true);
  end if;
  select * into v_row from public.idempotency_keys
   where user_id = p_user_id and scope = p_scope and key = p_key for update;
  if v_row.created_at < now() - make_interval(secs => p_ttl_seconds) then
    update public.idempotency_keys
       set request_digest = p_request_digest, status = null, response = null, created_at = now()
     where user_id = p_user_id and scope = p_scope and key = p_key;
    return jsonb_build_object('claimed', true);
  end if;
  if v_row.request_digest <> p_request_digest then
    perform cp_private.cp_raise('MC422', 'this Idempotency-Key was already used with a different request',
                            jsonb_build_object('idempotency_key', p_key));
  end if;
  if v_row.status is null then
    return jsonb_build_object('in_flight', true);
  end if;
  return jsonb_build_object('replay', true, 'status', v_row.status, 'response', v_row.response);
end
$$;

-- Record the answer to replay (p_status null: forget the key, so a retry runs again; used
-- when the first attempt failed for a reason a retry may not hit, such as a 503).
create or replace function public.cp_idempotency_complete(
  p_user_id uuid, p_scope text, p_key text, p_status int, p_response jsonb
) returns jsonb
language plpgsql
security definer
set search_path = ''
as $$
begin
  if p_status is null then
    delete from public.idempotency_keys where user_id = p_user_id and scope = p_scope and key = p_key;
  else
    update public.idempotency_keys set status = p_status, response = p_response
     where user_id = p_user_id and scope = p_scope and key = p_key;
  end if;
  return jsonb_build_object('stored', p_status is not null);
end
$$;

-- ---------------------------------------------------------------------------------------------
-- The toolbox an operation targets, checked: owned by the caller (else "not found", so
-- existence does not leak) and able to take commands.
-- ---------------------------------------------------------------------------------------------
create or replace function cp_private.cp_toolbox_json(p_box public.account_tool_environments)
returns jsonb
language sql stable
set search_path = ''
as $$
  select jsonb_build_object(
    'id', p_box.id, 'name', p_box.name, 'status', p_box.status, 'region_slug', p_box.region_slug,
    'public_ip_address', host(p_box.public_ip_address), 'dtma_port', p_box.dtma_port,
    'dtma_key_version', p_box.dtma_key_version, 'last_heartbeat_at', p_box.last_heartbeat_at)
$$;

-- Addresses the backend must never send a toolbox key to: a user who could point their toolbox at
-- one would make the backend talk to itself or its own network (SSRF). shared/core/addresses.py holds
-- the same list for the DTMA client, which checks again just before connecting;
-- tests/test_addresses.py feeds both the same table of addresses.
create or replace function cp_private.cp_address_is_internal(p_address inet)
returns boolean
language sql immutable
set search_path = ''
as $$
  select p_address <<= any (array[
    '0.0.0.0/8', '10.0.0.0/8', '100.64.0.0/10', '127.0.0.0/8', '169.254.0.0/16', '172.16.0.0/12',
    '192.0.0.0/24', '192.0.2.0/24', '192.88.99.0/24', '192.168.0.0/16', '198.18.0.0/15', '198.51.100.0/24',
    '203.0.113.0/24', '224.0.0.0/4', '240.0.0.0/4',
    '::/128', '::1/128', '::ffff:0:0/96', '64:ff9b::/96', '64:ff9b:1::/48', '100::/64', '2001::/23',
    '2001:db8::/32', '2002::/16', 'fc00::/7', 'fe80::/10', 'ff00::/8']::inet[])
$$;

create or replace function cp_private.cp_check_toolbox_commandable(p_box public.account_tool_environments,
                                                               p_allow_internal boolean)
returns void
language plpgsql
set search_path = ''
as $$
begin
  if p_box.status <> 'active' then
    perform cp_private.cp_raise('MC409',
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
    perform cp_private.cp_raise('MC409',
      format('Docker is not answering on toolbox %s (its agent says: %s); nothing can be deployed, started or '
             'stopped there until it is back. On the droplet: systemctl status docker', p_box.name,
             left(p_box.dtma_report_details_json->'docker'->>'error', 200)),
      jsonb_build_object('toolbox_status', p_box.status, 'docker', 'down'));
  end if;
  if p_box.public_ip_address is null then
    perform cp_private.cp_raise('MC409', format('toolbox %s has no public IP address yet', p_box.name),
                            jsonb_build_object('toolbox_status', p_box.status));
  end if;
  if not p_allow_internal and cp_private.cp_address_is_internal(p_box.public_ip_address) then
    perform cp_private.cp_raise('MC409',
      format('toolbox %s has the non-public address %s; the backend does not send its key there',
             p_box.name, host(p_box.public_ip_address)),
      jsonb_build_object('toolbox_status', p_box.status));
  end if;
end
$$;

-- Names and host ports held by containers of the toolbox that this service does not manage, as
-- the last heartbeat listed them: deploys refuse the names and allocate around the ports.
create or replace function cp_private.cp_unmanaged_names(p_box public.account_tool_environments)
returns table (name text, port int)
language sql stable
set search_path = ''
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

-- ---------------------------------------------------------------------------------------------
-- Deploy, step 1: record the instance (pending_deploy -> deploying, with events) and return
-- what the caller needs to command the DTMA. The toolbox row is locked so that two deploys to
-- one toolbox cannot pick the same free host port; different toolboxes do not wait.
--
-- p_spec = {name, image (null: the catalog's default), catalog_id, transport, container_port,
--           host_port (null: allocate), endpoint_path, env_names [..], capabilities [..],
--           publish (public/loopback), host_ip (null: every address)}
-- p_policy = {port_low, port_high, dtma_port, allow_internal}
-- ---------------------------------------------------------------------------------------------
create or replace function cp_private.cp_record_deploy(
  p_user_id uuid, p_toolbox_id uuid, p_spec jsonb, p_policy jsonb
) returns jsonb
language plpgsql
set search_path = ''
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
   where id = p_toolbox_id and user_id = p_user_id for no key update;
  if not found then
    perform cp_private.cp_raise('MC404', 'toolbox not found', jsonb_build_object('toolbox_id', p_toolbox_id));
  end if;
  perform cp_private.cp_check_toolbox_commandable(v_box, coalesce((p_policy->>'allow_internal')::boolean, false));

  select * into v_catalog from public.tool_catalog
   where id = coalesce((p_spec->>'catalog_id')::uuid, '00000000-0000-0000-0000-000000000001');
  if not found or v_catalog.status in ('deprecated', 'archived') then
    perform cp_private.cp_raise('MC404', 'catalog entry not found or no longer available',
                            jsonb_build_object('catalog_id', p_spec->'catalog_id'));
  end if;

  if exists (select 1 from public.account_tool_instances
             where account_tool_environment_id = v_box.id and instance_name_on_toolbox = v_name) then
    perform cp_private.cp_raise('MC409', format('an MCP server named %s already exists on toolbox %s', v_name, v_box.name),
                            jsonb_build_object('field', 'name'));
  end if;
  if exists (select 1 from cp_private.cp_unmanaged_names(v_box) u where u.port is null and u.name = v_name) then
    perform cp_private.cp_raise('MC409',
      format('a container named %s already runs on toolbox %s and was not created by this service (the agent '
             'itself or other software); pick another name', v_name, v_box.name),
      jsonb_build_object('field', 'name', 'container', v_name));
  end if;

  v_dtma_port := coalesce(v_box.dtma_port, (p_policy->>'dtma_port')::int);
  if v_port is null then
    select min(p) into v_port
      from generate_series((p_policy->>'port_low')::int, (p_policy->>'port_high')::int) p
     where p not in (v_dtma_port, (p_policy->>'dtma_port')::int)
       and not exists (select 1 from public.account_tool_instances
                       where account_tool_environment_id = v_box.id and host_port = p)
       and not exists (select 1 from cp_private.cp_unmanaged_names(v_box) u where u.port = p);
    if v_port is null then
      perform cp_private.cp_raise('MC409', format('no free host port left on toolbox %s in %s-%s', v_box.name,
                                              p_policy->>'port_low', p_policy->>'port_high'),
                              jsonb_build_object('field', 'host_port'));
    end if;
  elsif v_port in (v_dtma_port, (p_policy->>'dtma_port')::int) then
    -- The toolbox's agent port, and the fleet's (30000): the one place this rule lives.
    perform cp_private.cp_raise('MC400', format('host_port %s is the toolbox agent''s own port', v_port),
                            jsonb_build_object('field', 'host_port'));
  elsif exists (select 1 from public.account_tool_instances
                where account_tool_environment_id = v_box.id and host_port = v_port) then
    perform cp_private.cp_raise('MC409', format('host port %s is already used on toolbox %s', v_port, v_box.name),
                            jsonb_build_object('field', 'host_port'));
  else
    select u.name into v_holder from cp_private.cp_unmanaged_names(v_box) u where u.port = v_port limit 1;
    if found then
      perform cp_private.cp_raise('MC409',
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
    -- HostIp only when the request chose an address (publish, shared/usecases/deploy.py HOST_IPS);
    -- without it Docker publishes on every address of the droplet.
    jsonb_build_object('HostConfig', jsonb_build_object('PortBindings', jsonb_build_object(
      (p_spec->>'container_port') || '/tcp', jsonb_build_array(jsonb_strip_nulls(
        jsonb_build_object('HostIp', p_spec->>'host_ip', 'HostPort', v_port::text)))))),
    jsonb_build_object('container_port', (p_spec->>'container_port')::int, 'host_port', v_port,
                       'publish', coalesce(p_spec->>'publish', 'public'), 'host_ip', p_spec->>'host_ip'),
    'mcp_server', p_spec->>'transport', p_spec->>'endpoint_path', coalesce(p_spec->'capabilities', '[]'),
    jsonb_build_object('deployed_via', 'deploy_mcp_server', 'deployed_at', now()))
  returning * into v_row;

  perform cp_private.cp_append_event(v_row, null, 'pending_deploy', 'api',
                                 format('deploy of %s requested', v_row.docker_image_url));
  v_row := cp_private.cp_apply_instance_transition(
    v_row, 'deploying', 'api',
    format('asked the toolbox agent to pull %s and start it on port %s', v_row.docker_image_url, v_port));

  return jsonb_build_object('instance', cp_private.cp_instance_json(v_row), 'toolbox', cp_private.cp_toolbox_json(v_box));
end
$$;

-- ---------------------------------------------------------------------------------------------
-- Manage, step 1: check the action is allowed now, record the transitional status, and return
-- the instance and its toolbox for the DTMA call. p_plan maps each status the action may start
-- from to the status it records (restart: running -> stopping, stopped/error -> starting), as
-- defined in shared/core/lifecycle.py ACTIONS.
-- ---------------------------------------------------------------------------------------------
create or replace function cp_private.cp_begin_action(
  p_user_id uuid, p_instance_id uuid, p_action text, p_plan jsonb, p_message text,
  p_allow_internal boolean default false
) returns jsonb
language plpgsql
set search_path = ''
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
    perform cp_private.cp_raise('MC404', 'MCP server not found', jsonb_build_object('id', p_instance_id));
  end if;
  select * into v_box from public.account_tool_environments where id = v_row.account_tool_environment_id;
  if v_row.agent_unmanaged_at is not null and p_action <> 'remove' then
    perform cp_private.cp_raise('MC409',
      format('the toolbox agent no longer manages %s (it restarted and forgot the container), so it cannot %s '
             'it. Remove this server (the container stays on the droplet: docker rm -f %s there), then deploy '
             'it again', v_row.instance_name_on_toolbox, p_action, v_row.instance_name_on_toolbox),
      jsonb_build_object('status', v_row.status_on_toolbox, 'action', p_action, 'agent_manages', false));
  end if;
  if not (p_plan ? v_row.status_on_toolbox::text) then
    perform cp_private.cp_raise('MC409',
      format('cannot %s %s while it is %s', p_action, v_row.instance_name_on_toolbox, v_row.status_on_toolbox),
      jsonb_build_object('status', v_row.status_on_toolbox, 'action', p_action));
  end if;
  if p_action <> 'remove' then
    perform cp_private.cp_check_toolbox_commandable(v_box, p_allow_internal);
  end if;
  v_before := v_row;
  v_row := cp_private.cp_apply_instance_transition(
    v_row, (p_plan->>v_row.status_on_toolbox::text)::public.account_tool_installation_status_enum, 'api',
    p_message);
  return jsonb_build_object('instance', cp_private.cp_instance_json(v_row), 'toolbox', cp_private.cp_toolbox_json(v_box),
                            'previous_status', v_before.status_on_toolbox,
                            'previous_error', v_before.instance_error_message);
end
$$;

-- The instance a step 2 concerns, locked (its toolbox is not: see 0005's note on lock order), or
-- "MCP server not found". Every settling function starts here.
create or replace function cp_private.cp_lock_instance(p_instance_id uuid)
returns public.account_tool_instances
language plpgsql
set search_path = ''
as $$
declare
  v_row public.account_tool_instances;
begin
  select * into v_row from public.account_tool_instances where id = p_instance_id for update;
  if not found then
    perform cp_private.cp_raise('MC404', 'MCP server not found', jsonb_build_object('id', p_instance_id));
  end if;
  return v_row;
end
$$;

-- ---------------------------------------------------------------------------------------------
-- Step 2 of deploy and of every action: record what the DTMA said. p_to null keeps the status
-- (the DTMA did not answer in time: the heartbeat or the sweep's deadline settles it) and only
-- writes the event. p_runtime carries what the agent reported about the container.
-- ---------------------------------------------------------------------------------------------
create or replace function public.cp_settle(
  p_instance_id uuid, p_expected text, p_to text, p_message text,
  p_container_id text default null, p_runtime jsonb default null
) returns jsonb
language plpgsql
security definer
set search_path = ''
as $$
declare
  v_row public.account_tool_instances;
begin
  v_row := cp_private.cp_lock_instance(p_instance_id);
  if p_container_id is not null or p_runtime is not null then
    update public.account_tool_instances
       set container_id = coalesce(p_container_id, container_id),
           runtime_details = coalesce(p_runtime, runtime_details)
     where id = p_instance_id
    returning * into v_row;
  end if;
  if v_row.status_on_toolbox::text <> p_expected or p_to is null or p_to = p_expected then
    -- No answer in time (p_to null), or a heartbeat got there first (the status is no longer
    -- the expected one): the newer truth stands and the DTMA's answer is history.
    perform cp_private.cp_append_event(v_row, v_row.status_on_toolbox, v_row.status_on_toolbox, 'api', p_message);
  else
    v_row := cp_private.cp_apply_instance_transition(
      v_row, p_to::public.account_tool_installation_status_enum, 'api', p_message);
  end if;
  return cp_private.cp_instance_json(v_row);
end
$$;

-- An action that never reached the agent, or that the agent refused without touching the
-- container: back to the status (and error) it started from, with an event saying why. Guarded
-- like cp_settle: if a report moved the instance meanwhile, the newer truth stands and only the
-- event is written.
create or replace function public.cp_revert_action(
  p_instance_id uuid, p_expected text, p_previous text, p_previous_error text, p_message text
) returns jsonb
language plpgsql
security definer
set search_path = ''
as $$
declare
  v_row public.account_tool_instances;
begin
  v_row := cp_private.cp_lock_instance(p_instance_id);
  if v_row.status_on_toolbox::text <> p_expected then
    perform cp_private.cp_append_event(v_row, v_row.status_on_toolbox, v_row.status_on_toolbox, 'api', p_message);
    return cp_private.cp_instance_json(v_row);
  end if;
  v_row := cp_private.cp_apply_instance_transition(
    v_row, p_previous::public.account_tool_installation_status_enum, 'api', p_message);
  if p_previous = 'error' then
    update public.account_tool_instances set instance_error_message = p_previous_error
     where id = p_instance_id returning * into v_row;
  end if;
  return cp_private.cp_instance_json(v_row);
end
$$;

-- The agent answered 404 for a container it still lists: it no longer manages it (it restarted
-- and forgot it). The user keeps seeing that until the record is removed.
create or replace function public.cp_mark_agent_unmanaged(p_instance_id uuid, p_message text)
returns jsonb
language plpgsql
security definer
set search_path = ''
as $$
declare
  v_row public.account_tool_instances;
begin
  v_row := cp_private.cp_lock_instance(p_instance_id);
  if v_row.agent_unmanaged_at is null then
    update public.account_tool_instances set agent_unmanaged_at = now() where id = p_instance_id
    returning * into v_row;
    perform cp_private.cp_append_event(v_row, v_row.status_on_toolbox, v_row.status_on_toolbox, 'api', p_message);
  end if;
  return cp_private.cp_instance_json(v_row);
end
$$;

-- Remove, step 2: the DTMA confirmed (or the container was already gone). The row goes; its
-- events stay, ending with one that says so.
create or replace function public.cp_finish_removal(p_instance_id uuid, p_message text)
returns jsonb
language plpgsql
security definer
set search_path = ''
as $$
declare
  v_row public.account_tool_instances;
begin
  v_row := cp_private.cp_lock_instance(p_instance_id);
  if v_row.status_on_toolbox <> 'deleting' then
    perform cp_private.cp_raise('MC409', format('%s is %s, not deleting', v_row.instance_name_on_toolbox,
                                            v_row.status_on_toolbox),
                            jsonb_build_object('status', v_row.status_on_toolbox));
  end if;
  perform cp_private.cp_append_event(v_row, 'deleting', null, 'api', p_message);
  delete from public.account_tool_instances where id = p_instance_id;
  return jsonb_build_object('id', v_row.id, 'name', v_row.instance_name_on_toolbox, 'removed', true);
end
$$;

select cp_private.restrict_function_privileges();
