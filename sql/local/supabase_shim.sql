-- Local stand-in for the parts of Supabase the migrations rely on.
--
-- Applied by the migration runner ONLY when the database has no `auth` schema (vanilla
-- PostgreSQL: the embedded pgserver, a CI service). On Supabase every object here already
-- exists and is owned by Supabase, so the runner skips this file entirely; it is never
-- recorded as a migration. It mirrors Supabase's definitions closely enough that RLS
-- policies written against `auth.uid()` / `auth.jwt()` behave the same in tests.

do $$
begin
  if not exists (select 1 from pg_roles where rolname = 'anon') then
    create role anon nologin noinherit;
  end if;
  if not exists (select 1 from pg_roles where rolname = 'authenticated') then
    create role authenticated nologin noinherit;
  end if;
  if not exists (select 1 from pg_roles where rolname = 'service_role') then
    -- Like Supabase: the service role bypasses RLS.
    create role service_role nologin noinherit bypassrls;
  end if;
end
$$;

-- Let the connecting (owner) role switch into the API roles, as PostgREST's authenticator does.
grant anon, authenticated, service_role to current_user;

-- Supabase's default privileges in `public`: every table, sequence and function the migration
-- role creates there is granted to all three API roles. The migrations revoke what they do not
-- mean to grant; mirroring the defaults here makes the tests check those revokes against what
-- they meet on Supabase, not against vanilla PostgreSQL's (PUBLIC gets EXECUTE on functions only).
grant usage on schema public to anon, authenticated, service_role;
alter default privileges in schema public grant all on tables to anon, authenticated, service_role;
alter default privileges in schema public grant all on sequences to anon, authenticated, service_role;
alter default privileges in schema public grant all on functions to anon, authenticated, service_role;

create schema auth;
grant usage on schema auth to anon, authenticated, service_role;

create table auth.users (
  id uuid primary key default gen_random_uuid(),
  email text unique,
  raw_app_meta_data jsonb not null default '{}',
  raw_user_meta_data jsonb not null default '{}',
  created_at timestamptz not null default now(),
  updated_at timestamptz not null default now()
);

-- Same resolution order as Supabase: the per-claim GUC first, then the claims document that
-- PostgREST sets per request (`request.jwt.claims`).
create function auth.jwt() returns jsonb
language sql stable
as $$
  select coalesce(
    nullif(current_setting('request.jwt.claim', true), ''),
    nullif(current_setting('request.jwt.claims', true), '')
  )::jsonb
$$;

create function auth.uid() returns uuid
language sql stable
as $$
  select coalesce(
    nullif(current_setting('request.jwt.claim.sub', true), ''),
    (nullif(current_setting('request.jwt.claims', true), '')::jsonb ->> 'sub')
  )::uuid
$$;

create function auth.role() returns text
language sql stable
as $$
  select coalesce(
    nullif(current_setting('request.jwt.claim.role', true), ''),
    (nullif(current_setting('request.jwt.claims', true), '')::jsonb ->> 'role')
  )::text
$$;

grant execute on function auth.jwt(), auth.uid(), auth.role() to anon, authenticated, service_role;

do $$
begin
  if not exists (select 1 from pg_publication where pubname = 'supabase_realtime') then
    create publication supabase_realtime;
  end if;
end
$$;
