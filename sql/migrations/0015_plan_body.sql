-- The plan's deploy body (shared/core/plan_body.py): what the person typed as the server's name
-- and the plan's discoveryMetadata are kept in mcp_discovery_metadata, in the same transaction as
-- the deploy. account_tool_instances has no display-name column; the container name
-- (instance_name_on_toolbox) is derived from the typed text, which is kept here as `display_name`.
-- The service's own keys (deployed_via, deployed_at) win over same-named keys of the plan's metadata.
-- A flat request carries neither, and its deploy is recorded exactly as before.

create or replace function public.cp_record_deploy_command(
  p_user_id uuid, p_toolbox_id uuid, p_spec jsonb, p_policy jsonb, p_command_id uuid, p_secret_env text
) returns jsonb
language plpgsql
security definer
set search_path = ''
as $$
declare
  v_recorded jsonb;
  v_row public.account_tool_instances;
begin
  v_recorded := cp_private.cp_record_deploy(p_user_id, p_toolbox_id, p_spec, p_policy);
  select * into v_row from public.account_tool_instances where id = (v_recorded->'instance'->>'id')::uuid;
  if p_spec ? 'display_name' or p_spec ? 'discovery_metadata' then
    update public.account_tool_instances
       set mcp_discovery_metadata = coalesce(p_spec->'discovery_metadata', '{}'::jsonb)
                                    || jsonb_strip_nulls(jsonb_build_object('display_name', p_spec->>'display_name'))
                                    || coalesce(mcp_discovery_metadata, '{}'::jsonb)
     where id = v_row.id
    returning * into v_row;
    v_recorded := jsonb_set(v_recorded, '{instance}', cp_private.cp_instance_json(v_row));
  end if;
  perform cp_private.cp_add_command(p_command_id, v_row, 'deploy', null, null, p_secret_env);
  return v_recorded || jsonb_build_object('command_id', p_command_id);
end
$$;

select cp_private.restrict_function_privileges();
