-- Agent commands as durable rows (an outbox), run by the command worker (dtma_command_worker).
--
-- The agent's deploy is synchronous and can take minutes, and a stop waits for Docker's stop
-- timeout. The user-facing function records the instance's new status and a command row in the
-- same transaction, enqueues a task naming the command (Google Cloud Tasks in production, a
-- loopback emulator locally) and answers; the worker holds the agent call as long as it takes and
-- records the outcome when the agent answers. docs/commands.md describes the whole contract.
--
-- Delivery is at least once, so a command is claimed under a lease before it runs and a delivery
-- of a finished command changes nothing. Commands of one instance run in the order they were
-- recorded; a toolbox runs at most p_max_per_toolbox commands at once (a droplet is not asked for
-- fifty parallel pulls). A command whose instance has moved on (the sweep failed it, a report
-- settled it) is superseded, not run. The environment values a deploy passes to the container are
-- secrets: they are stored encrypted with a key the database does not hold, and erased when the
-- command ends.

create table public.dtma_commands (
  id uuid primary key,
  -- No foreign key to the instance: a removal deletes the instance, and its command must still
  -- be marked done (as events, commands outlive the row they concern).
  account_tool_instance_id uuid not null,
  account_tool_environment_id uuid not null references public.account_tool_environments (id) on delete cascade,
  seq bigint generated always as identity,
  action text not null check (action in ('deploy', 'start', 'stop', 'restart', 'remove')),
  -- The instance status the command was recorded with; it runs only while the instance still has it.
  expected_status public.account_tool_installation_status_enum not null,
  -- Where the instance was before the action (an action that never reached the agent goes back).
  previous_status public.account_tool_installation_status_enum,
  previous_error text,
  status text not null default 'pending' check (status in ('pending', 'running', 'done', 'failed', 'superseded')),
  attempts integer not null default 0,
  enqueued integer not null default 0,
  enqueued_at timestamptz,
  enqueue_error text,
  lease_until timestamptz,
  secret_env text,
  outcome jsonb,
  created_at timestamptz not null default now(),
  started_at timestamptz,
  finished_at timestamptz
);
create index idx_dtma_commands_instance on public.dtma_commands (account_tool_instance_id, seq);
-- The worker's per-toolbox bound and the sweep's re-enqueue look only at open commands.
create index idx_dtma_commands_open on public.dtma_commands (account_tool_environment_id, status)
  where status in ('pending', 'running');
create index idx_dtma_commands_unqueued on public.dtma_commands (created_at)
  where status in ('pending', 'running');
alter table public.dtma_commands enable row level security;
revoke all on public.dtma_commands from anon, authenticated;
revoke all on sequence public.dtma_commands_seq_seq from anon, authenticated;
grant all on public.dtma_commands to service_role;

-- Record a command for an instance the caller has just moved into a transitional status (in the
-- same transaction, from cp_record_deploy / cp_begin_action's callers).
create or replace function cp_private.cp_add_command(
  p_command_id uuid, p_instance public.account_tool_instances, p_action text,
  p_previous public.account_tool_installation_status_enum, p_previous_error text, p_secret_env text
) returns void
language sql
set search_path = ''
as $$
  -- Counted as enqueued: the caller enqueues right after this commits, and reports a failure
  -- (cp_command_enqueued), so the common path costs no second round trip.
  insert into public.dtma_commands (id, account_tool_instance_id, account_tool_environment_id, action,
                                    expected_status, previous_status, previous_error, secret_env,
                                    enqueued, enqueued_at)
  values (p_command_id, p_instance.id, p_instance.account_tool_environment_id, p_action,
          p_instance.status_on_toolbox, p_previous, p_previous_error, p_secret_env, 1, now())
$$;

-- Deploy: record the instance (cp_record_deploy) and its command, in one transaction.
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
  perform cp_private.cp_add_command(p_command_id, v_row, 'deploy', null, null, p_secret_env);
  return v_recorded || jsonb_build_object('command_id', p_command_id);
end
$$;

-- An action: begin it (cp_begin_action) and record its command, in one transaction.
create or replace function public.cp_begin_action_command(
  p_user_id uuid, p_instance_id uuid, p_action text, p_plan jsonb, p_message text,
  p_allow_internal boolean, p_command_id uuid
) returns jsonb
language plpgsql
security definer
set search_path = ''
as $$
declare
  v_begun jsonb;
  v_row public.account_tool_instances;
begin
  v_begun := cp_private.cp_begin_action(p_user_id, p_instance_id, p_action, p_plan, p_message, p_allow_internal);
  select * into v_row from public.account_tool_instances where id = p_instance_id;
  perform cp_private.cp_add_command(p_command_id, v_row, p_action,
                                (v_begun->>'previous_status')::public.account_tool_installation_status_enum,
                                v_begun->>'previous_error', null);
  return v_begun || jsonb_build_object('command_id', p_command_id);
end
$$;

-- The enqueue of a command failed (p_error), or a re-enqueue by the sweep succeeded (p_error
-- null). A failure leaves the command pending with no enqueue time, so the next sweep enqueues it
-- again, and says so once in the instance's history.
create or replace function public.cp_command_enqueued(p_command_id uuid, p_error text default null)
returns jsonb
language plpgsql
security definer
set search_path = ''
as $$
declare
  v_before public.dtma_commands;
  v_row public.account_tool_instances;
begin
  select * into v_before from public.dtma_commands where id = p_command_id for update;
  if not found then
    perform cp_private.cp_raise('MC404', 'command not found', jsonb_build_object('command_id', p_command_id));
  end if;
  update public.dtma_commands
     set enqueued = enqueued + case when p_error is null then 1 else 0 end,
         enqueued_at = case when p_error is null then now() end,
         enqueue_error = p_error
   where id = p_command_id;
  -- The first failure of a streak is worth a line in the server's history; the sweep's retries are not.
  if p_error is not null and v_before.enqueue_error is null then
    select * into v_row from public.account_tool_instances where id = v_before.account_tool_instance_id;
    if found then
      perform cp_private.cp_append_event(v_row, v_row.status_on_toolbox, v_row.status_on_toolbox, 'api',
        format('the %s could not be queued right now (%s); it is queued again within a minute', v_before.action,
               left(p_error, 200)));
    end if;
  end if;
  return jsonb_build_object('command_id', p_command_id);
end
$$;

-- The worker claims a command. Answers one of:
--   {"run": true, "command": {...}, "instance": {...}, "toolbox": {...}}  the caller runs it now
--   {"state": "done"|"failed"|"superseded"}   nothing to do (a duplicate or late delivery)
--   {"wait": "<why>", "retry_after": seconds}  not now: an earlier command of the instance is open,
--                                              the toolbox runs its maximum, or another attempt
--                                              holds the lease
-- The toolbox row is locked first, so the per-toolbox bound holds under concurrent claims.
create or replace function public.cp_claim_command(p_command_id uuid, p_lease_seconds int, p_max_per_toolbox int)
returns jsonb
language plpgsql
security definer
set search_path = ''
as $$
declare
  v_cmd public.dtma_commands;
  v_box public.account_tool_environments;
  v_row public.account_tool_instances;
  v_running int;
begin
  select * into v_cmd from public.dtma_commands where id = p_command_id;
  if not found then
    return jsonb_build_object('state', 'gone');
  end if;
  select * into v_box from public.account_tool_environments where id = v_cmd.account_tool_environment_id for no key update;
  select * into v_cmd from public.dtma_commands where id = p_command_id for update;
  if v_cmd.status in ('done', 'failed', 'superseded') then
    return jsonb_build_object('state', v_cmd.status);
  end if;
  if v_cmd.status = 'running' and v_cmd.lease_until > now() then
    return jsonb_build_object('wait', 'another attempt is running this command',
                              'retry_after', ceil(extract(epoch from v_cmd.lease_until - now())));
  end if;
  if exists (select 1 from public.dtma_commands c
              where c.account_tool_instance_id = v_cmd.account_tool_instance_id and c.seq < v_cmd.seq
                and c.status in ('pending', 'running')) then
    return jsonb_build_object('wait', 'an earlier command of this server has not finished', 'retry_after', 2);
  end if;
  select * into v_row from public.account_tool_instances where id = v_cmd.account_tool_instance_id for update;
  if not found or v_row.status_on_toolbox <> v_cmd.expected_status then
    update public.dtma_commands
       set status = 'superseded', finished_at = now(), secret_env = null, lease_until = null,
           outcome = jsonb_build_object('message', case when v_row.id is null then 'the server was removed meanwhile'
                                                        else format('the server is %s now, not %s', v_row.status_on_toolbox,
                                                                    v_cmd.expected_status) end)
     where id = p_command_id;
    return jsonb_build_object('state', 'superseded');
  end if;
  select count(*) into v_running from public.dtma_commands c
   where c.account_tool_environment_id = v_cmd.account_tool_environment_id and c.status = 'running'
     and c.lease_until > now() and c.id <> v_cmd.id;
  if v_running >= p_max_per_toolbox then
    return jsonb_build_object('wait', format('toolbox %s already runs %s commands', v_box.name, v_running),
                              'retry_after', 5);
  end if;
  update public.dtma_commands
     set status = 'running', attempts = attempts + 1, lease_until = now() + make_interval(secs => p_lease_seconds),
         started_at = coalesce(started_at, now())
   where id = p_command_id
  returning * into v_cmd;
  return jsonb_build_object(
    'run', true,
    'command', jsonb_build_object('id', v_cmd.id, 'action', v_cmd.action, 'attempt', v_cmd.attempts,
                                  'previous_status', v_cmd.previous_status, 'previous_error', v_cmd.previous_error,
                                  'secret_env', v_cmd.secret_env),
    'instance', cp_private.cp_instance_json(v_row),
    'toolbox', cp_private.cp_toolbox_json(v_box));
end
$$;

-- The command ended: done (its goal reached) or failed (its outcome recorded on the instance).
-- The secret environment is erased either way.
create or replace function public.cp_finish_command(p_command_id uuid, p_status text, p_outcome jsonb)
returns jsonb
language plpgsql
security definer
set search_path = ''
as $$
begin
  if p_status not in ('done', 'failed') then
    perform cp_private.cp_raise('MC400', format('a command ends done or failed, not %s', p_status));
  end if;
  update public.dtma_commands
     set status = p_status, outcome = p_outcome, finished_at = now(), lease_until = null, secret_env = null
   where id = p_command_id and status = 'running';
  return jsonb_build_object('finished', found);
end
$$;

-- What a user-facing function waiting for its command sees.
create or replace function public.cp_command_state(p_command_id uuid)
returns jsonb
language sql stable
security definer
set search_path = ''
as $$
  select coalesce((select jsonb_build_object('status', c.status, 'outcome', c.outcome)
                     from public.dtma_commands c where c.id = p_command_id),
                  jsonb_build_object('status', 'gone'))
$$;

-- The sweep's part: commands whose enqueue failed, or that the queue lost (pending or with an
-- expired lease for longer than p_requeue_after_seconds), are handed back to be enqueued again;
-- commands open for longer than p_give_up_after_seconds are failed (their instance's deadline
-- in cp_sweep says why to the user).
create or replace function public.cp_commands_to_requeue(p_requeue_after_seconds int, p_give_up_after_seconds int,
                                                         p_batch_size int)
returns jsonb
language plpgsql
security definer
set search_path = ''
as $$
declare
  v_given_up int;
  v_ids jsonb;
begin
  with old as (
    select id from public.dtma_commands
     where status in ('pending', 'running') and created_at < now() - make_interval(secs => p_give_up_after_seconds)
       and (status = 'pending' or lease_until < now())
     order by created_at
     limit p_batch_size
       for update skip locked
  )
  update public.dtma_commands c
     set status = 'failed', finished_at = now(), secret_env = null, lease_until = null,
         outcome = jsonb_build_object('code', 'command_never_ran',
                                      'message', format('the command was not carried out within %s',
                                                        cp_private.cp_duration_text(p_give_up_after_seconds)))
    from old where c.id = old.id;
  get diagnostics v_given_up = row_count;

  select coalesce(jsonb_agg(jsonb_build_object('id', id, 'attempt', enqueued + 1)), '[]') into v_ids from (
    select id, enqueued from public.dtma_commands
     where status in ('pending', 'running')
       and (enqueued_at is null
            or (status = 'pending' and enqueued_at < now() - make_interval(secs => p_requeue_after_seconds))
            or (status = 'running' and lease_until < now() - make_interval(secs => p_requeue_after_seconds)))
     order by created_at
     limit p_batch_size
  ) x;
  return jsonb_build_object('requeue', v_ids, 'given_up', v_given_up);
end
$$;

select cp_private.restrict_function_privileges();
