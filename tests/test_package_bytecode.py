"""Bytecode in the deployed package (ops/gcp_package.py, GCP_BYTECODE_PYTHON; docs/performance.md).

A new Cloud Run instance otherwise compiles every project module on its first import. The bytecode
must be the deployed runtime's version, hash-based and unchecked (uploads change mtimes), and the
package must stay byte-for-byte reproducible. Needs a Python of the target version on this machine;
skipped without one.
"""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from ops import gcp_package

ROOT = Path(__file__).resolve().parents[1]
FUNCTION = "dtma_heartbeat_ingest"


def target_python() -> str | None:
    """A working interpreter of the target version (a pyenv shim may exist without the version)."""
    version = gcp_package.TARGET_PYTHON
    found = shutil.which(f"python{version}")
    candidates = sorted(glob.glob(os.path.expanduser(f"~/.pyenv/versions/{version}.*/bin/python{version}")))
    for candidate in [*candidates, *([found] if found else [])]:
        if subprocess.run([candidate, "-c", "pass"], capture_output=True).returncode == 0:
            return candidate
    return None


def tree_bytes(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture
def python() -> str:
    found = target_python()
    if found is None:
        pytest.skip(f"no python{gcp_package.TARGET_PYTHON} here to compile for the deployed runtime")
    return found


def test_the_package_ships_unchecked_hash_bytecode_for_every_module(python: str, tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(gcp_package.BYTECODE_ENV, python)
    (built,), _ = gcp_package.build(ROOT, tmp_path / "a", [FUNCTION])
    sources = sorted(built.rglob("*.py"))
    tag = "cpython-" + gcp_package.TARGET_PYTHON.replace(".", "")
    for source in sources:
        cached = source.parent / "__pycache__" / f"{source.stem}.{tag}.pyc"
        assert cached.is_file(), cached
        assert cached.read_bytes()[4:8] == b"\x01\x00\x00\x00"  # hash-based, source not checked
    assert "pyc" not in (built / ".gcloudignore").read_text()  # uploaded with the sources
    (again,), _ = gcp_package.build(ROOT, tmp_path / "b", [FUNCTION])
    assert tree_bytes(built) == tree_bytes(again)  # reproducible


def test_bytecode_of_another_python_version_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    if f"{sys.version_info[0]}.{sys.version_info[1]}" == gcp_package.TARGET_PYTHON:
        pytest.skip("this interpreter is the target version")
    monkeypatch.setenv(gcp_package.BYTECODE_ENV, sys.executable)
    with pytest.raises(gcp_package.PackagingError, match="the functions run"):
        gcp_package.build(ROOT, tmp_path / "a", [FUNCTION])
