"""`mcp-ops report` against the real database: what an operator reads after a short history."""

from __future__ import annotations

import json
from typing import Any

import pytest

from ops import report
from tests.helpers import auth, closed_port, settle, spec


def test_the_report_shows_what_happened(function_client: Any, toolbox_agent: Any, database_url: str,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    box, agent = toolbox_agent()
    deploy = function_client("deploy_mcp_server")
    for n in range(3):
        assert deploy.post("/", json=spec(box, name=f"ok-{n}"), headers=auth(box.user_id)).status_code == 202
    agent.fail_next("deploy", 500, {"success": False, "error": "pull access denied for nope/nope"})
    assert deploy.post("/", json=spec(box, name="denied", image="nope/nope:1"),
                       headers=auth(box.user_id)).status_code == 202
    settle()

    assert report.main(["report", "--json", "--database-url", database_url]) == 0
    figures = json.loads(capsys.readouterr().out)
    deploys = figures["deploys"]
    assert (deploys["started"], deploys["succeeded"], deploys["failed"]) == (4, 3, 1)
    assert deploys["failures_by_reason"] == {"image_pull_failed": 1}
    assert deploys["time_to_running"]["count"] == 3
    assert figures["agent_calls"]["by_operation"], figures["agent_calls"]

    assert report.main(["report", "--hours", "1", "--bucket-minutes", "10", "--database-url", database_url]) == 0
    text = capsys.readouterr().out
    assert "Deploys: 4 started, 3 succeeded, 1 failed" in text and "success rate 75.0%" in text
    assert "image_pull_failed" in text and "###" in text and "x" in text


@pytest.mark.parametrize("argv,message", [
    (["report", "--hours", "0"], "--hours"),
    (["report", "--bucket-minutes", "0"], "--bucket-minutes"),
    (["report", "--hours", "100", "--bucket-minutes", "1"], "at most 500 buckets"),
])
def test_bad_arguments_exit_2(argv: list[str], message: str, database_url: str,
                              capsys: pytest.CaptureFixture[str]) -> None:
    assert report.main([*argv, "--database-url", database_url]) == 2
    assert message in capsys.readouterr().err


def test_an_unreachable_database_exits_1_without_a_traceback(capsys: pytest.CaptureFixture[str]) -> None:
    url = f"postgresql://u:secret-password@127.0.0.1:{closed_port()}/db?connect_timeout=1"
    assert report.main(["report", "--database-url", url]) == 1
    err = capsys.readouterr().err
    assert "the database failed" in err and "secret-password" not in err and "Traceback" not in err
