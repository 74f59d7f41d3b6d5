"""`mcp-toolbox`: register toolboxes (hosts running the DTMA agent), list them, issue their keys.

    mcp-toolbox register --user <email or user id> --address <IPv4/IPv6> [--dtma-port N] ...
    mcp-toolbox list [--user <email or id>] [--status S]
    mcp-toolbox users [--search TEXT]
    mcp-toolbox credentials <toolbox-id> [--rotate] [--heartbeat-url URL]   (= mcp-toolbox-credentials)

Settings come from the environment as the functions read them: DATABASE_URL, DTMA_KEY_MODE
(`derived`, the default, or `legacy`), DTMA_KEY_SECRET (derived) or BACKEND_TO_DTMA_API_KEY
(legacy). With the local stack, `set -a; . .local/stack.env; . .local/secrets.env; set +a` sets
all of them, and FUNCTIONS_URL, from which the heartbeat URL is derived.

`register` inserts the toolbox row and records its key's digest in one transaction, then prints
the toolbox id and the two `/etc/dtma.conf` lines the agent needs. Nothing is written when any
input is wrong. Exit status: 0 done, 2 bad input (nothing written), 1 the database failed.
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import re
import sys
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import psycopg

from ops import credentials
from ops.rows import insert_toolbox

PROG = "mcp-toolbox"
FLEET_DTMA_PORT = 30000  # the functions' DTMA_PORT default: a toolbox with dtma_port NULL is called there
REGISTER_STATUSES = ("awaiting_heartbeat", "active")
# Toolboxes in these statuses are on their way out: their address, droplet and name may be reused.
RETIRED = ("deprovisioned", "deprovisioning", "pending_deprovision", "pending_deletion", "deleting")
SLUG = re.compile(r"^[a-z0-9][a-z0-9-]{0,62}$")
FIND_USERS = f"{PROG} users [--search TEXT]"
BIGINT_MAX = 2**63 - 1


class Refused(Exception):
    """Bad input found while looking at the database (exit 2; the transaction is rolled back)."""


def _fail(problems: list[str], verb: str = "register") -> int:
    print(f"{PROG} {verb}: refused, nothing was written:", file=sys.stderr)
    for problem in problems:
        print(f"  - {problem}", file=sys.stderr)
    return 2


def _db_error(verb: str, exc: psycopg.Error) -> int:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    print(f"{PROG} {verb}: the database failed: {text}", file=sys.stderr)
    return 1


# --- input validation ----------------------------------------------------------------------------------------


def parse_address(raw: str) -> tuple[str | None, str | None, str | None]:
    """(address, problem, note): the address as PostgreSQL `inet` stores it, or why it is refused."""
    text = raw.strip()
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        hint = " (a network, not a host address)" if "/" in text else ""
        return None, (f"--address {raw!r} is not an IPv4 or IPv6 address{hint}; give the address the "
                      "functions reach the DTMA at (host names are not accepted)"), None
    if isinstance(address, ipaddress.IPv6Address):
        if address.scope_id:
            return None, f"--address {raw!r}: zone ids (%...) cannot be stored or used by the functions", None
        if address.ipv4_mapped is not None:
            address = address.ipv4_mapped
    if address.is_unspecified:
        return None, f"--address {address} is the unspecified address, not one the functions can call", None
    if address.is_multicast:
        return None, f"--address {address} is a multicast address, not a host", None
    note = None
    if address.is_loopback or address.is_private or address.is_link_local or address.is_reserved:
        note = (f"{address} is not a public address: the functions call it only with "
                "ALLOW_PRIVATE_TOOLBOX_IPS=true (the local stack sets it; never set it in production)")
    return str(address), None, note


def parse_port(raw: str | None) -> tuple[int | None, str | None]:
    if raw is None:
        return None, None
    try:
        port = int(raw.strip())
    except ValueError:
        return None, f"--dtma-port {raw!r} is not a number"
    if not 1 <= port <= 65535:
        return None, f"--dtma-port must be 1..65535 (got {port})"
    return port, None


def parse_heartbeat_url(raw: str) -> tuple[str | None, str | None, str | None]:
    """(base URL as the agent gets it, problem, note)."""
    url = raw.strip().rstrip("/")
    if not url:
        return None, ("no heartbeat URL: pass --heartbeat-url (the URL of the dtma_heartbeat_ingest function; "
                      "locally $FUNCTIONS_URL/dtma_heartbeat_ingest, which is used when FUNCTIONS_URL is set)"), None
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return None, f"--heartbeat-url {raw!r} is not an http(s) URL", None
    if parts.query or parts.fragment or parts.username or parts.password:
        return None, f"--heartbeat-url {raw!r}: no query, fragment or credentials (the agent appends /heartbeat)", None
    if parts.path.endswith("/heartbeat"):
        return None, (f"--heartbeat-url {raw!r} ends with /heartbeat, which the agent appends itself: "
                      f"pass {url.removesuffix('/heartbeat')}"), None
    note = None
    try:
        loopback = ipaddress.ip_address(parts.hostname).is_loopback
    except ValueError:
        loopback = parts.hostname == "localhost"
    if parts.scheme == "http" and not loopback:
        note = "the heartbeat URL is plain http: the toolbox's token would cross the network in clear"
    return url, None, note


def _user_ref(raw: str) -> tuple[str | None, str | None, str | None]:
    """(user id, email, problem) from --user."""
    text = raw.strip()
    try:
        return str(uuid.UUID(text)), None, None
    except ValueError:
        pass
    if re.fullmatch(r"[^@\s]+@[^@\s]+", text):
        return None, text, None
    return None, None, f"--user {raw!r} is neither an email address nor a user id (UUID)"


def _problem_if_bad_text(flag: str, value: str, *, limit: int = 64) -> str | None:
    if not value.strip():
        return f"{flag} is empty"
    if len(value) > limit:
        return f"{flag} is longer than {limit} characters"
    if any(ord(c) < 32 or ord(c) == 127 for c in value):
        return f"{flag} contains control characters"
    return None


@dataclass(frozen=True)
class Registration:
    user_id: str | None
    email: str | None
    address: str
    dtma_port: int | None
    name: str
    region: str
    size: str
    droplet_id: int | None
    status: str
    heartbeat_url: str
    conf_out: Path | None

    @property
    def where(self) -> str:
        return hostport(self.address, self.dtma_port)


def hostport(address: str | None, port: int | None) -> str:
    host = address or "?"
    if ":" in host:
        host = f"[{host}]"
    return f"{host}:{port or FLEET_DTMA_PORT}"


def validate(args: argparse.Namespace, keys: credentials.KeySettings) -> tuple[Registration | None, list[str],
                                                                               list[str]]:
    """Every problem with the arguments at once (and notes worth printing), before touching the database."""
    problems: list[str] = []
    notes: list[str] = []
    if not args.database_url:
        problems.append("no database: pass --database-url or set DATABASE_URL")
    if (problem := keys.problem()) is not None:
        problems.append(problem)
    user_id, email, problem = _user_ref(args.user)
    if problem:
        problems.append(problem)
    address, problem, note = parse_address(args.address)
    problems += [problem] if problem else []
    notes += [note] if note else []
    port, problem = parse_port(args.dtma_port)
    problems += [problem] if problem else []
    name = (args.name if args.name is not None else f"toolbox-{address or args.address}").strip()
    if (problem := _problem_if_bad_text("--name", name)) is not None:
        problems.append(problem)
    for flag, value in (("--region", args.region), ("--size", args.size)):
        if not SLUG.fullmatch(value):
            problems.append(f"{flag} {value!r} is not a slug (lower-case letters, digits and -, like nyc3 or "
                            "s-1vcpu-1gb)")
    droplet_id = None
    if args.droplet_id is not None:
        try:
            droplet_id = int(args.droplet_id)
        except ValueError:
            droplet_id = 0
        if not 1 <= droplet_id <= BIGINT_MAX:
            problems.append(f"--droplet-id {args.droplet_id!r} is not a positive number")
            droplet_id = None
    heartbeat_url, problem, note = parse_heartbeat_url(args.heartbeat_url)
    problems += [problem] if problem else []
    notes += [note] if note else []
    conf_out = None
    if args.conf_out is not None:
        conf_out = Path(args.conf_out)
        if keys.mode == "legacy":
            problems.append("--conf-out: in legacy mode the agent takes its two tokens from environment "
                            "variables, there is no /etc/dtma.conf form")
        elif conf_out.is_dir() or not conf_out.parent.is_dir():
            problems.append(f"--conf-out {conf_out}: not a file in an existing directory")
    if problems:
        return None, problems, notes
    assert address is not None and heartbeat_url is not None
    return Registration(user_id=user_id, email=email, address=address, dtma_port=port, name=name,
                        region=args.region, size=args.size, droplet_id=droplet_id, status=args.status,
                        heartbeat_url=heartbeat_url, conf_out=conf_out), [], notes


# --- register --------------------------------------------------------------------------------------------------


def _find_user(conn: psycopg.Connection, reg: Registration) -> tuple[str, str | None]:
    if reg.user_id is not None:
        rows = conn.execute("select id::text, email from auth.users where id = %s", (reg.user_id,)).fetchall()
        wanted = f"with id {reg.user_id}"
    else:
        rows = conn.execute("select id::text, email from auth.users where lower(email) = lower(%s) order by id",
                            (reg.email,)).fetchall()
        wanted = f"with email {reg.email}"
    if not rows:
        raise Refused(f"no user {wanted} in auth.users: the user must have signed up first; list users with "
                      f"`{FIND_USERS}` (the local stack's demo user is DEMO_USER_EMAIL in .local/stack.env)")
    if len(rows) > 1:
        raise Refused(f"several users {wanted}: {', '.join(r[0] for r in rows)}; pass --user <id>")
    return rows[0][0], rows[0][1]


def _check_conflicts(conn: psycopg.Connection, reg: Registration, user_id: str) -> None:
    problems = []
    if reg.droplet_id is not None:
        row = conn.execute("select id::text, name from public.account_tool_environments where do_droplet_id = %s",
                           (reg.droplet_id,)).fetchone()
        if row is not None:
            problems.append(f"--droplet-id {reg.droplet_id} is already toolbox {row[0]} ({row[1]})")
    row = conn.execute(
        """select id::text, name, status::text from public.account_tool_environments
            where public_ip_address = %s::inet and coalesce(dtma_port, %s) = %s and status::text <> all(%s)
            order by created_at limit 1""",
        (reg.address, FLEET_DTMA_PORT, reg.dtma_port or FLEET_DTMA_PORT, list(RETIRED))).fetchone()
    if row is not None:
        problems.append(
            f"toolbox {row[0]} ({row[1]}, {row[2]}) already has its DTMA at {reg.where}; one agent holds one "
            f"toolbox's key. To print that toolbox's key again: `{PROG} credentials {row[0]}`")
    row = conn.execute(
        """select id::text from public.account_tool_environments
            where user_id = %s and name = %s and status::text <> all(%s) limit 1""",
        (user_id, reg.name, list(RETIRED))).fetchone()
    if row is not None:
        problems.append(f"this user already has a toolbox named {reg.name!r} ({row[0]}); pass another --name")
    if problems:
        raise Refused("\n  - ".join(problems))


def _write_conf(path: Path, lines: list[str]) -> None:
    """The /etc/dtma.conf lines, readable by the owner only from the first byte on."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "w") as handle:
            handle.write("".join(line + "\n" for line in lines))
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def register(conninfo: str, reg: Registration, keys: credentials.KeySettings) -> dict[str, Any]:
    """Insert the toolbox and record its key in ONE transaction; what was registered, with the token."""
    wrote_conf = False
    try:
        with psycopg.connect(conninfo, connect_timeout=10) as conn, conn.transaction():
            user_id, email = _find_user(conn, reg)
            _check_conflicts(conn, reg, user_id)
            try:
                row = (insert_toolbox(conn, user_id=user_id, name=reg.name,
                                      description="registered with mcp-toolbox register", droplet_id=reg.droplet_id,
                                      address=reg.address, dtma_port=reg.dtma_port, status=reg.status,
                                      region=reg.region, size=reg.size),)
            except psycopg.errors.UniqueViolation as exc:  # a concurrent registration won the race
                raise Refused(f"conflicts with a toolbox registered meanwhile: {exc.diag.message_detail or exc}") \
                    from None
            assert row is not None
            toolbox_id = row[0]
            token, version = credentials.issue_in(conn, toolbox_id, rotate=False, key_mode=keys.mode,
                                                  master_secret=keys.master_secret, legacy_key=keys.legacy_key)
            if reg.conf_out is not None:
                _write_conf(reg.conf_out, conf_lines(token, reg.heartbeat_url))
                wrote_conf = True
    except BaseException:
        if wrote_conf and reg.conf_out is not None:
            reg.conf_out.unlink(missing_ok=True)  # the key it holds was never recorded
        raise
    return {"id": toolbox_id, "user_id": user_id, "email": email, "token": token, "key_version": version}


def conf_lines(token: str, heartbeat_url: str) -> list[str]:
    return [f"DTMA_AUTH_TOKEN={token}", f"AGENTOPIA_API_BASE_URL={heartbeat_url}"]


def _print_registered(reg: Registration, done: dict[str, Any], keys: credentials.KeySettings) -> None:
    who = done["email"] or done["user_id"]
    print(f"# registered for {who} (user {done['user_id']}): name {reg.name!r}, DTMA at {reg.where}, "
          f"region {reg.region}, size {reg.size}"
          + (f", droplet {reg.droplet_id}" if reg.droplet_id is not None else ""))
    print(f"# status {reg.status}, key version {done['key_version']}; the database keeps only the key's SHA-256")
    print(f"TOOLBOX_ID={done['id']}")
    if keys.mode == "derived" and reg.conf_out is not None:
        print(f"# the /etc/dtma.conf lines (DTMA_AUTH_TOKEN, AGENTOPIA_API_BASE_URL) are in {reg.conf_out} "
              "(mode 600)")
    else:
        for line in credentials.credential_lines(done["token"], keys.mode, reg.heartbeat_url):
            print(line)
    first = ("its first heartbeat makes the toolbox active" if reg.status == "awaiting_heartbeat"
             else "it must heartbeat within 3 heartbeat intervals + grace or it turns unresponsive")
    print(f"# next: install /etc/dtma.conf on the toolbox and (re)start the agent; {first}. "
          f"`{PROG} list` shows it.")
    if keys.mode == "derived":
        print(f"# the key is derived, not stored: `{PROG} credentials <toolbox id>` prints it again")


def cmd_register(args: argparse.Namespace) -> int:
    keys = credentials.KeySettings.from_env()
    reg, problems, notes = validate(args, keys)
    if reg is None:
        return _fail(problems)
    try:
        done = register(args.database_url, reg, keys)
    except Refused as exc:
        return _fail([str(exc)])
    except psycopg.Error as exc:
        return _db_error("register", exc)
    except OSError as exc:
        print(f"{PROG} register: cannot write {reg.conf_out}: {exc.strerror or exc}; nothing was registered",
              file=sys.stderr)
        return 1
    _print_registered(reg, done, keys)
    for note in notes:
        print(f"{PROG} register: note: {note}", file=sys.stderr)
    return 0


# --- list and users ----------------------------------------------------------------------------------------------


def _age(seconds: float | None) -> str:
    if seconds is None:
        return "never"
    s = max(0, int(seconds))
    if s < 120:
        return f"{s} s ago"
    if s < 7200:
        return f"{s // 60} min ago"
    if s < 172800:
        return f"{s // 3600} h ago"
    return f"{s // 86400} d ago"


def _table(header: Sequence[str], rows: list[Sequence[str]]) -> None:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    for r in [header, *rows]:
        print("  ".join(str(v).ljust(w) for v, w in zip(r, widths, strict=True)).rstrip())


def cmd_list(args: argparse.Namespace) -> int:
    problems = [] if args.database_url else ["no database: pass --database-url or set DATABASE_URL"]
    where, params = [], []
    if args.user is not None:
        user_id, email, problem = _user_ref(args.user)
        if problem:
            problems.append(problem)
        elif user_id:
            where.append("e.user_id = %s")
            params.append(user_id)
        else:
            where.append("lower(u.email) = lower(%s)")
            params.append(email)
    if args.status is not None:
        where.append("e.status::text = %s")
        params.append(args.status)
    if problems:
        return _fail(problems, "list")
    sql = ("select e.id::text, coalesce(u.email, e.user_id::text), coalesce(e.name, ''), host(e.public_ip_address),"
           " e.dtma_port, e.status::text, extract(epoch from now() - e.last_heartbeat_at)::float8"
           " from public.account_tool_environments e left join auth.users u on u.id = e.user_id"
           + (" where " + " and ".join(where) if where else "") + " order by e.created_at, e.id")
    try:
        with psycopg.connect(args.database_url, connect_timeout=10) as conn:
            rows = conn.execute(sql, params).fetchall()
    except psycopg.Error as exc:
        return _db_error("list", exc)
    if not rows:
        print("no toolboxes" + (" match" if where else ""))
        return 0
    _table(("ID", "USER", "NAME", "DTMA", "STATUS", "LAST HEARTBEAT"),
           [(r[0], r[1], r[2], hostport(r[3], r[4]), r[5], _age(r[6])) for r in rows])
    return 0


def cmd_users(args: argparse.Namespace) -> int:
    if not args.database_url:
        return _fail(["no database: pass --database-url or set DATABASE_URL"], "users")
    if args.limit < 1:
        return _fail(["--limit must be >= 1"], "users")
    pattern = f"%{args.search}%" if args.search else "%"
    try:
        with psycopg.connect(args.database_url, connect_timeout=10) as conn:
            rows = conn.execute(
                """select u.id::text, coalesce(u.email, ''), to_char(u.created_at, 'YYYY-MM-DD'),
                          (select count(*) from public.account_tool_environments e where e.user_id = u.id)
                     from auth.users u where coalesce(u.email, '') ilike %s
                    order by u.created_at, u.id limit %s""", (pattern, args.limit)).fetchall()
    except psycopg.Error as exc:
        return _db_error("users", exc)
    if not rows:
        print("no users" + (" match" if args.search else ""))
        return 0
    _table(("ID", "EMAIL", "CREATED", "TOOLBOXES"), [(r[0], r[1], r[2], str(r[3])) for r in rows])
    return 0


# --- command line ------------------------------------------------------------------------------------------------


def build_parser(environ: Mapping[str, str] | None = None) -> argparse.ArgumentParser:
    env = os.environ if environ is None else environ
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=__doc__.split("\n\n", 1)[1])
    sub = parser.add_subparsers(dest="command", metavar="{register,list,users,credentials}")
    sub.required = True

    def database_option(p: argparse.ArgumentParser) -> None:
        p.add_argument("--database-url", default=env.get("DATABASE_URL"), help="PostgreSQL URL (default $DATABASE_URL)")

    reg = sub.add_parser("register", help="register a toolbox and issue its key",
                         description="Insert a toolbox (one DTMA agent) for a user, issue its key and print the "
                         "/etc/dtma.conf lines. One transaction: on any error nothing is written (exit 2 for "
                         "bad input, 1 when the database fails).")
    reg.add_argument("--user", required=True, help="the owner: email or user id (auth.users; see `mcp-toolbox users`)")
    reg.add_argument("--address", required=True, help="IPv4 or IPv6 address the functions reach the DTMA at")
    reg.add_argument("--dtma-port", help=f"the DTMA's port when not the fleet's ({FLEET_DTMA_PORT}); stored as "
                     "given, omitted = the functions' DTMA_PORT")
    reg.add_argument("--name", help="toolbox name shown to the user (default toolbox-<address>)")
    reg.add_argument("--region", default="nyc3", help="region slug (default %(default)s)")
    reg.add_argument("--size", default="s-1vcpu-1gb", help="size slug (default %(default)s)")
    reg.add_argument("--droplet-id", help="DigitalOcean droplet id, if any (unique)")
    reg.add_argument("--status", choices=REGISTER_STATUSES, default="awaiting_heartbeat",
                     help="awaiting_heartbeat (default): active at the first heartbeat; active: usable at once")
    reg.add_argument("--heartbeat-url", default=credentials.default_heartbeat_url(env),
                     help="URL of the dtma_heartbeat_ingest function, AGENTOPIA_API_BASE_URL on the toolbox "
                     "(default $HEARTBEAT_FUNCTION_URL, else $FUNCTIONS_URL/dtma_heartbeat_ingest)")
    reg.add_argument("--conf-out", metavar="FILE",
                     help="write the two /etc/dtma.conf lines to FILE (mode 600) instead of printing them")
    database_option(reg)
    reg.set_defaults(run=cmd_register)

    lst = sub.add_parser("list", help="toolboxes: id, user, name, DTMA address, status, last heartbeat")
    lst.add_argument("--user", help="only this user's (email or id)")
    lst.add_argument("--status", help="only toolboxes in this status")
    database_option(lst)
    lst.set_defaults(run=cmd_list)

    users = sub.add_parser("users", help="users (auth.users) who can own toolboxes")
    users.add_argument("--search", help="only emails containing TEXT")
    users.add_argument("--limit", type=int, default=50, help="at most N users (default %(default)s)")
    database_option(users)
    users.set_defaults(run=cmd_users)

    sub.add_parser("credentials", help="print (or --rotate) a toolbox's key: mcp-toolbox credentials --help",
                   add_help=False)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args_list = list(sys.argv[1:] if argv is None else argv)
    if args_list and args_list[0] == "credentials":
        return credentials.main(args_list[1:], prog=f"{PROG} credentials")
    args = build_parser().parse_args(args_list)
    return int(args.run(args))


if __name__ == "__main__":
    sys.exit(main())
