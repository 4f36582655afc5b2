"""Writes of a run's own bookkeeping (ledger, status.json) that must never kill the writer: on a full
or failing filesystem the supervisor has to stay up to save, stop and report. A failure is said once
per file on stderr and remembered, so status.json shows it once it can be written again."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from pathlib import Path

_failed: dict[str, dict[str, object]] = {}


def write(path: str | Path, do_write: Callable[[], None]) -> bool:
    """Run `do_write` (which writes `path`); an OSError is reported and swallowed. True on success."""
    try:
        do_write()
        return True
    except OSError as err:
        key = str(path)
        if key not in _failed:
            print(f"resilient: cannot write {key}: {err.strerror or err}; going on without it", file=sys.stderr,
                  flush=True)
            _failed[key] = {"error": err.strerror or str(err), "since": time.time(), "lost_writes": 0}
        _failed[key]["lost_writes"] = int(_failed[key]["lost_writes"]) + 1  # type: ignore[call-overload]
        return False


def failures() -> dict[str, dict[str, object]]:
    """Files whose writes failed in this process: first error, since when, how many writes were lost."""
    return {k: dict(v) for k, v in _failed.items()}
