"""The SQL functions' hardening and Supabase's database linter, on the migrated schema.

The rules (sql/migrations/0002_tables.sql, top): `public` holds the tables and the RPC surface
only, the cp_* functions the Python code calls, executable by `service_role` alone; every other
function lives in `cp_private`, which no API role can use; every function pins
`search_path = ''`. The RPC allowlist is not a list kept here: it is read from the code (every
`<...>.call("cp_...")` in the deployed and operator packages), so a new RPC in the code without
its function in `public`, or a function in `public` that no code calls, fails.

The linter tests run the lints of supabase/splinter (the linter behind Supabase's Security and
Performance Advisors) that apply to a schema without data, adapted as queries below and named
by their splinter id. Not run: 0005_unused_index (needs usage statistics), and the lints about
Supabase's own services (auth settings, storage buckets, pg_graphql, queues, replication slots,
extension versions, table bloat).
"""

from __future__ import annotations

import ast
import json
from collections.abc import Iterator
from contextlib import contextmanager

import psycopg
import pytest

from tests.conftest import ROOT
from tests.factories import Factory

# What runs in production or is run by operators; tests call SQL their own way.
CODE_DIRS = ("shared", "functions", "ops", "devstack", "bench")
PROJECT_SCHEMAS = ("public", "cp_private", "cp_meta")
API_ROLES = ("anon", "authenticated", "service_role")
# Functions granted on purpose to the end-user roles (e.g. one an RLS policy calls): none today.
INTENTIONAL_GRANTS: dict[str, set[str]] = {"anon": set(), "authenticated": set()}


def rpc_names_in_code() -> set[str]:
    """The first argument of every `X.call("cp_...", ...)` under CODE_DIRS (Database.call)."""
    names: set[str] = set()
    for folder in CODE_DIRS:
        for path in sorted((ROOT / folder).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                        and node.func.attr == "call" and node.args):
                    continue
                first = node.args[0]
                if isinstance(first, ast.Constant) and isinstance(first.value, str):
                    if first.value.startswith("cp_"):
                        names.add(first.value)
                elif _receiver(node.func.value).endswith("db"):
                    # A computed name would make the allowlist unknowable from the code.
                    raise AssertionError(f"{path.relative_to(ROOT)}:{node.lineno}: Database.call with a computed name")
    return names


def _receiver(node: ast.expr) -> str:
    return node.attr if isinstance(node, ast.Attribute) else node.id if isinstance(node, ast.Name) else ""


RPC_ALLOWLIST = rpc_names_in_code()

FUNCTIONS = """
select n.nspname, p.proname, p.oid, p.proconfig, p.prosecdef
  from pg_catalog.pg_proc p join pg_catalog.pg_namespace n on n.oid = p.pronamespace
 where n.nspname = any(%s)
   and not exists (select 1 from pg_catalog.pg_depend d where d.objid = p.oid and d.deptype = 'e')
 order by 1, 2
"""


@pytest.fixture
def functions(pg: psycopg.Connection) -> list[tuple[str, str, int, list[str] | None, bool]]:
    rows = pg.execute(FUNCTIONS, (list(PROJECT_SCHEMAS),)).fetchall()
    assert rows, "no functions found: is the schema migrated?"
    return rows


def executable_by(pg: psycopg.Connection, role: str) -> set[str]:
    rows = pg.execute(FUNCTIONS, (list(PROJECT_SCHEMAS),)).fetchall()
    return {f"{schema}.{name}" for schema, name, oid, _, _ in rows
            if pg.execute("select has_function_privilege(%s, %s::oid, 'EXECUTE')", (role, oid)).fetchone()[0]}


# --- the allowlist, search_path and EXECUTE ---------------------------------------------------------------

def test_the_allowlist_is_read_from_the_code() -> None:
    # A call written over several lines (deploy, sweep) is found like a one-liner.
    assert {"cp_ingest_heartbeat", "cp_record_deploy_command", "cp_sweep", "cp_settle"} <= RPC_ALLOWLIST
    assert all(name.startswith("cp_") for name in RPC_ALLOWLIST)


def test_the_data_model_doc_lists_the_allowlist() -> None:
    doc = (ROOT / "docs" / "data-model.md").read_text()
    functions = doc[doc.index("**Functions.**"):].split("\n\n")[0]
    assert sorted(name for name in RPC_ALLOWLIST if f"`{name}`" not in functions) == []


def test_every_function_pins_an_empty_search_path(functions: list[tuple]) -> None:
    unpinned = [f"{schema}.{name} {config}" for schema, name, _, config, _ in functions
                if 'search_path=""' not in (config or [])]
    assert unpinned == [], "functions without `set search_path = ''`"


def test_public_holds_exactly_the_rpcs_the_code_calls(functions: list[tuple]) -> None:
    in_public = {name for schema, name, *_ in functions if schema == "public"}
    assert sorted(in_public - RPC_ALLOWLIST) == [], "functions in public that no code calls: move them to cp_private"
    assert sorted(RPC_ALLOWLIST - in_public) == [], "the code calls functions that public does not have"


def test_service_role_executes_exactly_the_allowlist(pg: psycopg.Connection) -> None:
    assert executable_by(pg, "service_role") == {f"public.{name}" for name in RPC_ALLOWLIST}


@pytest.mark.parametrize("role", ["anon", "authenticated", "public"])
def test_end_user_roles_execute_nothing(pg: psycopg.Connection, role: str) -> None:
    if role == "public":  # PUBLIC is not a role has_function_privilege knows: read the ACLs
        granted = pg.execute("""
            select n.nspname || '.' || p.proname from pg_catalog.pg_proc p
              join pg_catalog.pg_namespace n on n.oid = p.pronamespace
             cross join lateral aclexplode(coalesce(p.proacl, acldefault('f', p.proowner))) a
             where n.nspname = any(%s) and a.grantee = 0""", (list(PROJECT_SCHEMAS),)).fetchall()
        assert [r[0] for r in granted] == []
    else:
        assert executable_by(pg, role) == {f"public.{name}" for name in INTENTIONAL_GRANTS[role]}


def test_rpcs_are_security_definer_and_helpers_are_not(functions: list[tuple]) -> None:
    """The RPCs run as their owner, which is what lets them call helpers no API role may execute."""
    assert {name for schema, name, _, _, definer in functions if definer} == RPC_ALLOWLIST


def test_no_api_role_may_use_the_private_schema(pg: psycopg.Connection) -> None:
    for role in API_ROLES:
        assert pg.execute("select has_schema_privilege(%s, 'cp_private', 'USAGE')", (role,)).fetchone()[0] is False


def test_end_user_roles_hold_no_sequence_privileges(pg: psycopg.Connection) -> None:
    rows = pg.execute("""
        select c.relname, r from pg_catalog.pg_class c join pg_catalog.pg_namespace n on n.oid = c.relnamespace,
               unnest(array['anon', 'authenticated']) r
         where c.relkind = 'S' and n.nspname = 'public'
           and has_sequence_privilege(r, c.oid, 'USAGE, SELECT, UPDATE')""").fetchall()
    assert rows == []


@contextmanager
def as_role(pg: psycopg.Connection, role: str, user_id: str | None = None) -> Iterator[psycopg.Connection]:
    """As PostgREST runs a request: claims set and role switched in a transaction (rolled back here)."""
    claims = {"role": role, **({"sub": user_id} if user_id else {})}
    with pg.transaction(force_rollback=True):
        pg.execute("select set_config('request.jwt.claims', %s, true)", (json.dumps(claims),))
        pg.execute(f"set local role {role}")
        yield pg


def sqlstate_of(conn: psycopg.Connection, statement: str, params: tuple = ()) -> str | None:
    """The SQLSTATE a statement fails with (None: it did not), in a savepoint."""
    try:
        with conn.transaction():
            conn.execute(statement, params)
    except psycopg.Error as exc:
        return exc.sqlstate
    return None


def test_service_role_reaches_the_helpers_only_through_an_rpc(pg: psycopg.Connection, factory: Factory) -> None:
    box = factory.toolbox()
    instance = factory.instance(box, status="stopping")
    with as_role(pg, "service_role") as conn:
        # The RPC calls cp_private.cp_lock_instance, cp_apply_instance_transition, cp_append_event, ...
        row = conn.execute("select public.cp_settle(p_instance_id => %s, p_expected => 'stopping', "
                           "p_to => 'stopped', p_message => 'stopped')", (instance,)).fetchone()[0]
        assert row["status_on_toolbox"] == "stopped"
        # ... and its domain errors come from cp_private.cp_raise.
        assert sqlstate_of(conn, "select public.cp_command_enqueued(gen_random_uuid(), 'x')") == "MC404"
        # Called directly, the helpers are refused (42501: insufficient privilege).
        assert sqlstate_of(conn, "select cp_private.cp_raise('MC409', 'not yours to call')") == "42501"
        assert sqlstate_of(conn, "select cp_private.cp_apply_instance_transition(i, 'running', 'api', 'x') "
                                 "from public.account_tool_instances i where i.id = %s", (instance,)) == "42501"


@pytest.mark.parametrize("role", ["authenticated", "service_role"])
def test_triggers_in_the_private_schema_fire_for_api_roles(pg: psycopg.Connection, factory: Factory,
                                                          role: str) -> None:
    """Triggers run their function without an EXECUTE check, so the API roles' writes still get them."""
    box = factory.toolbox()
    before = pg.execute("select updated_at from account_tool_environments where id = %s", (box.id,)).fetchone()[0]
    with as_role(pg, role, box.user_id) as conn:
        updated = conn.execute("update public.account_tool_environments set name = 'renamed' where id = %s "
                               "returning updated_at", (box.id,)).fetchone()
        assert updated is not None and updated[0] > before  # cp_private.trigger_set_timestamp ran
        if role == "service_role":  # the only API role that may update events at all
            instance = factory.instance(box)
            conn.execute("select public.cp_settle(p_instance_id => %s, p_expected => 'x', p_to => null, "
                         "p_message => 'an event')", (instance,))
            assert sqlstate_of(conn, "update public.account_tool_instance_events set message = 'rewritten'") \
                == "MC409"  # cp_private.forbid_event_update


# --- Supabase's database linter (supabase/splinter), adapted ---------------------------------------------
#
# Each query returns one text per finding. Levels are splinter's. `%(schemas)s` is our schemas;
# `%(exposed)s` those PostgREST serves (Supabase's default: public).

FUNCTIONS_IN = "pg_catalog.pg_proc p join pg_catalog.pg_namespace n on n.oid = p.pronamespace"
AUTH_CALL = r"auth\.(uid|jwt|role|email)\(\)"  # an auth.<function>() call in a deparsed policy

LINTS: dict[str, tuple[str, str]] = {
    "0001_unindexed_foreign_keys": ("INFO", """
        select format('%%s.%%s', c.conrelid::regclass, c.conname)
          from pg_catalog.pg_constraint c join pg_catalog.pg_class t on t.oid = c.conrelid
          join pg_catalog.pg_namespace n on n.oid = t.relnamespace
         where c.contype = 'f' and n.nspname = any(%(schemas)s)
           and not exists (  -- a valid, whole-table index that starts with the key's columns
                 select 1 from pg_catalog.pg_index i
                  where i.indrelid = c.conrelid and i.indisvalid and i.indpred is null
                    and (string_to_array(i.indkey::text, ' ')::int2[])[1:cardinality(c.conkey)] @> c.conkey
                    and (string_to_array(i.indkey::text, ' ')::int2[])[1:cardinality(c.conkey)] <@ c.conkey)
    """),
    "0002_auth_users_exposed": ("WARN", """
        select distinct v.oid::regclass::text
          from pg_catalog.pg_depend d join pg_catalog.pg_rewrite w on w.oid = d.objid
          join pg_catalog.pg_class v on v.oid = w.ev_class join pg_catalog.pg_namespace n on n.oid = v.relnamespace
         where d.refobjid = 'auth.users'::regclass and v.relkind in ('v', 'm') and n.nspname = any(%(exposed)s)
           and (has_table_privilege('anon', v.oid, 'SELECT') or has_table_privilege('authenticated', v.oid, 'SELECT'))
    """),
    "0003_auth_rls_initplan": ("WARN", f"""
        select format('%%s.%%s: %%s', schemaname, tablename, policyname) from pg_catalog.pg_policies
         where schemaname = any(%(schemas)s)
           and ((qual ~ '{AUTH_CALL}' and lower(qual) !~ 'select\\s+{AUTH_CALL}')
             or (with_check ~ '{AUTH_CALL}' and lower(with_check) !~ 'select\\s+{AUTH_CALL}'))
    """),
    "0004_no_primary_key": ("INFO", """
        select c.oid::regclass::text from pg_catalog.pg_class c join pg_catalog.pg_namespace n on n.oid = c.relnamespace
         where c.relkind = 'r' and n.nspname = any(%(schemas)s)
           and not exists (select 1 from pg_catalog.pg_index i where i.indrelid = c.oid and i.indisprimary)
    """),
    "0006_multiple_permissive_policies": ("WARN", """
        select format('%%s for %%s on %%s: %%s', c.oid::regclass, r.rolname, a.cmd, string_agg(p.polname, ', '))
          from pg_catalog.pg_policy p join pg_catalog.pg_class c on c.oid = p.polrelid
          join pg_catalog.pg_namespace n on n.oid = c.relnamespace
          join pg_catalog.pg_roles r on p.polroles @> array[r.oid] or p.polroles = array[0::oid]
         cross join lateral unnest(case p.polcmd when 'r' then array['SELECT'] when 'a' then array['INSERT']
                                                 when 'w' then array['UPDATE'] when 'd' then array['DELETE']
                                                 else array['SELECT', 'INSERT', 'UPDATE', 'DELETE'] end) a(cmd)
         where p.polpermissive and c.relkind = 'r' and n.nspname = any(%(schemas)s)
           and r.rolname !~ '^pg_' and not r.rolbypassrls
         group by c.oid, r.rolname, a.cmd having count(*) > 1
    """),
    "0007_policy_exists_rls_disabled": ("INFO", """
        select distinct c.oid::regclass::text
          from pg_catalog.pg_policy p join pg_catalog.pg_class c on c.oid = p.polrelid
          join pg_catalog.pg_namespace n on n.oid = c.relnamespace
         where c.relkind = 'r' and n.nspname = any(%(schemas)s) and not c.relrowsecurity
    """),
    "0008_rls_enabled_no_policy": ("INFO", """
        select c.oid::regclass::text from pg_catalog.pg_class c join pg_catalog.pg_namespace n on n.oid = c.relnamespace
         where c.relkind = 'r' and n.nspname = any(%(schemas)s) and c.relrowsecurity
           and not exists (select 1 from pg_catalog.pg_policy p where p.polrelid = c.oid)
    """),
    "0009_duplicate_index": ("WARN", """
        select format('%%s: %%s', i.tablename, string_agg(i.indexname, ', ')) from pg_catalog.pg_indexes i
         where i.schemaname = any(%(schemas)s)
         group by i.schemaname, i.tablename, replace(i.indexdef, i.indexname, '') having count(*) > 1
    """),
    "0010_security_definer_view": ("ERROR", """
        select c.oid::regclass::text from pg_catalog.pg_class c join pg_catalog.pg_namespace n on n.oid = c.relnamespace
         where c.relkind = 'v' and n.nspname = any(%(schemas)s)
           and (has_table_privilege('anon', c.oid, 'SELECT') or has_table_privilege('authenticated', c.oid, 'SELECT'))
           and not coalesce(c.reloptions, '{}') && array['security_invoker=1', 'security_invoker=true',
                                                       'security_invoker=yes', 'security_invoker=on']
    """),
    "0011_function_search_path_mutable": ("WARN", f"""
        select p.oid::regprocedure::text from {FUNCTIONS_IN}
         where n.nspname = any(%(schemas)s)
           and not exists (select 1 from pg_catalog.pg_depend d where d.objid = p.oid and d.deptype = 'e')
           and not exists (select 1 from unnest(coalesce(p.proconfig, '{{}}')) s where s like 'search_path=%%')
    """),
    "0013_rls_disabled_in_public": ("ERROR", """
        select c.oid::regclass::text from pg_catalog.pg_class c join pg_catalog.pg_namespace n on n.oid = c.relnamespace
         where c.relkind = 'r' and n.nspname = 'public' and not c.relrowsecurity
    """),
    "0014_extension_in_public": ("WARN", """
        select e.extname from pg_catalog.pg_extension e where e.extnamespace = 'public'::regnamespace
    """),
    "0015_rls_references_user_metadata": ("ERROR", """
        select format('%%s.%%s: %%s', schemaname, tablename, policyname) from pg_catalog.pg_policies
         where schemaname = any(%(schemas)s)
           and (coalesce(qual, '') || ' ' || coalesce(with_check, ''))
               ~ '(auth\\.jwt\\(\\)|request\\.jwt\\.claims).*user_metadata'
    """),
    "0016_materialized_view_in_api": ("WARN", """
        select c.oid::regclass::text from pg_catalog.pg_class c join pg_catalog.pg_namespace n on n.oid = c.relnamespace
         where c.relkind = 'm' and n.nspname = any(%(exposed)s)
           and (has_table_privilege('anon', c.oid, 'SELECT') or has_table_privilege('authenticated', c.oid, 'SELECT'))
    """),
    "0024_rls_policy_always_true": ("WARN", """
        select format('%%s.%%s: %%s', schemaname, tablename, policyname) from pg_catalog.pg_policies
         where schemaname = any(%(schemas)s) and permissive = 'PERMISSIVE'
           and (roles && array['public', 'anon', 'authenticated']::name[])
           and ((cmd in ('UPDATE', 'DELETE', 'ALL')
                 and (regexp_replace(lower(coalesce(qual, '')), '\\s', '', 'g') in ('true', '(true)', '1=1', '(1=1)')
                      or qual is null))
             or regexp_replace(lower(coalesce(with_check, '')), '\\s', '', 'g') in ('true', '(true)', '1=1', '(1=1)')
             or (with_check is null and cmd = 'INSERT'))
    """),
    "0028_anon_security_definer_function_executable": ("WARN", f"""
        select p.oid::regprocedure::text from {FUNCTIONS_IN}
         where p.prosecdef and n.nspname = any(%(schemas)s)
           and has_function_privilege('anon', p.oid, 'EXECUTE')
    """),
    "0029_authenticated_security_definer_function_executable": ("WARN", f"""
        select p.oid::regprocedure::text from {FUNCTIONS_IN}
         where p.prosecdef and n.nspname = any(%(schemas)s)
           and has_function_privilege('authenticated', p.oid, 'EXECUTE')
    """),
}

# INFO findings we keep on purpose, with the reason. Anything else at INFO fails too.
EXPECTED_INFO = {
    # Written and read by the service role only (through the RPCs): RLS on and no policy means
    # the API roles see no row, on top of having no grant.
    ("0008_rls_enabled_no_policy", "dtma_commands"),
    ("0008_rls_enabled_no_policy", "idempotency_keys"),
    # Only a partial index (open commands) starts with the toolbox id: deleting a toolbox scans the
    # commands for the cascade. Toolboxes are deleted rarely; an index would cost every insert.
    ("0001_unindexed_foreign_keys", "dtma_commands.dtma_commands_account_tool_environment_id_fkey"),
}


def run_linter(pg: psycopg.Connection) -> list[tuple[str, str, str]]:
    """(lint, level, finding) for every finding. Policy texts are deparsed with search_path ''
    so auth.* calls keep their schema, as the splinter notes require."""
    findings = []
    with pg.transaction(force_rollback=True):
        pg.execute("set local search_path = ''")
        for lint, (level, query) in LINTS.items():
            for (finding,) in pg.execute(query, {"schemas": list(PROJECT_SCHEMAS), "exposed": ["public"]}):
                findings.append((lint, level, finding))
    return findings


@pytest.fixture
def lint_findings(pg: psycopg.Connection) -> list[tuple[str, str, str]]:
    return run_linter(pg)


def test_the_linter_finds_nothing_at_warn_or_error(lint_findings: list[tuple[str, str, str]]) -> None:
    assert [f for f in lint_findings if f[1] != "INFO"] == []


def test_the_linters_info_findings_are_the_intended_ones(lint_findings: list[tuple[str, str, str]]) -> None:
    info = {(lint, finding.removeprefix("public.")) for lint, level, finding in lint_findings if level == "INFO"}
    assert info == EXPECTED_INFO


def test_the_linter_sees_what_it_should(pg: psycopg.Connection) -> None:
    """Each WARN/ERROR lint catches a schema broken the way it looks for (rolled back after)."""
    broken = {
        "0003_auth_rls_initplan": "create policy lint_probe on public.tool_catalog for select to authenticated "
                                  "using (auth.uid() is not null)",
        "0006_multiple_permissive_policies": "create policy lint_probe on public.tool_catalog for select "
                                             "to authenticated using (true)",
        "0009_duplicate_index": "create index lint_probe on public.tool_catalog (status)",
        "0010_security_definer_view": "create view public.lint_probe as select 1 as x; "
                                      "grant select on public.lint_probe to anon",
        "0011_function_search_path_mutable": "create function cp_private.lint_probe() returns int language sql "
                                             "as 'select 1'",
        "0013_rls_disabled_in_public": "create table public.lint_probe (id int primary key)",
        "0015_rls_references_user_metadata": "create policy lint_probe on public.tool_catalog for update "
                                             "to authenticated using (auth.jwt() -> 'user_metadata' ->> 'role' "
                                             "= 'admin')",
        "0024_rls_policy_always_true": "create policy lint_probe on public.tool_catalog for delete "
                                       "to authenticated using (true)",
        "0028_anon_security_definer_function_executable": "create function public.lint_probe() returns int "
                                                          "language sql security definer set search_path = '' "
                                                          "as 'select 1'; grant execute on function "
                                                          "public.lint_probe() to anon",
    }
    for lint, ddl in broken.items():
        with pg.transaction(force_rollback=True):
            pg.execute(ddl)
            assert lint in {name for name, _, _ in run_linter(pg)}, lint
