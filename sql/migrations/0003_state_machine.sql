-- The instance state machine, enforced in the database.
--
-- Every status change goes through cp_private.cp_apply_instance_transition, which checks the pair
-- (from, to) and the source against the table below, updates the row and appends the event in
-- the same transaction. The same table is mirrored in shared/core/lifecycle.py (a test keeps the two
-- equal) and drawn in docs/data-model.md.
--
-- Domain errors use SQLSTATEs of the made-up class "MC" so both database transports (psycopg
-- and PostgREST) can map them back to an HTTP status without parsing messages:
--   MC400 bad input, MC401 unauthenticated, MC404 not found (or not yours), MC409 conflict.
-- The DETAIL of an MC error is a JSON object with machine-readable context.

create table public.instance_status_transitions (
  from_status public.account_tool_installation_status_enum not null,
  to_status public.account_tool_installation_status_enum not null,
  source public.instance_event_source_enum not null,
  why text not null,
  primary key (from_status, to_status, source)
);

insert into public.instance_status_transitions (from_status, to_status, source, why) values
  -- deploy: recorded, then sent to the DTMA, then settled by its answer, a heartbeat or the sweep.
  -- An exit nobody asked for is an error (a report of `exited` reads `stopped` only after a stop
  -- was asked for: cp_reconcile_toolbox), so no report turns deploying or error into stopped.
  ('pending_deploy', 'deploying', 'api',       'deploy sent to the toolbox DTMA'),
  ('pending_deploy', 'error',     'api',       'deploy could not be sent'),
  ('pending_deploy', 'error',     'sweep',     'deploy never left pending_deploy before its deadline'),
  ('deploying',      'running',   'api',       'DTMA answered with a running container'),
  ('deploying',      'running',   'heartbeat', 'heartbeat shows the container running'),
  ('deploying',      'running',   'dtma',      'DTMA status shows the container running'),
  ('deploying',      'error',     'api',       'DTMA refused or failed the deploy'),
  ('deploying',      'error',     'heartbeat', 'heartbeat shows the container failed'),
  ('deploying',      'error',     'dtma',      'DTMA status shows the container failed'),
  ('deploying',      'error',     'sweep',     'no report of the container before the deploy deadline'),
  -- running
  ('running',        'stopping',  'api',       'stop or restart requested'),
  ('running',        'deleting',  'api',       'remove requested'),
  ('running',        'stopped',   'heartbeat', 'container paused on the toolbox'),
  ('running',        'stopped',   'dtma',      'container paused on the toolbox'),
  ('running',        'error',     'heartbeat', 'container failed or disappeared'),
  ('running',        'error',     'dtma',      'container failed or disappeared'),
  -- stopping
  ('stopping',       'stopped',   'api',       'DTMA stopped the container'),
  ('stopping',       'stopped',   'heartbeat', 'heartbeat shows the container stopped'),
  ('stopping',       'stopped',   'dtma',      'DTMA status shows the container stopped'),
  ('stopping',       'starting',  'api',       'restart: stopped, now starting'),
  ('stopping',       'error',     'api',       'DTMA failed to stop the container'),
  ('stopping',       'error',     'sweep',     'stop not confirmed before its deadline'),
  ('stopping',       'running',   'api',       'the stop never reached the toolbox agent; nothing changed'),
  -- stopped
  ('stopped',        'starting',  'api',       'start requested'),
  ('stopped',        'deleting',  'api',       'remove requested'),
  ('stopped',        'running',   'heartbeat', 'container was started on the toolbox'),
  ('stopped',        'running',   'dtma',      'container was started on the toolbox'),
  ('stopped',        'error',     'heartbeat', 'container disappeared or failed'),
  ('stopped',        'error',     'dtma',      'container disappeared or failed'),
  -- starting
  ('starting',       'running',   'api',       'DTMA started the container'),
  ('starting',       'running',   'heartbeat', 'heartbeat shows the container running'),
  ('starting',       'running',   'dtma',      'DTMA status shows the container running'),
  ('starting',       'error',     'api',       'DTMA failed to start the container'),
  ('starting',       'error',     'heartbeat', 'container exited after it was started'),
  ('starting',       'error',     'dtma',      'container exited after it was started'),
  ('starting',       'error',     'sweep',     'start not confirmed before its deadline'),
  ('starting',       'stopped',   'api',       'the start never reached the toolbox agent; nothing changed'),
  -- error: the user may retry or remove; reports may show the container recovered
  ('error',          'starting',  'api',       'start or restart requested after an error'),
  ('error',          'deleting',  'api',       'remove requested'),
  ('error',          'running',   'heartbeat', 'container is running again'),
  ('error',          'running',   'dtma',      'container is running again'),
  -- deleting ends with the row's removal (after the DTMA confirms), or in error
  ('deleting',       'error',     'api',       'DTMA failed to remove the container'),
  ('deleting',       'error',     'sweep',     'removal not confirmed before its deadline'),
  ('deleting',       'running',   'api',       'the removal never reached the toolbox agent; nothing changed'),
  ('deleting',       'stopped',   'api',       'the removal never reached the toolbox agent; nothing changed');

-- Raise a domain error with a JSON detail. Kept tiny so every function raises the same way.
create or replace function cp_private.cp_raise(p_code text, p_message text, p_detail jsonb default '{}')
returns void
language plpgsql
set search_path = ''
as $$
begin
  raise exception using errcode = p_code, message = p_message, detail = p_detail::text;
end
$$;

-- The instance as the functions return it (secrets are never stored, so nothing to strip).
create or replace function cp_private.cp_instance_json(p_instance public.account_tool_instances)
returns jsonb
language sql stable
set search_path = ''
as $$
  select to_jsonb(p_instance)
$$;

-- Append one event to an instance's history (the only INSERT into the events table).
create or replace function cp_private.cp_append_event(
  p_instance public.account_tool_instances,
  p_from public.account_tool_installation_status_enum,
  p_to public.account_tool_installation_status_enum,
  p_source public.instance_event_source_enum,
  p_message text
) returns void
language sql
set search_path = ''
as $$
  insert into public.account_tool_instance_events
    (account_tool_instance_id, account_tool_environment_id, instance_name_on_toolbox,
     from_status, to_status, source, message)
  values (p_instance.id, p_instance.account_tool_environment_id, p_instance.instance_name_on_toolbox,
          p_from, p_to, p_source, p_message)
$$;

-- Legacy statuses (rows of Agentopia's other tools) and the status of this state machine each
-- one means; reconciliation maps a legacy row the first time a report concerns it.
-- shared/domain/lifecycle.py LEGACY_STATUSES is the same table (a test feeds both).
create or replace function cp_private.cp_canonical_status(p_status public.account_tool_installation_status_enum)
returns public.account_tool_installation_status_enum
language sql immutable
set search_path = ''
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

-- Apply one transition to a locked row: check it against the table, write the row and the
-- event. Callers lock the row (SELECT ... FOR UPDATE) first; this is the only code that writes
-- status_on_toolbox, so every change has its event.
create or replace function cp_private.cp_apply_instance_transition(
  p_instance public.account_tool_instances,
  p_to public.account_tool_installation_status_enum,
  p_source public.instance_event_source_enum,
  p_message text
) returns public.account_tool_instances
language plpgsql
set search_path = ''
as $$
declare
  v_row public.account_tool_instances;
begin
  if not exists (
    select 1 from public.instance_status_transitions t
    where t.from_status = p_instance.status_on_toolbox and t.to_status = p_to and t.source = p_source
  ) then
    perform cp_private.cp_raise('MC409',
      format('instance %s is %s; %s cannot move it to %s',
             p_instance.instance_name_on_toolbox, p_instance.status_on_toolbox, p_source, p_to),
      jsonb_build_object('status', p_instance.status_on_toolbox, 'requested', p_to, 'source', p_source));
  end if;

  update public.account_tool_instances
     set status_on_toolbox = p_to,
         status_changed_at = now(),
         instance_error_message = case when p_to = 'error' then p_message else null end,
         missing_heartbeats = 0
   where id = p_instance.id
  returning * into v_row;

  perform cp_private.cp_append_event(v_row, p_instance.status_on_toolbox, p_to, p_source, p_message);
  return v_row;
end
$$;

select cp_private.restrict_function_privileges();
