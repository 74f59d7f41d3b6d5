"""mcp_status/toolboxes: the caller's toolboxes as the web console lists them, against the real database."""

from __future__ import annotations

from typing import Any

import psycopg
import pytest
from flask.testing import FlaskClient

from tests.conftest import JWT_SECRET
from tests.factories import Factory
from tests.jwt_helpers import mint_hs256

FN = "mcp_status"


@pytest.fixture
def client(function_client: Any) -> FlaskClient:
    return function_client(FN)


def auth(user_id: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {mint_hs256(JWT_SECRET, sub=user_id)}"}


def toolboxes(client: FlaskClient, user_id: str) -> dict[str, Any]:
    response = client.get("/toolboxes", headers=auth(user_id))
    assert response.status_code == 200, response.json
    return {box["id"]: box for box in response.json["toolboxes"]}


def test_lists_only_the_callers_toolboxes_with_their_server_counts(client: FlaskClient, factory: Factory) -> None:
    alice, bob = factory.user(), factory.user()
    mine = factory.toolbox(alice, name="alpha")
    factory.instance(mine)
    factory.instance(mine)
    theirs = factory.toolbox(bob, name="bravo")
    seen = toolboxes(client, alice)
    assert list(seen) == [mine.id]
    box = seen[mine.id]
    assert (box["name"], box["status"], box["server_count"], box["stale"]) == ("alpha", "active", 2, False)
    assert box["accepts_deploys"] is True and box["docker_healthy"] is True
    assert box["liveness"].startswith("reporting: last heartbeat")
    assert theirs.id not in toolboxes(client, alice) and list(toolboxes(client, bob)) == [theirs.id]


def test_a_silent_toolbox_is_stale_with_a_sentence(client: FlaskClient, factory: Factory) -> None:
    user = factory.user()
    silent = factory.toolbox(user, heartbeat_age_seconds=3600)
    never = factory.toolbox(user, heartbeat_age_seconds=None)
    seen = toolboxes(client, user)
    assert seen[silent.id]["stale"] is True and seen[silent.id]["heartbeat_age_seconds"] >= 3600
    assert "silent for" in seen[silent.id]["liveness"] and seen[silent.id]["docker_healthy"] is None
    assert seen[never.id]["stale"] is True and "never reported" in seen[never.id]["liveness"]


def test_docker_down_and_unusable_toolboxes_do_not_accept_deploys(client: FlaskClient, factory: Factory,
                                                                   pg: psycopg.Connection) -> None:
    user = factory.user()
    docker_down = factory.toolbox(user)
    pg.execute("""update account_tool_environments set dtma_report_details_json =
                    '{"docker": {"healthy": false, "error": "connect ENOENT /var/run/docker.sock"}}' where id = %s""",
               (docker_down.id,))
    unresponsive = factory.toolbox(user, status="unresponsive")
    seen = toolboxes(client, user)
    assert seen[docker_down.id]["accepts_deploys"] is False and seen[docker_down.id]["docker_healthy"] is False
    assert "Docker is not answering" in seen[docker_down.id]["liveness"]
    assert seen[unresponsive.id]["accepts_deploys"] is False


def test_post_reads_like_get_and_refuses_a_malformed_body(client: FlaskClient, factory: Factory) -> None:
    box = factory.toolbox()
    response = client.post("/toolboxes", json={}, headers=auth(box.user_id))
    assert response.status_code == 200 and [b["id"] for b in response.json["toolboxes"]] == [box.id]
    bad = client.post("/toolboxes", data=b"{", content_type="application/json", headers=auth(box.user_id))
    assert bad.status_code == 400 and bad.json["error"]["code"]


def test_unauthenticated_is_401(client: FlaskClient) -> None:
    response = client.get("/toolboxes")
    assert response.status_code == 401 and response.json["error"]["code"] == "unauthenticated"
