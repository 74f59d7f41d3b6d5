"""Run the local stack as a child process and wait until it serves: for tests, CI and scripts.

The stack prints `MCP local stack ready at <url>` once every part runs and `stack.env` is
written; this waits for that line (bounded), keeps everything the child prints for diagnostics,
and on exit stops the child with SIGTERM like a person would, with a safety net: a stack that
had to be killed cannot stop its PostgreSQL, so the server left on the data directory is
stopped here rather than leaking into the next run.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Self

from devstack.closing import StartStop
from devstack.database import live_handles, postmaster_pid
from devstack.seed import read_env_file
from devstack.stack import READY, ROOT


class StackProcess(StartStop):
    """`python -m devstack.stack <args>` with its own data and state directories."""

    def __init__(self, *args: str, data_dir: Path, state_dir: Path, env: dict[str, str] | None = None) -> None:
        self.args = [
            sys.executable, "-m", "devstack.stack", *args,
            "--data-dir", str(data_dir), "--state-dir", str(state_dir),
        ]  # fmt: skip
        self.data_dir = data_dir
        self.state_dir = state_dir
        self.environ = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1", **(env or {})}
        self.environ.pop("DATABASE_URL", None)  # always the embedded database of `data_dir`
        self.url = ""
        self.env: dict[str, str] = {}
        self._lines: list[str] = []
        self._ready = threading.Event()
        self._proc: subprocess.Popen[str] | None = None
        self._reader: threading.Thread | None = None

    @property
    def output(self) -> str:
        return "".join(self._lines)

    @property
    def proc(self) -> subprocess.Popen[str]:
        if self._proc is None:
            raise RuntimeError("not started")
        return self._proc

    def start(self, timeout: float = 90.0) -> Self:
        """Start and wait for the ready line; raise with the child's output if it does not come."""
        self._proc = subprocess.Popen(
            self.args, cwd=ROOT, env=self.environ, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        self._reader = threading.Thread(target=self._read, name="stack-output", daemon=True)
        self._reader.start()
        deadline = time.monotonic() + timeout
        while not self._ready.wait(0.1):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"the local stack did not become ready:\n{self.output}")
        self.env = read_env_file(self.state_dir / "stack.env")
        return self

    def run(self, timeout: float) -> int:
        """Start and wait for the child to exit by itself (e.g. `--demo`); its exit status."""
        self._proc = subprocess.Popen(
            self.args, cwd=ROOT, env=self.environ, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        self._reader = threading.Thread(target=self._read, name="stack-output", daemon=True)
        self._reader.start()
        try:
            return self.proc.wait(timeout)
        finally:
            self.stop()

    def _read(self) -> None:
        assert self._proc is not None and self._proc.stdout is not None
        for line in self._proc.stdout:
            self._lines.append(line)
            if line.startswith(READY):
                self.url = line[len(READY) :].strip()
                self._ready.set()

    def signal(self, signum: int = signal.SIGTERM, timeout: float = 20.0) -> int:
        """Send `signum` and wait for the exit status."""
        if self.proc.poll() is None:
            self.proc.send_signal(signum)
        code = self.proc.wait(timeout)
        if self._reader is not None:
            self._reader.join(timeout=5)
        return code

    def stop(self) -> None:
        """Make sure nothing is left running: the child, then (if it was killed) its database."""
        if self._proc is None:
            return
        if self._proc.poll() is None:
            try:
                self.signal(signal.SIGTERM, timeout=20)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait(10)
        if self._reader is not None:
            self._reader.join(timeout=5)
        pid = postmaster_pid(self.data_dir)
        if pid is not None and not live_handles(self.data_dir):  # nobody else uses it: a leak
            os.kill(pid, signal.SIGINT)  # PostgreSQL's "fast" shutdown
            deadline = time.monotonic() + 15
            while postmaster_pid(self.data_dir) is not None and time.monotonic() < deadline:
                time.sleep(0.1)

