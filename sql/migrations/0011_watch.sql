-- The watch stream (mcp_status?watch=true, docs/watch.md) and Supabase Realtime (docs/realtime.md).
--
-- mcp_server_changes is a change log with ids only: which of a user's MCP servers changed or went,
-- written by the triggers below in the same transaction as the change itself, each also sending
-- `pg_notify('cp_changes', <user id>)`. PostgreSQL folds identical notifications of one
-- transaction, so a heartbeat that changes 20 servers of one owner is one notification. A watcher
-- re-reads the changed servers through the same owner-scoped rendering as the list
-- (cp_private.cp_server_items, shared with cp_list_mcp_servers).
--
-- Why the resume cursor is a snapshot, not a sequence number: identity values are handed out when
-- a row is inserted, but transactions commit in another order. A reader that saw seq 11 committed
-- while seq 10's transaction was still open would move its cursor past 10 and never see it. So
-- each row carries the id of the transaction that wrote it (`xid`), and the cursor is the
-- reader's snapshot (pg_current_snapshot(), "xmin:xmax:in-progress"): the next read returns the
-- rows whose transaction that snapshot did not see (xid >= its xmin and not visible in it).
-- Nothing committed later can be skipped, whatever the commit order.
--
-- Removals: a Realtime DELETE on a table with RLS carries only the primary key and is not filtered
-- by owner, so the change log's INSERT of kind 'removed' (which carries user_id and RLS applies
-- to) is how a Realtime subscriber sees a server go. The log is published to supabase_realtime.

create table public.mcp_server_changes (
  seq bigint generated always as identity primary key,
  user_id uuid not null,
  instance_id uuid not null,
  toolbox_id uuid,
  kind text not null check (kind in ('changed', 'removed')),
  -- The writing transaction (top level): what the snapshot cursor is compared with.
  xid xid8 not null default pg_current_xact_id(),
  at timestamptz not null default now()
);
-- A watcher's read: its user's rows from the cursor's xmin on.
create index idx_msc_user_xid on public.mcp_server_changes (user_id, xid);
-- Pruning, oldest first.
create index idx_msc_at on public.mcp_server_changes (at);

-- Owners read their own rows (Realtime applies this policy to every INSERT it sends).
alter table public.mcp_server_changes enable row level security;
revoke all on public.mcp_server_changes from anon, authenticated;
grant all on public.mcp_server_changes to service_role;
grant select on public.mcp_server_changes to authenticated;
revoke all on sequence public.mcp_server_changes_seq_seq from anon, authenticated;
create policy "Owners can view changes of their servers" on public.mcp_server_changes
  for select to authenticated using (user_id = (select auth.uid()));

-- The highest transaction id whose rows pruning deleted: a cursor whose snapshot would still need
-- one of them (its xmin is not above it) has lost changes and is answered `expired`.
create table cp_private.watch_horizon (
  id boolean primary key default true check (id),
  pruned_xid xid8 not null default '0'::xid8
);
revoke all on cp_private.watch_horizon from public;
insert into cp_private.watch_horizon default values;

-- ---------------------------------------------------------------------------------------------
-- Writing the log
-- ---------------------------------------------------------------------------------------------
-- Every MCP server of one toolbox, as one statement (toolbox status changes, a toolbox heard from
-- again after silence, a toolbox deleted).
create or replace function cp_private.cp_watch_log_toolbox(p_toolbox_id uuid, p_user_id uuid, p_kind text)
returns void
language plpgsql
set search_path = ''
as $$
begin
  insert into public.mcp_server_changes (user_id, instance_id, toolbox_id, kind)
  select p_user_id, i.id, p_toolbox_id, p_kind
    from public.account_tool_instances i
   where i.account_tool_environment_id = p_toolbox_id and i.mcp_server_type = 'mcp_server';
  if found then
    perform pg_notify('cp_changes', p_user_id::text);
  end if;
end
$$;

-- A toolbox that reports again after a silence: its servers' effective status and health change
-- although no stored value does (they were `unknown` or degraded by heartbeat age only). Called by
-- cp_ingest_heartbeat when the previous beat is older than one missed beat.
create or replace function cp_private.cp_watch_toolbox_heard(p_toolbox_id uuid)
returns void
language plpgsql
set search_path = ''
as $$
declare
  v_user_id uuid;
begin
  select e.user_id into v_user_id from public.account_tool_environments e where e.id = p_toolbox_id;
  if found then
    perform cp_private.cp_watch_log_toolbox(p_toolbox_id, v_user_id, 'changed');
  end if;
end
$$;

-- The trigger functions write the log themselves rather than call the helpers above: a trigger
-- runs as whoever wrote the row (the service role writes tables directly too), and only the
-- functions' owner may execute what is in cp_private.
create or replace function cp_private.cp_watch_instance_trigger() returns trigger
language plpgsql
set search_path = ''
as $$
declare
  v_row public.account_tool_instances := case when tg_op = 'DELETE' then old else new end;
  v_user_id uuid;
begin
  select e.user_id into v_user_id from public.account_tool_environments e where e.id = v_row.account_tool_environment_id;
  if v_user_id is not null then  -- null: the toolbox is gone (a cascade), its own trigger logged the removals
    insert into public.mcp_server_changes (user_id, instance_id, toolbox_id, kind)
    values (v_user_id, v_row.id, v_row.account_tool_environment_id,
            case when tg_op = 'DELETE' then 'removed' else 'changed' end);
    perform pg_notify('cp_changes', v_user_id::text);
  end if;
  return null;
end
$$;

-- Inserts and deletes of MCP servers; updates of what the answer shows. Not: the per-beat stamps
-- (last_heartbeat_from_dtma, missing_heartbeats, runtime_details' "Up 5 minutes", updated_at),
-- so a steady heartbeat fires nothing; nor mcp_discovery_metadata, the one column owners write
-- themselves through PostgREST (a trigger running as `authenticated` may not write the log).
create trigger mcp_server_changes_on_instance_insert after insert on public.account_tool_instances
  for each row when (new.mcp_server_type = 'mcp_server')
  execute function cp_private.cp_watch_instance_trigger();
create trigger mcp_server_changes_on_instance_update after update on public.account_tool_instances
  for each row when ((new.mcp_server_type = 'mcp_server' or old.mcp_server_type = 'mcp_server') and (
    old.status_on_toolbox, old.status_changed_at, old.instance_error_message, old.docker_image_url,
    old.host_port, old.container_port, old.port_mapping_json, old.container_id, old.mcp_endpoint_path,
    old.mcp_transport_type, old.mcp_server_capabilities, old.agent_unmanaged_at, old.instance_name_on_toolbox,
    old.mcp_server_type, old.account_tool_environment_id)
    is distinct from (
    new.status_on_toolbox, new.status_changed_at, new.instance_error_message, new.docker_image_url,
    new.host_port, new.container_port, new.port_mapping_json, new.container_id, new.mcp_endpoint_path,
    new.mcp_transport_type, new.mcp_server_capabilities, new.agent_unmanaged_at, new.instance_name_on_toolbox,
    new.mcp_server_type, new.account_tool_environment_id))
  execute function cp_private.cp_watch_instance_trigger();
create trigger mcp_server_changes_on_instance_delete after delete on public.account_tool_instances
  for each row when (old.mcp_server_type = 'mcp_server')
  execute function cp_private.cp_watch_instance_trigger();

-- A new event is a new line of the server's progress timeline.
create or replace function cp_private.cp_watch_event_trigger() returns trigger
language plpgsql
set search_path = ''
as $$
declare
  v_user_id uuid;
begin
  select e.user_id into v_user_id
    from public.account_tool_instances i
    join public.account_tool_environments e on e.id = i.account_tool_environment_id
   where i.id = new.account_tool_instance_id and i.mcp_server_type = 'mcp_server';
  if v_user_id is not null then
    insert into public.mcp_server_changes (user_id, instance_id, toolbox_id, kind)
    values (v_user_id, new.account_tool_instance_id, new.account_tool_environment_id, 'changed');
    perform pg_notify('cp_changes', v_user_id::text);
  end if;
  return null;
end
$$;
create trigger mcp_server_changes_on_event after insert on public.account_tool_instance_events
  for each row execute function cp_private.cp_watch_event_trigger();

-- An MCP check changes what the answer shows when readiness flips, on the first answer of the
-- container's current run (a check older than the last status change does not count), or when a
-- failing check's sentence changes. A re-check that says the same again fires nothing.
create or replace function cp_private.cp_watch_probe_trigger() returns trigger
language plpgsql
set search_path = ''
as $$
declare
  v_box uuid;
  v_user_id uuid;
  v_changed_at timestamptz;
begin
  select i.account_tool_environment_id, e.user_id, i.status_changed_at into v_box, v_user_id, v_changed_at
    from public.account_tool_instances i
    join public.account_tool_environments e on e.id = i.account_tool_environment_id
   where i.id = new.account_tool_instance_id;
  if not found then
    return null;
  end if;
  if tg_op = 'INSERT' or old.checked_at is null or old.checked_at < v_changed_at
     or old.ready is distinct from new.ready or old.tool_count is distinct from new.tool_count
     or (new.ready is not true and old.result->>'sentence' is distinct from new.result->>'sentence') then
    insert into public.mcp_server_changes (user_id, instance_id, toolbox_id, kind)
    values (v_user_id, new.account_tool_instance_id, v_box, 'changed');
    perform pg_notify('cp_changes', v_user_id::text);
  end if;
  return null;
end
$$;
create trigger mcp_server_changes_on_probe_insert after insert on public.mcp_endpoint_probes
  for each row when (new.checked_at is not null)
  execute function cp_private.cp_watch_probe_trigger();
create trigger mcp_server_changes_on_probe_update after update on public.mcp_endpoint_probes
  for each row when (new.checked_at is not null and new.checked_at is distinct from old.checked_at)
  execute function cp_private.cp_watch_probe_trigger();

-- The toolbox's state as its servers show it: status, address, Docker's health, a direct read of
-- the agent. Every heartbeat rewrites the row (last_heartbeat_at and the report), and then the
-- WHEN clause is false and nothing runs. Not the name: owners rename toolboxes through PostgREST.
create or replace function cp_private.cp_watch_toolbox_trigger() returns trigger
language plpgsql
set search_path = ''
as $$
declare
  v_box public.account_tool_environments := case when tg_op = 'DELETE' then old else new end;
begin
  insert into public.mcp_server_changes (user_id, instance_id, toolbox_id, kind)
  select v_box.user_id, i.id, v_box.id, case when tg_op = 'DELETE' then 'removed' else 'changed' end
    from public.account_tool_instances i
   where i.account_tool_environment_id = v_box.id and i.mcp_server_type = 'mcp_server';
  if found then
    perform pg_notify('cp_changes', v_box.user_id::text);
  end if;
  return case when tg_op = 'DELETE' then old end;
end
$$;
create trigger mcp_server_changes_on_toolbox_update after update on public.account_tool_environments
  for each row when (
    (old.status, old.public_ip_address, old.provisioning_error_message, old.dtma_last_reached_at,
     old.dtma_report_details_json->'docker', old.user_id)
    is distinct from
    (new.status, new.public_ip_address, new.provisioning_error_message, new.dtma_last_reached_at,
     new.dtma_report_details_json->'docker', new.user_id))
  execute function cp_private.cp_watch_toolbox_trigger();
-- BEFORE: the cascade deletes the servers after the toolbox, when their owner can no longer be read.
create trigger mcp_server_changes_on_toolbox_delete before delete on public.account_tool_environments
  for each row execute function cp_private.cp_watch_toolbox_trigger();

-- ---------------------------------------------------------------------------------------------
-- Servers as mcp_status renders them: the list (cp_list_mcp_servers) and the watch
-- (cp_watch_changes) both build their items here, so a watched server is exactly a listed one.
-- Given ids, owner-scoped (p_user_id's MCP servers only; other ids are simply not returned).
-- Timeline: the newest 5 events; `tools` only when asked for (one server). A set-returning function
-- called once per statement: a per-row function (not inlinable, since it pins search_path) costs
-- ~25% of the list's time at 100 servers.
-- ---------------------------------------------------------------------------------------------
create or replace function cp_private.cp_server_items(p_user_id uuid, p_ids uuid[], p_with_tools boolean)
returns table (id uuid, created_at timestamptz, item jsonb)
language sql
stable
set search_path = ''
as $$
  select p.id, p.created_at,
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
         || case when p_with_tools then jsonb_build_object('tools', coalesce(pr.tools, '[]'::jsonb))
                 else '{}'::jsonb end
    from public.account_tool_instances p
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
   where p.id = any(p_ids) and e.user_id = p_user_id and p.mcp_server_type = 'mcp_server'
$$;

-- mcp_status's list, exactly as in 0009_mcp_health.sql, its items now built by cp_server_items.
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
    select i.id, i.created_at, row_number() over (order by i.created_at, i.id) as ord
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
  ), shown as (
    select s.id, s.item
      from cp_private.cp_server_items(p_user_id, array(select p.id from page p where p.ord <= v_limit),
                                      p_id is not null) s
  )
  select jsonb_build_object(
           'items', coalesce((select jsonb_agg(s.item order by p.ord) from page p join shown s on s.id = p.id),
                             '[]'::jsonb),
           'next_cursor', (select case when count(*) > v_limit
                                       then (array_agg(jsonb_build_object('created_at', p.created_at, 'id', p.id)
                                                       order by p.ord desc) filter (where p.ord <= v_limit))[1]
                                  end
                             from page p),
           'now', now())
    into v_result;

  if p_id is not null and jsonb_array_length(v_result->'items') = 0 then
    perform cp_private.cp_raise('MC404', 'MCP server not found', jsonb_build_object('id', p_id));
  end if;
  return v_result;
end
$$;

-- ---------------------------------------------------------------------------------------------
-- The watch's read, one round trip: what changed for p_user_id since the cursor p_since (a
-- snapshot this function returned), the changed servers rendered, and the new cursor.
--   * p_since null: a snapshot, every server of the user (at most p_limit, oldest first;
--     `truncated` when there are more) and `snapshot: true`.
--   * p_also: server ids to render again although the log has nothing for them (the watch's
--     time-driven re-reads: a silent toolbox's servers turning `unknown` write nothing).
--   * `removed`: ids whose last logged change is a removal, or that changed but are no longer in
--     the user's view (gone since, or moved out of p_toolbox_id).
--   * `expired`: the cursor needs rows pruning deleted (or comes from another database); the
--     caller starts again with a snapshot.
-- STABLE: every statement here reads the snapshot of the calling query, which is also the cursor
-- returned, so what is answered and the cursor agree exactly.
-- ---------------------------------------------------------------------------------------------
create or replace function public.cp_watch_changes(
  p_user_id uuid,
  p_since text default null,
  p_toolbox_id uuid default null,
  p_also jsonb default null,
  p_limit int default 1000
) returns jsonb
language plpgsql stable
security definer
set search_path = ''
as $$
declare
  v_now pg_snapshot := pg_current_snapshot();
  v_since pg_snapshot;
  v_limit int := least(greatest(coalesce(p_limit, 1000), 1), 5000);
  v_changed uuid[];
  v_removed uuid[];
  v_items jsonb;
  v_removed_json jsonb;
  v_count int;
begin
  if p_since is null then
    select coalesce(jsonb_agg(x.item order by x.created_at, x.id), '[]'::jsonb), count(*)
      into v_items, v_count
      from cp_private.cp_server_items(p_user_id, array(
             select i.id
               from public.account_tool_instances i
               join public.account_tool_environments e on e.id = i.account_tool_environment_id
              where e.user_id = p_user_id and i.mcp_server_type = 'mcp_server'
                and (p_toolbox_id is null or i.account_tool_environment_id = p_toolbox_id)
              order by i.created_at, i.id
              limit v_limit), false) x;
    return jsonb_build_object('cursor', v_now::text, 'now', now(), 'snapshot', true, 'expired', false,
                              'items', v_items, 'removed', '[]'::jsonb, 'truncated', v_count >= v_limit);
  end if;

  begin
    v_since := p_since::pg_snapshot;
  exception when others then
    perform cp_private.cp_raise('MC400', 'since: is not a cursor this API issued', jsonb_build_object('field', 'since'));
  end;
  if pg_snapshot_xmin(v_since) <= (select h.pruned_xid from cp_private.watch_horizon h)
     or pg_snapshot_xmax(v_since) > pg_snapshot_xmax(v_now) then
    return jsonb_build_object('cursor', null, 'now', now(), 'snapshot', false, 'expired', true,
                              'items', '[]'::jsonb, 'removed', '[]'::jsonb, 'truncated', false);
  end if;

  with latest as (
    select distinct on (c.instance_id) c.instance_id, c.kind
      from public.mcp_server_changes c
     where c.user_id = p_user_id
       and c.xid >= pg_snapshot_xmin(v_since)
       and not pg_visible_in_snapshot(c.xid, v_since)
       and (p_toolbox_id is null or c.toolbox_id = p_toolbox_id)
     order by c.instance_id, c.seq desc
  )
  select coalesce(array_agg(l.instance_id) filter (where l.kind = 'changed'), '{}'),
         coalesce(array_agg(l.instance_id) filter (where l.kind = 'removed'), '{}')
    into v_changed, v_removed
    from latest l;
  if p_also is not null and jsonb_typeof(p_also) = 'array' then
    v_changed := v_changed || array(select a::uuid from jsonb_array_elements_text(p_also) a
                                     where a ~ '^[0-9a-fA-F-]{36}$');
  end if;

  with shown as (
    select x.item, x.id, x.created_at
      from cp_private.cp_server_items(p_user_id, array(select c from unnest(v_changed) c
                                                        where not c = any(v_removed)), false) x
      join public.account_tool_instances i on i.id = x.id
     where p_toolbox_id is null or i.account_tool_environment_id = p_toolbox_id
  )
  select coalesce((select jsonb_agg(s.item order by s.created_at, s.id) from shown s), '[]'::jsonb),
         (select coalesce(jsonb_agg(distinct r), '[]'::jsonb)
            from unnest(v_removed || array(select c from unnest(v_changed) c
                                            where c not in (select s.id from shown s))) r)
    into v_items, v_removed_json;
  return jsonb_build_object('cursor', v_now::text, 'now', now(), 'snapshot', false, 'expired', false,
                            'items', v_items, 'removed', v_removed_json, 'truncated', false);
end
$$;

-- ---------------------------------------------------------------------------------------------
-- Retention: rows older than p_keep, at most p_batch_size, and only rows every snapshot taken from
-- now on already sees (xid below this snapshot's xmin), so a cursor issued after this prune never
-- needs a deleted row; the highest deleted xid is kept so that older cursors are told `expired`.
-- ---------------------------------------------------------------------------------------------
create or replace function cp_private.cp_prune_watch_changes(p_keep interval, p_batch_size int)
returns int
language plpgsql
set search_path = ''
as $$
declare
  v_deleted int;
  v_max xid8;
begin
  with gone as (
    delete from public.mcp_server_changes c
     where c.seq = any(array(
             select d.seq from public.mcp_server_changes d
              where d.at < now() - p_keep and d.xid < pg_snapshot_xmin(pg_current_snapshot())
              order by d.at
              limit p_batch_size))
    returning c.xid
  )
  select count(*), max(g.xid) into v_deleted, v_max from gone g;
  if v_max is not null then
    update cp_private.watch_horizon set pruned_xid = greatest(pruned_xid, v_max);
  end if;
  return v_deleted;
end
$$;

-- cp_prune_history (0010_operations.sql), unchanged but for pruning the change log too.
create or replace function public.cp_prune_history(
  p_events_retention_days int,
  p_commands_retention_days int,
  p_keep_events_per_instance int,
  p_batch_size int
) returns jsonb
language plpgsql
security definer
set search_path = ''
as $$
declare
  v_events_before timestamptz;
  v_commands_before timestamptz;
  v_cursor cp_private.retention_cursor;
  v_examined int := 0;
  v_events int := 0;
  v_commands int := 0;
  v_last_at timestamptz;
  v_last_id bigint;
begin
  if p_events_retention_days is null or p_events_retention_days < 1
     or p_commands_retention_days is null or p_commands_retention_days < 1
     or p_keep_events_per_instance is null or p_keep_events_per_instance < 0
     or p_batch_size is null or p_batch_size < 1 or p_batch_size > 50000 then
    perform cp_private.cp_raise('MC400', 'retention parameters out of range',
      jsonb_build_object('events_retention_days', p_events_retention_days,
                         'commands_retention_days', p_commands_retention_days,
                         'keep_events_per_instance', p_keep_events_per_instance, 'batch_size', p_batch_size));
  end if;
  v_events_before := now() - make_interval(days => p_events_retention_days);
  v_commands_before := now() - make_interval(days => p_commands_retention_days);

  -- `= any(array(...))`: the batch's rows by primary key (a join with the picked ids is planned as a
  -- scan of the whole table).
  delete from public.dtma_commands c
   where c.id = any(array(
           select d.id from public.dtma_commands d
            where d.finished_at < v_commands_before and d.status in ('done', 'failed', 'superseded')
            order by d.finished_at
            limit p_batch_size
              for update skip locked));
  get diagnostics v_commands = row_count;

  select r.* into v_cursor from cp_private.retention_cursor r where r.name = 'events' for update skip locked;
  if found then
    with examined as materialized (
      select e.id, e.at, e.account_tool_instance_id
        from public.account_tool_instance_events e
       where e.at < v_events_before
         and (e.at, e.id) > (v_cursor.after_at, v_cursor.after_id)
       order by e.at, e.id
       limit p_batch_size
    ), deleted as (
      -- Per examined event, two index probes: its server's row (gone?), and its server's
      -- p_keep-th newest event.
      delete from public.account_tool_instance_events e
       where e.id = any(array(
               select x.id from examined x
                where p_keep_events_per_instance = 0
                   or (select i.id from public.account_tool_instances i where i.id = x.account_tool_instance_id) is null
                   or x.id < (select k.id from public.account_tool_instance_events k
                               where k.account_tool_instance_id = x.account_tool_instance_id
                               order by k.id desc
                               offset greatest(p_keep_events_per_instance - 1, 0) limit 1)))
      returning 1
    )
    select (select count(*) from examined),
           (select count(*) from deleted),
           (select x.at from examined x order by x.at desc, x.id desc limit 1),
           (select x.id from examined x order by x.at desc, x.id desc limit 1)
      into v_examined, v_events, v_last_at, v_last_id;
    if v_examined < p_batch_size then
      update cp_private.retention_cursor
         set after_at = '-infinity', after_id = 0, passes = passes + 1
       where name = 'events';
    else
      update cp_private.retention_cursor set after_at = v_last_at, after_id = v_last_id where name = 'events';
    end if;
  end if;

  -- The watch's change log (0011_watch.sql): an hour is far longer than any reconnect takes.
  perform cp_private.cp_prune_watch_changes(interval '1 hour', p_batch_size);

  return jsonb_build_object('events_deleted', v_events, 'events_examined', v_examined,
                            'commands_deleted', v_commands,
                            'more', v_commands >= p_batch_size or v_examined >= p_batch_size);
end
$$;

-- ---------------------------------------------------------------------------------------------
-- Supabase Realtime (docs/realtime.md): the change log joins the instances, their events and the
-- toolboxes in the publication. Replica identity stays DEFAULT (the primary key) on all of them:
-- on a table with RLS, Realtime sends only the primary key of an old record whatever the replica
-- identity, so FULL would cost WAL volume and give a subscriber nothing. Removals reach
-- subscribers as INSERTs of kind 'removed' into mcp_server_changes.
-- ---------------------------------------------------------------------------------------------
do $$
declare
  t text;
begin
  if not exists (select 1 from pg_publication where pubname = 'supabase_realtime') then
    create publication supabase_realtime;
  end if;
  foreach t in array array['account_tool_environments', 'account_tool_instances', 'account_tool_instance_events',
                           'mcp_server_changes'] loop
    if not exists (select 1 from pg_publication_tables
                   where pubname = 'supabase_realtime' and schemaname = 'public' and tablename = t) then
      execute format('alter publication supabase_realtime add table public.%I', t);
    end if;
    execute format('alter table public.%I replica identity default', t);
  end loop;
end
$$;

select cp_private.restrict_function_privileges();
