"""Generated README sections, so the documentation cannot drift from the code.

`python -m ops.docs` rewrites the blocks between `<!-- name:start -->` and `<!-- name:end -->`
markers in README.md; `tests/test_docs.py` fails when the README is out of date.
"""

from __future__ import annotations

import re
import sys
from collections import defaultdict
from pathlib import Path

from shared import lifecycle
from shared.config import ALL_FUNCTIONS, Settings

README = Path(__file__).resolve().parents[1] / "README.md"
_SHORT = {"deploy_mcp_server": "deploy", "manage_mcp_server": "manage", "mcp_status": "status",
          "mcp_status_sweep": "sweep", "dtma_heartbeat_ingest": "heartbeat", "dtma_command_worker": "worker"}


def config_table() -> str:
    rows = ["| variable | default | read by | meaning |", "|---|---|---|---|"]
    for name, field in Settings.model_fields.items():
        extra = field.json_schema_extra if isinstance(field.json_schema_extra, dict) else {}
        used_by = extra.get("used_by", [])
        readers = "all" if set(used_by) == set(ALL_FUNCTIONS) else ", ".join(_SHORT[f] for f in used_by)
        default = "" if field.default is None else f"`{field.default}`"
        secret = " (secret)" if "SecretStr" in str(field.annotation) else ""
        rows.append(f"| `{name}`{secret} | {default} | {readers} | {field.description} |")
    return "\n".join(rows)


def transitions_table() -> str:
    grouped: dict[tuple[str, str], list[str]] = defaultdict(list)
    for frm, to, source in lifecycle.TRANSITIONS:
        grouped[(frm.value, to.value)].append(source.value)
    order = {s.value: i for i, s in enumerate(lifecycle.Status)}
    rows = ["| from | to | who |", "|---|---|---|"]
    for (frm, to), sources in sorted(grouped.items(), key=lambda kv: (order[kv[0][0]], order[kv[0][1]])):
        rows.append(f"| `{frm}` | `{to}` | {', '.join(sorted(sources))} |")
    return "\n".join(rows)


def docker_table() -> str:
    rows = ["| Docker state | instance status asked for |", "|---|---|"]
    for state, (target, _) in lifecycle.DOCKER_STATES.items():
        shown = f"`{target.value}`" if target else "(no change)"
        if state == "exited":
            shown = "`stopped` (exit code 0) / `error` (non-zero)"
        rows.append(f"| `{state}` | {shown} |")
    return "\n".join(rows)


SECTIONS = {"config-table": config_table, "transitions-table": transitions_table, "docker-table": docker_table}


def render(text: str) -> str:
    for name, build in SECTIONS.items():
        pattern = re.compile(rf"(<!-- {name}:start -->\n).*?(<!-- {name}:end -->)", re.S)
        text = pattern.sub(lambda m, b=build: m.group(1) + b() + "\n" + m.group(2), text)
    return text


def main() -> int:
    README.write_text(render(README.read_text()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
