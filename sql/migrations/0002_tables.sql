-- Tables, with Agentopia's table and column names so the web app's
-- existing queries keep working. Deliberate departures from the original, each fixing a
-- known defect of the original (docs/original-defects.md), are marked "W<n>".

-- ---------------------------------------------------------------------------------------------
-- Functions: where they live, who may call them, how they resolve names. Every migration follows
-- these rules; tests/test_sql_security.py checks them on the migrated schema.
--
-- * `public` holds the tables and the RPC surface, nothing else: the cp_* functions the Python
--   code calls (`Database.call`, through psycopg or PostgREST). They are SECURITY DEFINER and
--   executable by `service_role` only, so PostgREST serves them to the service key and to no
--   one else.
-- * `cp_private` holds every other function: the helpers the RPCs share (state machine, errors,
--   JSON shapes, checks) and the trigger functions. PostgREST does not expose it (keep it out of
--   the API's exposed schemas), no API role has USAGE on it, and EXECUTE on its functions is
--   revoked from PUBLIC, anon, authenticated and service_role. The RPCs can call them because
--   they run as their owner (the migration role). Triggers fire without an EXECUTE check, so the
--   API roles' writes to a table still run them.
-- * Every function pins `set search_path = ''` and writes every name of ours schema-qualified
--   (`public.account_tool_instances`, `cp_private.cp_raise`); built-ins resolve in pg_catalog,
--   which is always searched. A body then means the same whatever search_path its caller has,
--   and no object a caller can create (a table in pg_temp, a function earlier on its path) can
--   stand in for ours. It is Supabase's recommendation (lint 0011_function_search_path_mutable),
--   and required of SECURITY DEFINER functions. An unqualified name of ours fails when it runs.
-- * PostgreSQL grants EXECUTE on each new function to PUBLIC, and on Supabase the default
--   privileges of `public` add anon, authenticated and service_role. Neither can be turned off
--   for one schema (per-schema ALTER DEFAULT PRIVILEGES can only add), and a database-wide
--   ALTER DEFAULT PRIVILEGES would change every function the migration role creates in this
--   shared database. So every migration that creates functions ends with
--   `select cp_private.restrict_function_privileges()`, in the same transaction: the default
--   grants are gone before anyone can see the functions.
-- ---------------------------------------------------------------------------------------------
create schema cp_private;
revoke all on schema cp_private from public;

-- Sets the privileges above on our functions: the cp_* functions of `public` executable by
-- service_role only, those of `cp_private` by no API role (only by their owner). Other
-- functions in `public` (a shared database may have some) are left alone.
create or replace function cp_private.restrict_function_privileges() returns void
language plpgsql
set search_path = ''
as $$
declare
  v_function regprocedure;
  v_rpc boolean;
begin
  for v_function, v_rpc in
    select p.oid::regprocedure, p.pronamespace = 'public'::regnamespace
      from pg_catalog.pg_proc p
     where (p.pronamespace = 'public'::regnamespace and p.proname like 'cp\_%')
        or p.pronamespace = 'cp_private'::regnamespace
  loop
    execute format('revoke all on function %s from public, anon, authenticated, service_role', v_function);
    if v_rpc then
      execute format('grant execute on function %s to service_role', v_function);
    end if;
  end loop;
end
$$;

create or replace function cp_private.trigger_set_timestamp() returns trigger
language plpgsql
set search_path = ''
as $$
begin
  new.updated_at = now();
  return new;
end
$$;

-- ---------------------------------------------------------------------------------------------
-- tool_catalog
-- ---------------------------------------------------------------------------------------------
create table public.tool_catalog (
  id uuid primary key default gen_random_uuid(),
  tool_name text not null constraint tool_catalog_tool_name_key unique,
  name text not null constraint tool_catalog_name_key unique,
  description text,
  developer_org_name text,
  categories text[],
  icon_url text,
  documentation_url text,
  packaging_type public.tool_packaging_type_enum not null default 'docker_image',
  package_identifier text not null,
  -- The image a deploy uses when the request names none. The original sent
  -- package_identifier and ignored the user's choice (W15); here the request's image wins and
  -- this column is only the default.
  docker_image_url text not null,
  version_info jsonb not null default '{"default_version": "latest", "available_versions": ["latest"]}',
  default_config_template jsonb default '{}',
  required_secrets_schema jsonb default '[]',
  resource_requirements jsonb default '{}',
  status public.catalog_tool_status_enum not null default 'available',
  category text,
  required_config_schema jsonb,
  required_capabilities_schema jsonb,
  provider text,
  version text not null default '1.0.0',
  is_public boolean default true,
  created_at timestamptz not null default now(),
  updated_at timestamptz not null default now()
);
create index idx_tool_catalog_status on public.tool_catalog (status);
create index idx_tool_catalog_category on public.tool_catalog (category);
create index idx_tool_catalog_categories on public.tool_catalog using gin (categories);
create trigger set_tool_catalog_updated_at before update on public.tool_catalog
  for each row execute function cp_private.trigger_set_timestamp();

-- The generic MCP catalog row every MCP server instance points at.
-- `docker_image_url` is a real, pullable reference MCP server so a deploy that names no image
-- starts something that works; Agentopia's `mcpserver/generic:latest` never existed.
insert into public.tool_catalog (
  id, tool_name, name, description, packaging_type, package_identifier, docker_image_url,
  category, provider, version, is_public, status, default_config_template,
  required_secrets_schema, resource_requirements
) values (
  '00000000-0000-0000-0000-000000000001', 'MCP Server', 'MCP Server',
  'Generic Model Context Protocol (MCP) Server - A standardized protocol for integrating external tools and resources with AI agents',
  'docker_image', 'mcp/everything:latest', 'mcp/everything:latest',
  'mcp', 'Official', '1.0.0', true, 'available',
  '{"transport": "stdio", "endpoint": "/mcp", "capabilities": ["tools", "resources", "prompts"]}',
  '[]', '{"memory": "256Mi", "cpu": "0.25"}'
)
on conflict (id) do update set
  docker_image_url = excluded.docker_image_url,
  package_identifier = excluded.package_identifier,
  updated_at = now();

-- ---------------------------------------------------------------------------------------------
-- account_tool_environments: one toolbox = one droplet running the DTMA
-- ---------------------------------------------------------------------------------------------
create table public.account_tool_environments (
  id uuid primary key default gen_random_uuid(),
  user_id uuid not null references auth.users (id) on delete cascade,
  name text,
  description text,
  do_droplet_id bigint constraint uq_do_droplet_id unique,
  do_droplet_name text,
  public_ip_address inet,
  status public.account_tool_environment_status_enum not null default 'inactive',
  region_slug text not null,
  size_slug text not null,
  image_slug text not null default 'ubuntu-22-04-x64',
  last_heartbeat_at timestamptz,
  dtma_last_known_version text,
  -- The agent's `system_status` from its last heartbeat, verbatim.
  dtma_health_details_json jsonb,
  provisioning_error_message text,
  -- W3: the DTMA token is never stored, only its SHA-256 digest (looked up by unique index).
  -- Replaces Agentopia's plaintext `dtma_bearer_token`.
  dtma_token_sha256 bytea constraint uq_ate_dtma_token_sha256 unique,
  -- W4: the key the backend sends to this DTMA is derived from a master secret, the toolbox id
  -- and this version; bumping it revokes the old key in both directions.
  dtma_key_version integer not null default 1 check (dtma_key_version >= 1),
  -- The DTMA's port when it is not the fleet default (the local stack and tests run several
  -- agents on one host). NULL means the configured DTMA_PORT (30000).
  dtma_port integer check (dtma_port between 1 and 65535),
  -- What the last heartbeat said besides system_status: unmanaged containers, Docker health,
  -- fields the agent sent that we do not model yet (agents evolve; nothing is thrown away).
  dtma_report_details_json jsonb not null default '{}',
  -- Heartbeat ordering (boot_id changes when the agent restarts, seq increases per beat).
  dtma_boot_id text,
  dtma_last_seq bigint,
  -- Last time the backend read the agent directly and it answered (mcp_status?refresh=true). Not a
  -- liveness signal (heartbeats are): it tells "the agent answers but its heartbeats do not
  -- arrive" apart from "the droplet is down".
  dtma_last_reached_at timestamptz,
  status_changed_at timestamptz not null default now(),
  created_at timestamptz not null default now(),
  updated_at timestamptz not null default now()
);
create index idx_ate_user_id on public.account_tool_environments (user_id);
create index idx_ate_status on public.account_tool_environments (status);
create index idx_ate_do_droplet_name on public.account_tool_environments (do_droplet_name);
-- The sweep looks for silent toolboxes among the live ones only.
create index idx_ate_liveness on public.account_tool_environments (last_heartbeat_at)
  where status in ('active', 'awaiting_heartbeat');
create trigger set_account_tool_environments_updated_at before update on public.account_tool_environments
  for each row execute function cp_private.trigger_set_timestamp();

-- ---------------------------------------------------------------------------------------------
-- account_tool_instances: one container on a toolbox; MCP servers are rows here
-- ---------------------------------------------------------------------------------------------
create table public.account_tool_instances (
  id uuid primary key default gen_random_uuid(),
  account_tool_environment_id uuid not null references public.account_tool_environments (id) on delete cascade,
  tool_catalog_id uuid not null references public.tool_catalog (id) on delete restrict,
  status_on_toolbox public.account_tool_installation_status_enum not null default 'pending_install',
  -- The Docker container name. W16: unique per toolbox (below), and restricted to what Docker
  -- accepts, so nothing a user types reaches the droplet as anything but a name.
  instance_name_on_toolbox text not null
    check (instance_name_on_toolbox ~ '^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$'),
  config_values jsonb default '{}',
  -- What was asked of the DTMA, minus secret values: {"Env": ["NAME=<redacted>"], "HostConfig": ...}.
  base_config_override_json jsonb,
  port_mapping_json jsonb,
  version text,
  -- The last heartbeat that reported this instance's container (database clock).
  last_heartbeat_from_dtma timestamptz,
  instance_error_message text,
  -- W15: the image actually deployed (the user's choice, or the catalog default).
  docker_image_url text,
  container_port integer check (container_port between 1 and 65535),
  host_port integer check (host_port between 1 and 65535),
  -- Names of the environment variables passed at deploy; the values are secrets and are
  -- never stored.
  env_var_names text[] not null default '{}',
  container_id text,
  -- What the DTMA last reported about the container: Docker state and status text, exit code,
  -- image, ports.
  runtime_details jsonb not null default '{}',
  -- Consecutive container-format heartbeats that did not list this container.
  missing_heartbeats integer not null default 0,
  -- When the toolbox agent was first seen not to manage this container (it restarted and forgot
  -- it: it answers 404 for it); null while it does. Users keep seeing it until the record goes.
  agent_unmanaged_at timestamptz,
  status_changed_at timestamptz not null default now(),
  mcp_server_type text
    constraint account_tool_instances_mcp_server_type_check
    check (mcp_server_type is null or mcp_server_type in ('standard_tool', 'mcp_server')),
  mcp_endpoint_path text check (mcp_endpoint_path is null or mcp_endpoint_path ~ '^/[A-Za-z0-9/._~-]{0,200}$'),
  mcp_transport_type text
    constraint account_tool_instances_mcp_transport_type_check
    check (mcp_transport_type is null or mcp_transport_type in ('stdio', 'sse', 'websocket', 'streamable_http')),
  mcp_server_capabilities jsonb,
  mcp_discovery_metadata jsonb,
  created_at timestamptz not null default now(),
  updated_at timestamptz not null default now(),
  constraint chk_mcp_server_required_fields check (
    mcp_server_type is null or mcp_server_type = 'standard_tool'
    or (mcp_server_type = 'mcp_server' and mcp_transport_type is not null)
  ),
  constraint uq_instance_name_per_toolbox unique (account_tool_environment_id, instance_name_on_toolbox),
  constraint uq_host_port_per_toolbox unique (account_tool_environment_id, host_port)
);
create index idx_ateat_tool_catalog_id on public.account_tool_instances (tool_catalog_id);
create index idx_ateat_status on public.account_tool_instances (status_on_toolbox);
-- The sweep's deadline scan touches only instances in a transitional status.
create index idx_ati_transitional on public.account_tool_instances (status_changed_at)
  where status_on_toolbox in ('pending_deploy', 'deploying', 'starting', 'stopping', 'deleting');
create index idx_account_tool_instances_mcp_server_type on public.account_tool_instances (account_tool_environment_id)
  where mcp_server_type = 'mcp_server';
create trigger set_account_tool_instances_updated_at before update on public.account_tool_instances
  for each row execute function cp_private.trigger_set_timestamp();

-- ---------------------------------------------------------------------------------------------
-- account_tool_instance_events: append-only history of status transitions. It is the
-- deployment progress the web app shows, and it survives the instance's removal (no foreign
-- key to the instance), so "what happened to X" can still be answered after X is gone.
-- ---------------------------------------------------------------------------------------------
create table public.account_tool_instance_events (
  id bigint generated always as identity primary key,
  account_tool_instance_id uuid not null,
  account_tool_environment_id uuid not null references public.account_tool_environments (id) on delete cascade,
  instance_name_on_toolbox text not null,
  from_status public.account_tool_installation_status_enum,
  to_status public.account_tool_installation_status_enum,
  source public.instance_event_source_enum not null,
  message text not null,
  at timestamptz not null default now()
);
create index idx_atie_instance on public.account_tool_instance_events (account_tool_instance_id, id desc);
create index idx_atie_environment on public.account_tool_instance_events (account_tool_environment_id);

create or replace function cp_private.forbid_event_update() returns trigger
language plpgsql
set search_path = ''
as $$
begin
  raise exception 'account_tool_instance_events is append-only'
    using errcode = 'MC409';
end
$$;
create trigger account_tool_instance_events_append_only before update on public.account_tool_instance_events
  for each row execute function cp_private.forbid_event_update();

select cp_private.restrict_function_privileges();
