"""Generated documentation sections, so the docs cannot drift from the code.

`python -m ops.docs` rewrites the blocks between `<!-- name:start -->` and `<!-- name:end -->`
markers in the files of `SECTIONS`; `tests/test_docs.py` fails when one is out of date.
"""

from __future__ import annotations

import re
import sys
from collections import defaultdict
from pathlib import Path

from shared.core import lifecycle
from shared.core.config import ALL_FUNCTIONS, Settings

DOCS = Path(__file__).resolve().parents[1] / "docs"
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
            shown = "`stopped` after a stop was asked for; otherwise `error`, with the exit code when known"
        rows.append(f"| `{state}` | {shown} |")
    return "\n".join(rows)


# name -> (file it lives in, builder)
SECTIONS = {"config-table": (DOCS / "configuration.md", config_table),
            "transitions-table": (DOCS / "data-model.md", transitions_table),
            "docker-table": (DOCS / "data-model.md", docker_table)}


def render(text: str, names: list[str]) -> str:
    for name in names:
        build = SECTIONS[name][1]
        pattern = re.compile(rf"(<!-- {name}:start -->\n).*?(<!-- {name}:end -->)", re.S)
        text = pattern.sub(lambda m, b=build: m.group(1) + b() + "\n" + m.group(2), text)
    return text


def by_file() -> dict[Path, list[str]]:
    files: dict[Path, list[str]] = defaultdict(list)
    for name, (path, _) in SECTIONS.items():
        files[path].append(name)
    return files


def main() -> int:
    for path, names in by_file().items():
        path.write_text(render(path.read_text(), names))
    return 0


if __name__ == "__main__":
    sys.exit(main())
