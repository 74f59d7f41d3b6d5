"""Status groups are named once (shared/core/lifecycle.py) and spelled out in SQL where they must be
(partial index predicates, the sweep's and the heartbeat's filters): every list of statuses in
sql/migrations/ must be exactly one of the named groups, so a status added to a group in one place
and forgotten in another fails here."""

from __future__ import annotations

import re

import pytest

from shared.core import lifecycle
from tests.conftest import ROOT

_LIST = re.compile(r"\bin \(((?:\s*'[a-z_]+',?)+)\s*\)")
_INSTANCE = {s.value for s in lifecycle.Status}
_TOOLBOX = set().union(lifecycle.TOOLBOX_DEPROVISIONING, lifecycle.TOOLBOX_REVIVED_BY_HEARTBEAT,
                       lifecycle.TOOLBOX_WATCHED_FOR_SILENCE, lifecycle.LIVE_TOOLBOX_STATUSES)


def _status_lists() -> list[tuple[str, frozenset[str]]]:
    found = []
    for path in sorted((ROOT / "sql" / "migrations").glob("*.sql")):
        for match in _LIST.finditer(path.read_text()):
            values = frozenset(re.findall(r"'([a-z_]+)'", match.group(1)))
            if values <= _INSTANCE | _TOOLBOX and len(values) > 1:
                found.append((f"{path.name}: {match.group(0)}", values))
    return found


def test_the_sql_has_status_lists_to_check() -> None:
    assert len(_status_lists()) >= 8


@pytest.mark.parametrize(("where", "values"), _status_lists(), ids=lambda v: v if isinstance(v, str) else "")
def test_every_status_list_in_sql_is_a_named_group(where: str, values: frozenset[str]) -> None:
    named = [name for name, group in lifecycle.STATUS_GROUPS.items() if {str(g) for g in group} == values]
    assert named, f"{where} is not one of shared/core/lifecycle.py STATUS_GROUPS"
