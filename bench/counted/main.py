"""A function of functions/ served unchanged, with the database statements it sends counted (bench only).

    BENCH_FUNCTION=dtma_command_worker BENCH_STATEMENT_LOG=/tmp/statements.log \
        functions-framework --target dtma_command_worker --source bench/counted/main.py

Loads functions/$BENCH_FUNCTION/main.py as functions-framework would and re-exports its function. Every
statement a psycopg cursor executes in this process appends one line to $BENCH_STATEMENT_LOG: the SQL
function it calls (`cp_claim_command`), or the statement's first words. This is tests/test_heartbeat.py's
CountingCursor, applied to psycopg.Cursor itself so that the function's own pool is counted. The
postgres transport sends one statement per round trip (autocommit, no BEGIN/COMMIT), so lines are
round trips.
"""

import importlib.util
import os
import re
import sys
import threading
from pathlib import Path

import psycopg

_ROOT = Path(__file__).resolve().parents[2]
_NAME = os.environ["BENCH_FUNCTION"]
_LOG = open(os.environ["BENCH_STATEMENT_LOG"], "a", buffering=1)  # noqa: SIM115 - open for the process's life
_LOCK = threading.Lock()
_CALLED = re.compile(r'select public\."?(\w+)"?\(')
_execute = psycopg.Cursor.execute


def _counted(self, query, *args, **kwargs):
    text = query if isinstance(query, str) else str(query)
    match = _CALLED.search(text)
    with _LOCK:
        _LOG.write((match.group(1) if match else " ".join(text.split()[:3])) + "\n")
    return _execute(self, query, *args, **kwargs)


psycopg.Cursor.execute = _counted

_spec = importlib.util.spec_from_file_location(f"counted_{_NAME}", _ROOT / "functions" / _NAME / "main.py")
_module = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = _module
_spec.loader.exec_module(_module)
globals()[_NAME] = getattr(_module, _NAME)
