"""docs/operations.md lists every error code a user can see, and nothing the code cannot answer.

The codes are collected from the source itself: every ApiError/DomainError, Outcome and `code=`
literal under shared/, every `"code": "..."` in a dict there, the SQLSTATE table and the default
of ServiceUnavailable. A new code without a troubleshooting row fails here.
"""

from __future__ import annotations

import ast
import inspect
import re
from pathlib import Path

from shared.adapters.http import FRAMEWORK_ERROR_CODES
from shared.core.errors import SQLSTATE_STATUS, ServiceUnavailable

ROOT = Path(__file__).resolve().parents[1]


def _codes_in_source() -> set[str]:
    codes: set[str] = set()
    for path in (ROOT / "shared").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call):
                name = getattr(node.func, "id", None) or getattr(node.func, "attr", None)
                if name in ("ApiError", "DomainError") and len(node.args) >= 2:
                    codes |= _strings(node.args[1])
                if name == "Outcome" and len(node.args) >= 4:
                    codes |= _strings(node.args[3])
                for keyword in node.keywords:
                    if keyword.arg == "code":
                        codes |= _strings(keyword.value)
            if isinstance(node, ast.Dict):
                for key, value in zip(node.keys, node.values, strict=True):
                    if isinstance(key, ast.Constant) and key.value == "code" and value is not None:
                        codes |= _strings(value)
    codes |= {code for _, code in SQLSTATE_STATUS.values()}
    codes |= set(FRAMEWORK_ERROR_CODES.values()) | {"bad_request"}
    codes.add(inspect.signature(ServiceUnavailable).parameters["code"].default)
    return codes


def _strings(node: ast.AST) -> set[str]:
    """String literals an expression can evaluate to (a constant, or either side of `a if c else b`)."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return {node.value}
    if isinstance(node, ast.IfExp):
        return _strings(node.body) | _strings(node.orelse)
    return set()


def _codes_in_doc() -> set[str]:
    text = (ROOT / "docs" / "operations.md").read_text()
    section = text.split("## Troubleshooting", 1)[1].split("### Symptoms", 1)[0]
    return set(re.findall(r"^\| `([a-z_]+)` \|", section, re.M))


def test_every_code_a_user_can_see_has_a_troubleshooting_row() -> None:
    source = _codes_in_source()
    ignored = {"done", "removed"}  # command records of a success: no answer carries them as an error
    assert source - ignored - _codes_in_doc() == set(), "add rows to docs/operations.md"


def test_the_troubleshooting_table_lists_no_code_the_service_cannot_answer() -> None:
    assert _codes_in_doc() - _codes_in_source() == set()


def test_the_collector_finds_codes_in_every_form() -> None:
    """The collector is what makes the first test worth anything: it must see each way a code is written."""
    found = _codes_in_source()
    for code in ("payload_too_large", "image_pull_failed", "retry_later", "sealed_env_unreadable", "conflict",
                 "unavailable", "unknown_fields", "bad_request"):
        assert code in found, code
