-- Who may read and write what, through Supabase's API roles.
--
-- The original gave owners `FOR ALL` on their toolbox rows, so a user could rewrite the IP the
-- backend then sent its key to, or the status (W3), and tables without RLS were writable by
-- anyone (W10). Here: owners READ their toolboxes, instances and events; they may rename their
-- toolbox and annotate their MCP servers, nothing else; every status, address and credential
-- column changes only through the functions (service role / table owner). Supabase grants ALL
-- on new tables to anon and authenticated by default, so everything is revoked first and
-- granted back column by column.

alter table public.tool_catalog enable row level security;
alter table public.account_tool_environments enable row level security;
alter table public.account_tool_instances enable row level security;
alter table public.account_tool_instance_events enable row level security;
alter table public.instance_status_transitions enable row level security;

revoke all on public.tool_catalog, public.account_tool_environments, public.account_tool_instances,
  public.account_tool_instance_events, public.instance_status_transitions from anon, authenticated;
grant all on public.tool_catalog, public.account_tool_environments, public.account_tool_instances,
  public.account_tool_instance_events, public.instance_status_transitions to service_role;

-- Catalog and state machine: readable by signed-in users.
grant select on public.tool_catalog, public.instance_status_transitions to authenticated;
create policy "Authenticated users can view tool catalog" on public.tool_catalog
  for select to authenticated using (true);
create policy "Authenticated users can view the instance state machine" on public.instance_status_transitions
  for select to authenticated using (true);

-- Toolboxes: every column but the token digest is readable by the owner; only the name and
-- description are writable.
grant select (
  id, user_id, name, description, do_droplet_id, do_droplet_name, public_ip_address, status,
  region_slug, size_slug, image_slug, last_heartbeat_at, dtma_last_known_version,
  dtma_health_details_json, provisioning_error_message, dtma_key_version, dtma_port,
  dtma_report_details_json, dtma_boot_id, dtma_last_seq, dtma_last_reached_at, status_changed_at, created_at,
  updated_at
) on public.account_tool_environments to authenticated;
grant update (name, description) on public.account_tool_environments to authenticated;
create policy "Owners can view their toolboxes" on public.account_tool_environments
  for select to authenticated using (user_id = auth.uid());
create policy "Owners can rename their toolboxes" on public.account_tool_environments
  for update to authenticated using (user_id = auth.uid()) with check (user_id = auth.uid());

-- Instances: readable by the toolbox owner (W10: not by every user); discovery metadata is the
-- only thing the web app writes itself.
grant select on public.account_tool_instances to authenticated;
grant update (mcp_discovery_metadata) on public.account_tool_instances to authenticated;
create policy "Owners can view instances on their toolboxes" on public.account_tool_instances
  for select to authenticated using (
    exists (select 1 from public.account_tool_environments e
            where e.id = account_tool_environment_id and e.user_id = auth.uid()));
create policy "Owners can annotate instances on their toolboxes" on public.account_tool_instances
  for update to authenticated using (
    exists (select 1 from public.account_tool_environments e
            where e.id = account_tool_environment_id and e.user_id = auth.uid()))
  with check (
    exists (select 1 from public.account_tool_environments e
            where e.id = account_tool_environment_id and e.user_id = auth.uid()));

-- Events: read-only history for the owner.
grant select on public.account_tool_instance_events to authenticated;
create policy "Owners can view events of their toolboxes" on public.account_tool_instance_events
  for select to authenticated using (
    exists (select 1 from public.account_tool_environments e
            where e.id = account_tool_environment_id and e.user_id = auth.uid()));

-- The cp_* functions are the backend's RPC surface. Postgres grants EXECUTE to PUBLIC and
-- Supabase to anon/authenticated by default; both are taken away so that PostgREST exposes
-- them to the service role only. Later migrations call this again after adding functions.
create or replace function public.cp_restrict_rpc_to_service_role() returns void
language plpgsql
as $$
declare
  f regprocedure;
begin
  for f in
    select p.oid::regprocedure from pg_proc p
    where p.pronamespace = 'public'::regnamespace and p.proname like 'cp\_%'
  loop
    execute format('revoke all on function %s from public, anon, authenticated', f);
    execute format('grant execute on function %s to service_role', f);
  end loop;
end
$$;
select public.cp_restrict_rpc_to_service_role();

-- Supabase Realtime: the web app subscribes to its instances and their events instead of
-- polling (docs/data-model.md, "Realtime"). RLS applies to what each subscriber receives.
do $$
declare
  t text;
begin
  if not exists (select 1 from pg_publication where pubname = 'supabase_realtime') then
    create publication supabase_realtime;
  end if;
  foreach t in array array['account_tool_environments', 'account_tool_instances', 'account_tool_instance_events'] loop
    if not exists (select 1 from pg_publication_tables
                   where pubname = 'supabase_realtime' and schemaname = 'public' and tablename = t) then
      execute format('alter publication supabase_realtime add table public.%I', t);
    end if;
  end loop;
end
$$;
