-- Steady-state heartbeats (issue 17): a fleet's beats almost all say "nothing changed", so the
-- ingest recognises such a beat by a digest and then only records the toolbox's liveness.
--
-- The caller (shared/usecases/reports.py) splits what the agent reported in two:
--   p_report  the part reconciliation reads (containers: ids, names, states, ports, image, exit
--             code, created; instance-format items; the Docker error; dtma_version; unknown
--             top-level fields), as JSON text, parsed here only when it is needed;
--   p_digest  SHA-256 (hex) of exactly that text;
--   p_live    what changes every beat without meaning anything for reconciliation:
--             {"system_status": {...}, "boot_id": text|null, "seq": int|null,
--              "statuses": [Docker's status text per container, in p_report's order]}.
--
-- The steady path is taken only when re-running reconciliation could not change anything:
--   * the digest equals the one stored by the last beat that was applied in full and changed no
--     instance row (a fixed point: applying the same report to the same rows again writes nothing;
--     reconciliation reads no clock, only the report, the toolbox and its instance rows);
--   * no instance row of the toolbox changed since then: a token over the rows' ids and row
--     versions (xmin, which every insert and update renews and a row lock does not) is compared.
--     A deploy, a stop, a removal, the sweep's deadline, a settle: anything that changes what the
--     same report means also changes an instance row, so it sends the next beat down the full path;
--   * the toolbox is `active` (a recovery, a first beat or an error to clear takes the full path).
-- Then the beat updates the toolbox row only (liveness, system_status, boot_id/seq) and reads
-- nothing else. The full path computes the token before and after reconciling: when they differ
-- (this beat changed a row, or another transaction did meanwhile) no digest is stored, so the next
-- beat is applied in full too. Either way it is one call: a changed beat stays one round trip.
--
-- Instance rows are therefore written only when something about them changed: `last_heartbeat_from_dtma`
-- is the last heartbeat that changed the row (docs/data-model.md); while a toolbox is steady its
-- servers are covered by every beat, and `last_heartbeat_at` of the toolbox says when the last one came.
--
-- The steady-state beat also no longer rewrites every index of the toolbox row: idx_ate_liveness
-- indexed last_heartbeat_at, which every beat changes, so no beat could be a HOT update (one heap
-- tuple, no index entries). The sweep finds silent toolboxes through idx_ate_status instead (a
-- filter over the live toolboxes, once a minute; bench/sweep.py measures it).

alter table public.account_tool_environments
  add column dtma_report_digest bytea,
  add column dtma_report_instances text;
comment on column public.account_tool_environments.dtma_report_digest is
  'SHA-256 of the last heartbeat report applied in full that changed nothing (null: apply the next one in full)';
comment on column public.account_tool_environments.dtma_report_instances is
  'Row-version token of the toolbox''s instances when dtma_report_digest was stored';

drop index if exists public.idx_ate_liveness;
-- updated_at keeps its meaning (any change of the row), but a statement that sets it itself, as
-- the heartbeat does, does not also run the trigger (a PL/pgSQL call with its own search_path on
-- every beat).
drop trigger set_account_tool_environments_updated_at on public.account_tool_environments;
create trigger set_account_tool_environments_updated_at before update on public.account_tool_environments
  for each row when (new.updated_at is not distinct from old.updated_at)
  execute function cp_private.trigger_set_timestamp();
-- Room on each page for the new version of a row, so the per-beat update stays on its page (HOT).
alter table public.account_tool_environments set (fillfactor = 80);

-- p_report's containers with Docker's status text put back into their runtime (reconciliation
-- stores it with the rest of the runtime when it writes a row).
create or replace function cp_private.cp_heartbeat_report(p_report jsonb, p_live jsonb)
returns jsonb
language sql
immutable
set search_path = ''
as $$
  select case
    when jsonb_typeof(p_live->'statuses') = 'array' and jsonb_array_length(p_live->'statuses') > 0
      then jsonb_set(p_report, '{containers}', coalesce((
        select jsonb_agg(case when jsonb_typeof(c.value->'runtime') = 'object'
                              then jsonb_set(c.value, '{runtime,status}',
                                             coalesce(p_live->'statuses'->(c.ord::int - 1), '""'))
                              else c.value end order by c.ord)
          from jsonb_array_elements(coalesce(p_report->'containers', '[]')) with ordinality c(value, ord)), '[]'))
    else p_report
  end;
$$;

-- Reconciliation (0005), changed in one place: an instance row is written only when something about
-- it changed, also for heartbeats.
create or replace function cp_private.cp_reconcile_toolbox(p_toolbox_id uuid, p_report jsonb, p_source text)
returns jsonb
language plpgsql
set search_path = ''
as $$
declare
  v_source public.instance_event_source_enum;
  v_obs jsonb;
  v_rejected int;
  v_unmanaged jsonb;
  v_transitions int := 0;
  v_row public.account_tool_instances;
  v_obs_row record;
begin
  if p_source not in ('heartbeat', 'dtma') then
    perform cp_private.cp_raise('MC400', format('reports come from a heartbeat or a DTMA read, not %s', p_source));
  end if;
  v_source := p_source::public.instance_event_source_enum;

  -- Observations: one per instance of THIS toolbox that the report mentions. A container binds an
  -- instance by name only when it is the container this service created: the id the agent gave
  -- at deploy, or (before we know an id) one created after the instance was recorded, with five
  -- minutes of slack for the droplet's clock.
  select coalesce(jsonb_agg(o), '[]') into v_obs from (
    select * from (
      select distinct on (i.id) i.id as instance_id, c.ord, c.value->>'target' as target,
             c.value->>'message' as message, c.value->>'container_id' as container_id,
             c.value->'runtime' as runtime, coalesce((c.value->>'exited')::boolean, false) as exited,
             c.value->>'unexpected' as unexpected, (c.value->>'exit_code') is not null as has_exit_code,
             c.value ? 'agent_instance_id' as managed_known, c.value->>'agent_instance_id' as agent_instance_id
        from jsonb_array_elements(coalesce(p_report->'containers', '[]')) with ordinality c(value, ord)
        cross join lateral jsonb_array_elements_text(c.value->'names') n(name)
        join public.account_tool_instances i
          on i.account_tool_environment_id = p_toolbox_id and i.instance_name_on_toolbox = n.name
       where case when i.container_id is not null and coalesce(c.value->>'container_id', '') <> ''
                  then i.container_id = c.value->>'container_id'
                  else c.value->>'created' is null
                       or to_timestamp((c.value->>'created')::float8) >= i.created_at - interval '5 minutes'
             end
       order by i.id, c.ord
    ) by_name
    union all
    select i.id, null, x->>'target', x->>'message', null, x->'runtime', false, null, false, false, null
      from jsonb_array_elements(coalesce(p_report->'instances', '[]')) x
      join public.account_tool_instances i
        on i.id = (x->>'id')::uuid and i.account_tool_environment_id = p_toolbox_id
  ) o;

  -- W1: instance-format items naming an instance that is not on this toolbox change nothing.
  select count(*) into v_rejected
    from jsonb_array_elements(coalesce(p_report->'instances', '[]')) x
   where not exists (select 1 from public.account_tool_instances i
                     where i.id = (x->>'id')::uuid and i.account_tool_environment_id = p_toolbox_id);

  -- Containers bound to no instance: the agent itself, other software, leftovers of failed
  -- deploys. Their names and published ports are kept so deploys can avoid them.
  select coalesce(jsonb_agg(jsonb_build_object(
           'names', c.value->'names', 'image', c.value->'runtime'->'image',
           'state', c.value->'runtime'->'state', 'container_id', c.value->'container_id',
           'ports', coalesce((select jsonb_agg(p->'public_port')
                                from jsonb_array_elements(coalesce(c.value->'runtime'->'ports', '[]')) p
                               where jsonb_typeof(p->'public_port') = 'number'), '[]'))), '[]')
    into v_unmanaged
    from jsonb_array_elements(coalesce(p_report->'containers', '[]')) with ordinality c(value, ord)
   where not exists (select 1 from jsonb_to_recordset(v_obs) as o(ord bigint) where o.ord = c.ord);

  -- Legacy statuses of the instances this report concerns become statuses of the state machine
  -- (one event each), so the rules below apply to them like to any other instance.
  for v_row in
    select i.* from public.account_tool_instances i
     where i.id in (select o.instance_id from jsonb_to_recordset(v_obs) as o(instance_id uuid))
       and cp_private.cp_canonical_status(i.status_on_toolbox) <> i.status_on_toolbox
     order by i.id
       for update
  loop
    update public.account_tool_instances
       set status_on_toolbox = cp_private.cp_canonical_status(v_row.status_on_toolbox), status_changed_at = now()
     where id = v_row.id;
    perform cp_private.cp_append_event(v_row, v_row.status_on_toolbox, cp_private.cp_canonical_status(v_row.status_on_toolbox),
                                   v_source, format('legacy status %s is read as %s', v_row.status_on_toolbox,
                                                    cp_private.cp_canonical_status(v_row.status_on_toolbox)));
  end loop;

  -- What the report says about each container, written only when it changed (0012: a beat that
  -- changes nothing writes no instance row, which is what lets the next identical beat take the
  -- steady path). A heartbeat that writes a row stamps last_heartbeat_from_dtma; Docker's status
  -- text ("Up 5 minutes") changes every beat and is not worth a row write.
  update public.account_tool_instances i
     set runtime_details = coalesce(o.runtime, i.runtime_details),
         container_id = coalesce(o.container_id, i.container_id),
         last_heartbeat_from_dtma = case when v_source = 'heartbeat' then now() else i.last_heartbeat_from_dtma end,
         missing_heartbeats = 0
    from jsonb_to_recordset(v_obs) as o(instance_id uuid, container_id text, runtime jsonb)
   where i.id = o.instance_id
     and (i.missing_heartbeats <> 0
          or i.container_id is distinct from coalesce(o.container_id, i.container_id)
          or (i.runtime_details - 'status') is distinct from (coalesce(o.runtime, i.runtime_details) - 'status'));

  -- Whether the agent still manages the container (direct reads only: heartbeats do not say).
  for v_obs_row in
    select i as inst, (o.agent_instance_id = i.id::text) as managed
      from jsonb_to_recordset(v_obs) as o(instance_id uuid, managed_known boolean, agent_instance_id text)
      join public.account_tool_instances i on i.id = o.instance_id
     where o.managed_known
       and (i.agent_unmanaged_at is null) = (o.agent_instance_id is distinct from i.id::text)
     order by i.id
       for update of i
  loop
    update public.account_tool_instances
       set agent_unmanaged_at = case when v_obs_row.managed then null else now() end
     where id = (v_obs_row.inst).id;
    perform cp_private.cp_append_event(v_obs_row.inst, (v_obs_row.inst).status_on_toolbox,
      (v_obs_row.inst).status_on_toolbox, v_source,
      case when v_obs_row.managed then format('the toolbox agent manages container %s again',
                                              (v_obs_row.inst).instance_name_on_toolbox)
           else format('the toolbox agent no longer manages container %s (it restarted and forgot it); it '
                       'cannot stop, start or remove it', (v_obs_row.inst).instance_name_on_toolbox) end);
  end loop;

  -- Status changes. An exit nobody asked for is an error; a stop that was asked for is a stop.
  for v_obs_row in
    select i as inst, x.target, x.message
      from (select o.instance_id,
                   case when o.exited and i0.status_on_toolbox not in ('stopping', 'stopped') then 'error'
                        else o.target end as target,
                   case when o.exited and i0.status_on_toolbox not in ('stopping', 'stopped') then o.unexpected
                        else o.message end as message,
                   o.has_exit_code
              from jsonb_to_recordset(v_obs) as o(instance_id uuid, target text, message text, exited boolean,
                                                  unexpected text, has_exit_code boolean)
              join public.account_tool_instances i0 on i0.id = o.instance_id) x
      join public.account_tool_instances i on i.id = x.instance_id
     where x.target is not null
       and ((i.status_on_toolbox::text <> x.target
             and exists (select 1 from public.instance_status_transitions t
                         where t.from_status = i.status_on_toolbox and t.to_status::text = x.target
                           and t.source = v_source))
            -- An error report with an exit code names the cause better than what we had.
            or (i.status_on_toolbox = 'error' and x.target = 'error' and x.has_exit_code
                and i.instance_error_message is distinct from x.message))
     order by i.id
       for update of i
  loop
    if (v_obs_row.inst).status_on_toolbox::text = v_obs_row.target then
      update public.account_tool_instances set instance_error_message = v_obs_row.message
       where id = (v_obs_row.inst).id;
      perform cp_private.cp_append_event(v_obs_row.inst, 'error', 'error', v_source, v_obs_row.message);
    else
      perform cp_private.cp_apply_instance_transition(
        v_obs_row.inst, v_obs_row.target::public.account_tool_installation_status_enum, v_source,
        v_obs_row.message);
    end if;
    v_transitions := v_transitions + 1;
  end loop;

  -- Level-triggered reconciliation (heartbeats only): a full container list that omits a
  -- container we expect to exist counts one miss; two consecutive misses make it an error (one
  -- miss can be a race with a deploy or a removal in flight).
  if v_source = 'heartbeat' and coalesce((p_report->>'full_list')::boolean, false)
     and p_report->>'docker_error' is null then
    update public.account_tool_instances i
       set missing_heartbeats = i.missing_heartbeats + 1
     where i.account_tool_environment_id = p_toolbox_id
       and i.status_on_toolbox in ('running', 'stopped')
       and not exists (select 1 from jsonb_to_recordset(v_obs) as o(instance_id uuid) where o.instance_id = i.id);
    for v_row in
      select * from public.account_tool_instances i
       where i.account_tool_environment_id = p_toolbox_id and i.missing_heartbeats >= 2
         and i.status_on_toolbox in ('running', 'stopped')
       order by i.id
         for update
    loop
      perform cp_private.cp_apply_instance_transition(
        v_row, 'error', 'heartbeat',
        format('container %s is no longer on the toolbox (missing from 2 consecutive heartbeats); remove '
               'this server and deploy it again', v_row.instance_name_on_toolbox));
      v_transitions := v_transitions + 1;
    end loop;
  end if;

  return jsonb_build_object('matched', jsonb_array_length(v_obs), 'transitions', v_transitions,
                            'rejected', v_rejected, 'unmanaged', v_unmanaged);
end
$$;

-- The heartbeat: lock the toolbox by its token, apply ordering, then either the steady path (see
-- the top of this file) or the full reconciliation, and record the liveness signal on the toolbox
-- row (the part a DTMA read must never do). p_stale_after_seconds is the functions' staleness
-- window (3 x HEARTBEAT_INTERVAL_SECONDS + HEARTBEAT_GRACE_SECONDS): a beat after a longer
-- silence tells cp_private.cp_watch_toolbox_heard (0011), whichever path it takes.
drop function if exists public.cp_ingest_heartbeat(text, jsonb);
create or replace function public.cp_ingest_heartbeat(p_token_sha256 text, p_report text, p_digest text,
                                                      p_live jsonb, p_stale_after_seconds int)
returns jsonb
language plpgsql
security definer
set search_path = ''
as $$
declare
  v_box public.account_tool_environments;
  v_report jsonb;
  v_result jsonb;
  v_recovered boolean;
  v_stale boolean;
  v_digest bytea := decode(p_digest, 'hex');
  v_before text;
  v_after text;
  v_id uuid;
  v_previous timestamptz;
  v_boot text := p_live->>'boot_id';
  v_seq bigint := (p_live->>'seq')::bigint;
begin
  -- The steady path, one statement: the toolbox of this token, `active`, whose stored digest is this
  -- report's and whose instance rows are the versions stored with it (the token below), and for which
  -- this beat is not an old one (same rule as further down). The row lock is the update's own.
  with previous as (
    select e.id, e.last_heartbeat_at from public.account_tool_environments e
     where e.dtma_token_sha256 = decode(p_token_sha256, 'hex'))
  update public.account_tool_environments e
     set last_heartbeat_at = now(),
         updated_at = now(),
         dtma_health_details_json = p_live->'system_status',
         dtma_boot_id = coalesce(v_boot, e.dtma_boot_id),
         dtma_last_seq = case when v_boot is null then e.dtma_last_seq else v_seq end
    from previous
   where e.id = previous.id
     and e.status = 'active'
     and e.dtma_report_digest = v_digest
     -- The instance rows of the toolbox as one value: their count and an order-free hash of (id, xmin).
     -- It changes whenever a row of the toolbox is inserted, updated or deleted, whoever did it (a
     -- row lock does not change xmin). Inline: a function with its own search_path costs more.
     and e.dtma_report_instances = (
       select count(*)::text || ':' || coalesce(bit_xor(pg_catalog.uuid_hash_extended(i.id, i.xmin::text::int8)), 0)::text
         from public.account_tool_instances i where i.account_tool_environment_id = e.id)
     and not (v_boot is not null and v_seq is not null and e.dtma_boot_id = v_boot
              and e.dtma_last_seq >= v_seq and e.dtma_last_seq - v_seq < 16)
  returning e.id, previous.last_heartbeat_at into v_id, v_previous;
  if found then
    -- What this transaction wrote is a liveness stamp the agent repeats every minute: its commit need not
    -- wait for the WAL flush (a crash can lose the last fraction of a second of stamps, never
    -- consistency). Only here; a beat that changes anything commits as usual.
    perform pg_catalog.set_config('synchronous_commit', 'off', true);
    if v_previous is null
       or v_previous < now() - make_interval(secs => greatest(p_stale_after_seconds, 1)) then
      perform cp_private.cp_watch_toolbox_heard(v_id);
    end if;
    return jsonb_build_object('toolbox_id', v_id, 'ignored', false, 'steady', true, 'previous_status', 'active');
  end if;

  -- The full path.
  select * into v_box from public.account_tool_environments
   where dtma_token_sha256 = decode(p_token_sha256, 'hex')
   for no key update;
  if not found then
    perform cp_private.cp_raise('MC401', 'unknown toolbox token');
  end if;
  if v_box.status in ('pending_deprovision', 'deprovisioning', 'deprovisioned', 'error_deprovisioning') then
    perform cp_private.cp_raise('MC409', format('toolbox is %s; heartbeats are not accepted', v_box.status),
                            jsonb_build_object('toolbox_status', v_box.status));
  end if;

  if p_live->>'boot_id' is not null and p_live->>'seq' is not null
     and v_box.dtma_boot_id = p_live->>'boot_id'
     and v_box.dtma_last_seq >= (p_live->>'seq')::bigint
     and v_box.dtma_last_seq - (p_live->>'seq')::bigint < 16 then
    return jsonb_build_object('toolbox_id', v_box.id, 'ignored', true,
                              'reason', 'sequence not newer than the last applied heartbeat');
  end if;

  v_stale := v_box.last_heartbeat_at is null
             or v_box.last_heartbeat_at < now() - make_interval(secs => greatest(p_stale_after_seconds, 1));
  v_before := (select count(*)::text || ':' || coalesce(bit_xor(pg_catalog.uuid_hash_extended(i.id, i.xmin::text::int8)), 0)::text
                 from public.account_tool_instances i where i.account_tool_environment_id = v_box.id);

  v_report := cp_private.cp_heartbeat_report(p_report::jsonb, p_live);
  v_result := cp_private.cp_reconcile_toolbox(v_box.id, v_report, 'heartbeat');
  v_after := (select count(*)::text || ':' || coalesce(bit_xor(pg_catalog.uuid_hash_extended(i.id, i.xmin::text::int8)), 0)::text
                 from public.account_tool_instances i where i.account_tool_environment_id = v_box.id);

  v_recovered := v_box.status = 'unresponsive';
  update public.account_tool_environments
     set last_heartbeat_at = now(),
         updated_at = now(),
         dtma_last_known_version = left(v_report->>'dtma_version', 64),
         dtma_health_details_json = p_live->'system_status',
         dtma_report_details_json = jsonb_build_object(
           'unmanaged_containers', v_result->'unmanaged',
           'docker', case when v_report->>'docker_error' is null then jsonb_build_object('healthy', true)
                          else jsonb_build_object('healthy', false, 'error', v_report->>'docker_error') end,
           'rejected_items', (v_result->>'rejected')::int,
           'extra', coalesce(v_report->'extra', '{}')),
         dtma_boot_id = coalesce(p_live->>'boot_id', dtma_boot_id),
         dtma_last_seq = case when p_live->>'boot_id' is null then dtma_last_seq
                              else (p_live->>'seq')::bigint end,
         -- A fixed point (this beat wrote no instance row and none changed meanwhile) lets the next
         -- identical beat take the steady path; a beat naming other toolboxes' instances never does,
         -- so each such beat is logged.
         dtma_report_digest = case when v_before = v_after and (v_result->>'rejected')::int = 0
                                   then v_digest end,
         dtma_report_instances = v_after,
         status = case when status in ('provisioning', 'awaiting_heartbeat', 'unresponsive', 'error_provisioning')
                       then 'active' else status end,
         status_changed_at = case when status in ('provisioning', 'awaiting_heartbeat', 'unresponsive',
                                                  'error_provisioning') then now() else status_changed_at end,
         provisioning_error_message = case when status = 'error_provisioning' then null
                                           else provisioning_error_message end
   where id = v_box.id;

  if v_recovered then
    perform cp_private.cp_append_event(i, i.status_on_toolbox, i.status_on_toolbox, 'heartbeat',
                                   'toolbox is reporting again')
       from public.account_tool_instances i where i.account_tool_environment_id = v_box.id;
  end if;
  if v_stale then
    perform cp_private.cp_watch_toolbox_heard(v_box.id);
  end if;

  return jsonb_build_object(
    'toolbox_id', v_box.id, 'ignored', false, 'steady', false, 'previous_status', v_box.status,
    'matched', v_result->'matched', 'transitions', v_result->'transitions',
    'rejected', v_result->'rejected', 'unmanaged', jsonb_array_length(v_result->'unmanaged'));
end
$$;

select cp_private.restrict_function_privileges();
