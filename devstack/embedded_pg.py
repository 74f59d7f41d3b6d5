"""An embedded PostgreSQL 16 (the `pgserver` package) for tests and the local stack.

Nothing to install by hand: no Docker, no system PostgreSQL. pgserver listens on a Unix
socket inside the data directory. Two facts shape this module (toolchain notes):

* run as root, pgserver runs postgres as OS user `pgserver` and opens read access on every
  parent folder of the data directory, so data directories live under a temp folder, never
  under a home directory;
* a process killed with SIGKILL leaves the server running, so `stop()` is explicit and
  idempotent, and callers put it on every shutdown path.
"""

from __future__ import annotations

import os
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any


def default_data_dir(project_root: Path) -> Path:
    """A per-project directory under the temp folder, kept between runs of the local stack."""
    import hashlib

    digest = hashlib.sha256(str(project_root.resolve()).encode()).hexdigest()[:12]
    return Path(tempfile.gettempdir()) / f"mcp-control-plane-pg-{digest}"


@dataclass
class EmbeddedPostgres:
    data_dir: Path
    uri: str
    _server: Any

    def stop(self) -> None:
        if self._server is not None:
            self._server.cleanup()
            self._server = None


def start(data_dir: Path | None = None, *, keep: bool = True) -> EmbeddedPostgres:
    """Start (or attach to) the server for `data_dir`; a fresh temp dir when None.

    `keep=False` deletes the data directory on stop (tests); `keep=True` only stops the
    server (the local stack keeps its data between runs).
    """
    os.environ.setdefault("XDG_RUNTIME_DIR", tempfile.gettempdir())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import pgserver

    if data_dir is None:
        data_dir = Path(tempfile.mkdtemp(prefix="mcp-pg-"))
    data_dir.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        server = pgserver.get_server(data_dir, cleanup_mode="delete" if not keep else "stop")
    return EmbeddedPostgres(data_dir=data_dir, uri=server.get_uri(), _server=server)
