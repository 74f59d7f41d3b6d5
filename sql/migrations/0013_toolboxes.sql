-- The caller's toolboxes, for the web console's toolbox list and deploy form (mcp_status/toolboxes).
-- Same owner scope and the same liveness inputs as cp_list_mcp_servers' toolbox block, so a
-- toolbox and its servers never disagree about staleness; one round trip.

create or replace function public.cp_list_toolboxes(p_user_id uuid)
returns jsonb
language sql
stable
security definer
set search_path = ''
as $$
  select jsonb_build_object(
    'now', now(),
    'items', coalesce(jsonb_agg(jsonb_build_object(
      'id', e.id, 'name', e.name, 'region_slug', e.region_slug, 'status', e.status,
      'public_ip_address', host(e.public_ip_address), 'last_heartbeat_at', e.last_heartbeat_at,
      'heartbeat_age_seconds', extract(epoch from now() - e.last_heartbeat_at),
      'dtma_last_known_version', e.dtma_last_known_version,
      'dtma_last_reached_at', e.dtma_last_reached_at,
      'reached_age_seconds', extract(epoch from now() - e.dtma_last_reached_at),
      'provisioning_error_message', e.provisioning_error_message,
      'docker_error', case when e.dtma_report_details_json->'docker'->>'healthy' = 'false'
                           then coalesce(e.dtma_report_details_json->'docker'->>'error', 'unknown error') end,
      'server_count', (select count(*) from public.account_tool_instances i
                        where i.account_tool_environment_id = e.id),
      'created_at', e.created_at)
      order by e.created_at, e.id), '[]'::jsonb))
  from public.account_tool_environments e
  where e.user_id = p_user_id
    and e.status not in ('deprovisioned');
$$;

select cp_private.restrict_function_privileges();
