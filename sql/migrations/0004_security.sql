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
-- The events' identity sequence too (Supabase's defaults grant sequences to the API roles as well):
-- only the functions insert events.
revoke all on sequence public.account_tool_instance_events_id_seq from anon, authenticated;

-- Catalog and state machine: readable by signed-in users.
grant select on public.tool_catalog, public.instance_status_transitions to authenticated;
create policy "Authenticated users can view tool catalog" on public.tool_catalog
  for select to authenticated using (true);
create policy "Authenticated users can view the instance state machine" on public.instance_status_transitions
  for select to authenticated using (true);

-- Policies read the caller's id as `(select auth.uid())`, not `auth.uid()`: the sub-select is
-- evaluated once per statement instead of once per row (Supabase lint 0003_auth_rls_initplan).

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
  for select to authenticated using (user_id = (select auth.uid()));
create policy "Owners can rename their toolboxes" on public.account_tool_environments
  for update to authenticated using (user_id = (select auth.uid())) with check (user_id = (select auth.uid()));

-- Instances: readable by the toolbox owner (W10: not by every user); discovery metadata is the
-- only thing the web app writes itself.
grant select on public.account_tool_instances to authenticated;
grant update (mcp_discovery_metadata) on public.account_tool_instances to authenticated;
create policy "Owners can view instances on their toolboxes" on public.account_tool_instances
  for select to authenticated using (
    exists (select 1 from public.account_tool_environments e
            where e.id = account_tool_environment_id and e.user_id = (select auth.uid())));
create policy "Owners can annotate instances on their toolboxes" on public.account_tool_instances
  for update to authenticated using (
    exists (select 1 from public.account_tool_environments e
            where e.id = account_tool_environment_id and e.user_id = (select auth.uid())))
  with check (
    exists (select 1 from public.account_tool_environments e
            where e.id = account_tool_environment_id and e.user_id = (select auth.uid())));

-- Events: read-only history for the owner.
grant select on public.account_tool_instance_events to authenticated;
create policy "Owners can view events of their toolboxes" on public.account_tool_instance_events
  for select to authenticated using (
    exists (select 1 from public.account_tool_environments e
            where e.id = account_tool_environment_id and e.user_id = (select auth.uid())));

-- Functions: the RPCs in `public` are executable by the service role only, the helpers in
-- `cp_private` by no API role; see the rules at the top of 0002_tables.sql
-- (cp_private.restrict_function_privileges, run at the end of every migration that adds functions).

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
