"""Writes of a run's own bookkeeping (ledger, status.json) that must never kill the writer: on a full
or failing filesystem the supervisor has to stay up to save, stop and report. A failure is said once
per file on stderr and remembered, so status.json shows it once it can be written again."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from pathlib import Path

_failed: dict[str, dict[str, object]] = {}
_fenced: dict[Path, str] = {}


def fence(directory: Path, reason: str) -> None:
    """Write nothing below `directory` from now on (it was replaced by a directory the run does not own:
    what would be written there is lost instead of handed over)."""
    _fenced[Path(directory)] = reason


def write(path: str | Path, do_write: Callable[[], None]) -> bool:
    """Run `do_write` (which writes `path`); an OSError is reported and swallowed. True on success."""
    try:
        fenced = next((why for root, why in _fenced.items() if Path(path).is_relative_to(root)), None)
        if fenced is not None:
            raise OSError(f"not written: {fenced}")
        do_write()
        return True
    except OSError as err:
        key = str(path)
        if key not in _failed:
            print(
                f"resilient: cannot write {key}: {err.strerror or err}; going on without it",
                file=sys.stderr,
                flush=True,
            )
            _failed[key] = {"error": err.strerror or str(err), "since": time.time(), "lost_writes": 0}
        _failed[key]["lost_writes"] = int(_failed[key]["lost_writes"]) + 1  # type: ignore[call-overload]
        return False


def failures() -> dict[str, dict[str, object]]:
    """Files whose writes failed in this process: first error, since when, how many writes were lost."""
    return {k: dict(v) for k, v in _failed.items()}
