-- Enums, in their own migration because Postgres refuses to USE an enum value added by
-- `ALTER TYPE ... ADD VALUE` inside the transaction that added it. Later migrations use them.
--
-- Each type is created when missing and otherwise extended, so this applies both to a fresh
-- database and to one that still carries Agentopia's original (shorter) enums. The values are
-- Agentopia's, in Agentopia's order; we add none of the strings the original
-- code wrote that were never members (W11): every status this project writes is listed here.

do $$
declare
  v text;
begin
  if to_regtype('public.account_tool_environment_status_enum') is null then
    create type public.account_tool_environment_status_enum as enum ('inactive');
  end if;
  foreach v in array array[
    'inactive', 'pending_creation', 'creating', 'active', 'error_creation', 'pending_deletion',
    'deleting', 'error_deletion', 'unresponsive', 'scaling', 'pending_provision', 'provisioning',
    'error_provisioning', 'pending_deprovision', 'deprovisioning', 'deprovisioned',
    'error_deprovisioning', 'awaiting_heartbeat'
  ] loop
    execute format('alter type public.account_tool_environment_status_enum add value if not exists %L', v);
  end loop;

  if to_regtype('public.account_tool_installation_status_enum') is null then
    create type public.account_tool_installation_status_enum as enum ('pending_install');
  end if;
  foreach v in array array[
    'pending_install', 'installing', 'active', 'error_install', 'pending_uninstall', 'uninstalling',
    'uninstalled', 'error_uninstall', 'pending_config', 'stopped', 'starting', 'stopping',
    'error_runtime', 'disabled', 'pending_deploy', 'deploying', 'running', 'error', 'pending_delete',
    'deleting'
  ] loop
    execute format('alter type public.account_tool_installation_status_enum add value if not exists %L', v);
  end loop;

  if to_regtype('public.tool_packaging_type_enum') is null then
    create type public.tool_packaging_type_enum as enum ('docker_image');
  end if;

  if to_regtype('public.catalog_tool_status_enum') is null then
    create type public.catalog_tool_status_enum as enum ('available');
  end if;
  foreach v in array array['available', 'beta', 'experimental', 'deprecated', 'archived'] loop
    execute format('alter type public.catalog_tool_status_enum add value if not exists %L', v);
  end loop;

  -- Who caused an instance status change: the web app through a function, an agent heartbeat,
  -- the scheduled sweep, or a direct read of the DTMA (mcp_status?refresh=true).
  if to_regtype('public.instance_event_source_enum') is null then
    create type public.instance_event_source_enum as enum ('api', 'heartbeat', 'sweep', 'dtma');
  end if;
end
$$;
