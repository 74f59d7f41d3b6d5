"""`mcp-toolbox` (ops/toolbox.py) and `mcp-toolbox-credentials` (ops/credentials.py) as an operator runs them.

Each command is called through its `main([...])` against the test database; what it printed is
checked, and so is the database: the row `register` wrote, with the right columns and the digest
of the printed key, which must open the heartbeat function; bad input is refused with exit 2, a
message naming the problem, and no row written.
"""

from __future__ import annotations

import hashlib
import re
import stat
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg.rows import dict_row

from ops import credentials, toolbox
from shared.core.toolbox_keys import derive_key
from tests.factories import MASTER_SECRET, Factory

HEARTBEAT_URL = "http://127.0.0.1:54321/functions/v1/dtma_heartbeat_ingest"
BEAT = {"dtma_version": "0.1.0", "system_status": {}, "tool_statuses": []}


@pytest.fixture(autouse=True)
def key_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Derived keys from the tests' master secret; nothing from the developer's shell."""
    for name in ("DATABASE_URL", "DTMA_KEY_MODE", "BACKEND_TO_DTMA_API_KEY", "FUNCTIONS_URL",
                 "HEARTBEAT_FUNCTION_URL"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("DTMA_KEY_SECRET", MASTER_SECRET)


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = toolbox.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def register(capsys: pytest.CaptureFixture[str], database_url: str, *argv: str) -> tuple[int, str, str]:
    return run(capsys, "register", *argv, "--database-url", database_url)


def values(out: str) -> dict[str, str]:
    return dict(line.split("=", 1) for line in out.splitlines() if re.match(r"^[A-Z_]+=", line))


def toolboxes(pg: psycopg.Connection) -> list[dict[str, Any]]:
    return pg.cursor(row_factory=dict_row).execute(
        "select *, host(public_ip_address) as address from account_tool_environments order by created_at").fetchall()


# --- register: the happy paths -----------------------------------------------------------------------------------


def test_register_writes_the_row_and_prints_the_key_and_dtma_conf_once(
        capsys: pytest.CaptureFixture[str], database_url: str, factory: Factory, pg: psycopg.Connection,
        function_client: Callable[..., Any]) -> None:
    user_id = factory.user("Operator@Example.test")
    code, out, err = register(capsys, database_url, "--user", "operator@example.test", "--address", "127.0.0.1",
                              "--dtma-port", "30001", "--name", "real-agent", "--region", "local",
                              "--size", "s-2vcpu-2gb", "--droplet-id", "4242", "--heartbeat-url", HEARTBEAT_URL + "/")
    assert code == 0, err
    assert "ALLOW_PRIVATE_TOOLBOX_IPS=true" in err  # loopback: a note, not a refusal

    printed = values(out)
    toolbox_id, token = printed["TOOLBOX_ID"], printed["DTMA_AUTH_TOKEN"]
    # Each dtma.conf line, the id and the key are printed exactly once.
    assert out.splitlines().count(f"DTMA_AUTH_TOKEN={token}") == 1
    assert out.splitlines().count(f"AGENTOPIA_API_BASE_URL={HEARTBEAT_URL}") == 1  # trailing slash dropped
    assert out.count("AGENTOPIA_API_BASE_URL=") == 1
    assert out.count(token) == 1 and out.count(toolbox_id) == 1

    [row] = toolboxes(pg)
    assert str(row["id"]) == toolbox_id and str(row["user_id"]) == user_id
    assert (row["name"], row["address"], row["dtma_port"], row["status"]) == \
        ("real-agent", "127.0.0.1", 30001, "awaiting_heartbeat")
    assert (row["region_slug"], row["size_slug"], row["do_droplet_id"], row["dtma_key_version"]) == \
        ("local", "s-2vcpu-2gb", 4242, 1)
    assert row["last_heartbeat_at"] is None
    assert token == derive_key(MASTER_SECRET, toolbox_id, 1)  # what the functions will send to the agent
    assert bytes(row["dtma_token_sha256"]) == hashlib.sha256(token.encode()).digest()

    # The printed token opens the heartbeat function, and the first heartbeat makes the toolbox active.
    response = function_client("dtma_heartbeat_ingest").post(
        "/heartbeat", json=BEAT, headers={"Authorization": f"Bearer {token}"})
    assert response.status_code == 204, response.get_data(as_text=True)
    [row] = toolboxes(pg)
    assert row["status"] == "active" and row["last_heartbeat_at"] is not None


def test_register_by_user_id_with_defaults_and_an_ipv6_address(
        capsys: pytest.CaptureFixture[str], database_url: str, factory: Factory, pg: psycopg.Connection) -> None:
    user_id = factory.user()
    code, out, err = register(capsys, database_url, "--user", user_id.upper(), "--address", "2606:4700:4700::AB",
                              "--status", "active", "--heartbeat-url", "https://ingest.example.test")
    assert code == 0, err
    assert err == ""  # a public address over https: nothing to note
    [row] = toolboxes(pg)
    assert (str(row["user_id"]), row["address"], row["dtma_port"], row["status"]) == \
        (user_id, "2606:4700:4700::ab", None, "active")  # no --dtma-port: the fleet's DTMA_PORT
    assert (row["name"], row["region_slug"], row["size_slug"], row["do_droplet_id"]) == \
        ("toolbox-2606:4700:4700::ab", "nyc3", "s-1vcpu-1gb", None)
    assert "AGENTOPIA_API_BASE_URL=https://ingest.example.test\n" in out


def test_register_takes_the_heartbeat_url_from_the_local_stacks_environment(
        capsys: pytest.CaptureFixture[str], database_url: str, factory: Factory, pg: psycopg.Connection,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """After `set -a; . .local/stack.env; . .local/secrets.env; set +a` no URL needs typing."""
    monkeypatch.setenv("DATABASE_URL", database_url)
    monkeypatch.setenv("FUNCTIONS_URL", "http://127.0.0.1:54321/functions/v1")
    email = f"demo-{uuid.uuid4().hex[:6]}@example.test"
    factory.user(email)
    code, out, err = run(capsys, "register", "--user", email, "--address", "127.0.0.1", "--dtma-port", "30000")
    assert code == 0, err
    assert values(out)["AGENTOPIA_API_BASE_URL"] == HEARTBEAT_URL
    assert toolboxes(pg)[0]["dtma_port"] == 30000


def test_conf_out_writes_the_two_lines_readable_by_the_owner_only(
        capsys: pytest.CaptureFixture[str], database_url: str, factory: Factory, pg: psycopg.Connection,
        tmp_path: Path) -> None:
    factory.user("conf@example.test")
    conf = tmp_path / "dtma.conf"
    code, out, err = register(capsys, database_url, "--user", "conf@example.test", "--address", "203.0.113.7",
                              "--heartbeat-url", "https://ingest.example.test", "--conf-out", str(conf))
    assert code == 0, err
    [row] = toolboxes(pg)
    token = derive_key(MASTER_SECRET, str(row["id"]), 1)
    assert conf.read_text() == f"DTMA_AUTH_TOKEN={token}\nAGENTOPIA_API_BASE_URL=https://ingest.example.test\n"
    assert stat.S_IMODE(conf.stat().st_mode) == 0o600
    assert token not in out and str(conf) in out
    assert values(out)["TOOLBOX_ID"] == str(row["id"])


def test_legacy_mode_issues_a_random_heartbeat_token(
        capsys: pytest.CaptureFixture[str], database_url: str, factory: Factory, pg: psycopg.Connection,
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DTMA_KEY_MODE", "legacy")
    monkeypatch.setenv("BACKEND_TO_DTMA_API_KEY", "global-legacy-key")
    monkeypatch.delenv("DTMA_KEY_SECRET")
    factory.user("legacy@example.test")
    code, out, err = register(capsys, database_url, "--user", "legacy@example.test", "--address", "203.0.113.8",
                              "--heartbeat-url", "https://ingest.example.test")
    assert code == 0, err
    token = values(out)["DTMA_BEARER_TOKEN"]
    assert "DTMA_AUTH_TOKEN" not in out and "global-legacy-key" not in out
    assert bytes(toolboxes(pg)[0]["dtma_token_sha256"]) == hashlib.sha256(token.encode()).digest()


# --- register: refusals ------------------------------------------------------------------------------------------

GOOD = {"--user": "known@example.test", "--address": "203.0.113.9", "--heartbeat-url": "https://ingest.example.test"}


@pytest.mark.parametrize(("change", "message"), [
    ({"--user": "nobody@example.test"}, "no user with email nobody@example.test in auth.users"),
    ({"--user": str(uuid.UUID(int=7))}, "mcp-toolbox users"),
    ({"--user": "not a user"}, "neither an email address nor a user id"),
    ({"--address": "300.1.2.3"}, "is not an IPv4 or IPv6 address"),
    ({"--address": "droplet.example.test"}, "host names are not accepted"),
    ({"--address": "203.0.113.0/24"}, "a network, not a host address"),
    ({"--address": "0.0.0.0"}, "unspecified address"),
    ({"--address": "fe80::1%eth0"}, "zone ids"),
    ({"--dtma-port": "0"}, "--dtma-port must be 1..65535 (got 0)"),
    ({"--dtma-port": "70000"}, "--dtma-port must be 1..65535 (got 70000)"),
    ({"--dtma-port": "http"}, "--dtma-port 'http' is not a number"),
    ({"--droplet-id": "-3"}, "--droplet-id '-3' is not a positive number"),
    ({"--region": "NYC 3"}, "--region 'NYC 3' is not a slug"),
    ({"--size": ""}, "--size '' is not a slug"),
    ({"--name": " "}, "--name is empty"),
    ({"--name": "a\nb"}, "control characters"),
    ({"--heartbeat-url": ""}, "no heartbeat URL"),
    ({"--heartbeat-url": "ftp://ingest.example.test"}, "is not an http(s) URL"),
    ({"--heartbeat-url": HEARTBEAT_URL + "/heartbeat"}, f"which the agent appends itself: pass {HEARTBEAT_URL}"),
    ({"--heartbeat-url": HEARTBEAT_URL + "?x=1"}, "no query"),
])
def test_bad_input_is_refused_with_exit_2_and_nothing_written(
        capsys: pytest.CaptureFixture[str], database_url: str, factory: Factory, pg: psycopg.Connection,
        change: dict[str, str], message: str) -> None:
    factory.user("known@example.test")
    argv = [item for flag, value in {**GOOD, **change}.items() for item in (flag, value)]
    code, out, err = register(capsys, database_url, *argv)
    assert code == 2, (out, err)
    assert message in err and "nothing was written" in err
    assert out == "" and toolboxes(pg) == []


def test_every_problem_is_reported_at_once(capsys: pytest.CaptureFixture[str], database_url: str,
                                           monkeypatch: pytest.MonkeyPatch, pg: psycopg.Connection) -> None:
    monkeypatch.delenv("DTMA_KEY_SECRET")
    code, _, err = register(capsys, database_url, "--user", "x@example.test", "--address", "nope",
                            "--dtma-port", "0", "--heartbeat-url", "")
    assert code == 2
    for message in ("DTMA_KEY_SECRET is not set", "is not an IPv4 or IPv6 address", "--dtma-port must be",
                    "no heartbeat URL"):
        assert message in err
    assert toolboxes(pg) == []


def test_missing_database_and_missing_flags_are_usage_errors(capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(capsys, "register", "--user", "a@example.test", "--address", "203.0.113.1",
                       "--heartbeat-url", "https://ingest.example.test")
    assert code == 2 and "no database: pass --database-url or set DATABASE_URL" in err
    with pytest.raises(SystemExit) as exit_info:
        toolbox.main(["register", "--address", "203.0.113.1"])
    assert exit_info.value.code == 2 and "--user" in capsys.readouterr().err


def test_duplicate_droplet_id_address_and_name_are_refused(
        capsys: pytest.CaptureFixture[str], database_url: str, factory: Factory, pg: psycopg.Connection) -> None:
    user_id = factory.user("dup@example.test")
    existing = factory.toolbox(user_id, ip="203.0.113.20", name="taken")
    pg.execute("update account_tool_environments set do_droplet_id = 777 where id = %s", (existing.id,))
    before = toolboxes(pg)

    code, _, err = register(capsys, database_url, "--user", "dup@example.test", "--address", "203.0.113.21",
                            "--droplet-id", "777", "--heartbeat-url", "https://ingest.example.test")
    assert code == 2 and f"--droplet-id 777 is already toolbox {existing.id}" in err
    # Same address, and the fleet port both ways (NULL = 30000): one agent holds one toolbox's key.
    code, _, err = register(capsys, database_url, "--user", "dup@example.test", "--address", "203.0.113.20",
                            "--dtma-port", "30000", "--heartbeat-url", "https://ingest.example.test")
    assert code == 2 and f"toolbox {existing.id}" in err and f"mcp-toolbox credentials {existing.id}" in err
    code, _, err = register(capsys, database_url, "--user", "dup@example.test", "--address", "203.0.113.22",
                            "--name", "taken", "--heartbeat-url", "https://ingest.example.test")
    assert code == 2 and "already has a toolbox named 'taken'" in err
    assert toolboxes(pg) == before

    # Another port on the same host is another agent; a deprovisioned toolbox frees its address.
    code, _, err = register(capsys, database_url, "--user", "dup@example.test", "--address", "203.0.113.20",
                            "--dtma-port", "30001", "--heartbeat-url", "https://ingest.example.test")
    assert code == 0, err
    pg.execute("update account_tool_environments set status = 'deprovisioned' where id = %s", (existing.id,))
    code, _, err = register(capsys, database_url, "--user", "dup@example.test", "--address", "203.0.113.20",
                            "--name", "taken", "--heartbeat-url", "https://ingest.example.test")
    assert code == 0, err
    assert len(toolboxes(pg)) == 3


def test_a_failure_after_the_insert_leaves_nothing_behind(
        capsys: pytest.CaptureFixture[str], database_url: str, factory: Factory, pg: psycopg.Connection,
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    factory.user("atomic@example.test")

    def broken(*_args: object, **_kwargs: object) -> tuple[str, int]:
        raise psycopg.OperationalError("connection lost")

    monkeypatch.setattr(credentials, "issue_in", broken)
    conf = tmp_path / "dtma.conf"
    code, out, err = register(capsys, database_url, "--user", "atomic@example.test", "--address", "203.0.113.30",
                              "--heartbeat-url", "https://ingest.example.test", "--conf-out", str(conf))
    assert code == 1 and "the database failed: connection lost" in err and out == ""
    assert toolboxes(pg) == [] and not conf.exists()


# --- list, users, credentials ----------------------------------------------------------------------------------


def test_list_and_users(capsys: pytest.CaptureFixture[str], database_url: str, factory: Factory,
                        pg: psycopg.Connection) -> None:
    user_id = factory.user("lister@example.test")
    heard = factory.toolbox(user_id, ip="203.0.113.40", port=30005, name="heard", heartbeat_age_seconds=42)
    factory.toolbox(factory.user("other@example.test"), ip="2001:db8::40", name="silent",
                    status="awaiting_heartbeat", heartbeat_age_seconds=None)
    code, out, _ = run(capsys, "list", "--database-url", database_url)
    assert code == 0
    lines = out.splitlines()
    assert lines[0].split() == ["ID", "USER", "NAME", "DTMA", "STATUS", "LAST", "HEARTBEAT"]
    heard_line = next(line for line in lines if heard.id in line)
    assert heard_line.split()[1:6] == ["lister@example.test", "heard", "203.0.113.40:30005", "active", "42"]
    assert re.search(r"\[2001:db8::40\]:30000\s+awaiting_heartbeat\s+never$", out, re.M)

    code, out, _ = run(capsys, "list", "--user", "LISTER@example.test", "--database-url", database_url)
    assert code == 0 and heard.id in out and "silent" not in out
    code, out, _ = run(capsys, "list", "--status", "unresponsive", "--database-url", database_url)
    assert code == 0 and out == "no toolboxes match\n"

    code, out, _ = run(capsys, "users", "--search", "lister", "--database-url", database_url)
    assert code == 0 and user_id in out and "lister@example.test" in out and "other@" not in out


@pytest.mark.parametrize("command", ["mcp-toolbox credentials", "mcp-toolbox-credentials"])
def test_credentials_print_the_base_url_once(capsys: pytest.CaptureFixture[str], database_url: str,
                                             factory: Factory, command: str) -> None:
    box = factory.toolbox()
    argv = [box.id, "--heartbeat-url", HEARTBEAT_URL, "--database-url", database_url]
    code = toolbox.main(["credentials", *argv]) if command == "mcp-toolbox credentials" else credentials.main(argv)
    out, err = capsys.readouterr()
    assert code == 0, err
    assert out.count("AGENTOPIA_API_BASE_URL=") == 1
    assert f"AGENTOPIA_API_BASE_URL={HEARTBEAT_URL}\n" in out
    assert values(out)["DTMA_AUTH_TOKEN"] == box.token  # not rotated: the same derived key again
    assert out.count(box.token) == 1


def test_credentials_refuses_a_toolbox_id_that_is_not_a_uuid(capsys: pytest.CaptureFixture[str],
                                                            database_url: str) -> None:
    with pytest.raises(SystemExit) as exit_info:
        toolbox.main(["credentials", "demo-toolbox", "--database-url", database_url])
    assert exit_info.value.code == 2
    assert "is not a toolbox id" in capsys.readouterr().err


def test_credentials_take_the_heartbeat_url_from_the_local_stacks_environment(
        capsys: pytest.CaptureFixture[str], database_url: str, factory: Factory,
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FUNCTIONS_URL", "http://127.0.0.1:54321/functions/v1/")
    monkeypatch.setenv("DATABASE_URL", database_url)
    box = factory.toolbox()
    assert toolbox.main(["credentials", box.id]) == 0
    assert values(capsys.readouterr().out)["AGENTOPIA_API_BASE_URL"] == HEARTBEAT_URL
