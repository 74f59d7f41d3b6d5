"""Shared fixtures: one real PostgreSQL per test run, isolated per test.

The database is the embedded pgserver unless TEST_DATABASE_URL names another one. (Not
DATABASE_URL: tests wipe every table between tests, and DATABASE_URL is what points at a
real deployment.) Migrations are applied through the real runner, so every test run also
tests them. Each test that touches the database starts from empty tables (plus the catalog's
seed row): the functions under test commit through their own pools, so per-test transactions
cannot isolate them, while TRUNCATE is a few milliseconds.
"""

from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import psycopg
import pytest
from flask.testing import FlaskClient

os.environ.setdefault("XDG_RUNTIME_DIR", tempfile.gettempdir())
os.environ.setdefault("NO_GCE_CHECK", "true")  # google-auth must never probe the metadata server
logging.getLogger("pgserver").setLevel(logging.WARNING)

from devstack import embedded_pg  # noqa: E402
from ops.migrate import migrate  # noqa: E402
from tests.factories import Factory  # noqa: E402

TRUNCATE = "truncate auth.users, public.account_tool_instance_events restart identity cascade"


@pytest.fixture(scope="session")
def database_url() -> Iterator[str]:
    url = os.environ.get("TEST_DATABASE_URL")
    server = None
    if not url:
        server = embedded_pg.start(keep=False)
        url = server.uri
    migrate(url)
    try:
        yield url
    finally:
        from shared.adapters.db import close_all

        close_all()
        if server is not None:
            server.stop()


@pytest.fixture
def pg(database_url: str) -> Iterator[psycopg.Connection]:
    """A superuser/owner connection for arranging and asserting; tables are emptied after."""
    from shared.adapters import background

    with psycopg.connect(database_url, autocommit=True) as conn:
        try:
            yield conn
        finally:
            # Agent commands that outlived their request still write to these tables.
            background.drain(timeout=30)
            conn.execute(TRUNCATE)


@pytest.fixture
def factory(pg: psycopg.Connection) -> Factory:
    return Factory(pg)


@pytest.fixture(scope="session")
def postgres_db(database_url: str) -> Iterator[object]:
    """The production `postgres` transport on the test database."""
    from shared.adapters.db.postgres import PostgresDatabase

    db = PostgresDatabase(database_url, max_size=4)
    yield db
    db.close()


ROOT = Path(__file__).resolve().parents[1]
JWT_SECRET = "test-jwt-secret-that-is-at-least-32-bytes-long"


@pytest.fixture
def function_client(database_url: str, monkeypatch: pytest.MonkeyPatch) -> Callable[..., FlaskClient]:
    """A functions-framework test client for one function, configured like production plus
    whatever the test overrides (environment variables, as a deployment would set them)."""
    from functions_framework import create_app

    from shared import runtime
    from tests.factories import IDEMPOTENCY_SECRET, MASTER_SECRET

    def make(function: str, **env: str) -> FlaskClient:
        settings = {"DATABASE_URL": database_url, "SUPABASE_JWT_SECRET": JWT_SECRET,
                    "DTMA_KEY_SECRET": MASTER_SECRET, "IDEMPOTENCY_SECRET": IDEMPOTENCY_SECRET,
                    "ALLOW_PRIVATE_TOOLBOX_IPS": "true",
                    "LOG_FORMAT": "text", **env}
        for key, value in settings.items():
            monkeypatch.setenv(key, value)
        runtime.reset()
        app = create_app(target=function, source=str(ROOT / "functions" / function / "main.py"))
        return app.test_client()

    yield make
    runtime.reset()


@pytest.fixture
def toolbox_agent(factory: Factory) -> Iterator[Callable[..., tuple[object, object]]]:
    """(toolbox row, DTMA stand-in holding that toolbox's own derived key), as on a droplet."""
    from devstack.dtma_standin import StandInAgent

    agents: list[StandInAgent] = []

    def make(user_id: str | None = None, **agent_kwargs: object) -> tuple[object, StandInAgent]:
        box = factory.toolbox(user_id)
        agent = StandInAgent(box.token, **agent_kwargs).start()
        agents.append(agent)
        factory.conn.execute("update account_tool_environments set dtma_port = %s where id = %s",
                             (agent.port, box.id))
        box.port = agent.port
        return box, agent

    yield make
    for agent in agents:
        agent.stop()
