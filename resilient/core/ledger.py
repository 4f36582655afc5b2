"""Append-only JSONL ledger of a run: launches, failures, restarts, requeues, checkpoints.

One JSON object per line, each with `ts` (unix seconds) and `event`. Appends are single
`write` calls on an O_APPEND descriptor, so concurrent writers (supervisor and ranks) never
interleave within a line.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from resilient.core import guarded
from resilient.core.events import LedgerEvent
from resilient.core.rundir import RunDir


def append(run_dir: str | Path, event: LedgerEvent, **fields: Any) -> dict[str, Any]:
    """Append one event to RUN_DIR/ledger.jsonl and return the record; a full or failing filesystem
    is reported once (core.guarded), never raised: the ledger records the run, it must not end it."""
    record = {"ts": time.time(), "event": str(event), **fields}
    path = RunDir(Path(run_dir)).ledger

    def _append() -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        append_jsonl(path, record)

    guarded.write(path, _append)
    return record


def append_jsonl(path: str | Path, record: dict[str, Any]) -> None:
    """Append one JSON line (owner-only file) with a single write on an O_APPEND descriptor; a link in
    the file's place is refused (ELOOP), never written through."""
    line = (json.dumps(record, sort_keys=True, default=str) + "\n").encode()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        os.write(fd, line)
    finally:
        os.close(fd)


def read(run_dir: str | Path) -> Iterator[dict[str, Any]]:
    """Yield the ledger's records in order."""
    return read_jsonl(RunDir(Path(run_dir)).ledger)


def read_jsonl(path: str | Path) -> Iterator[dict[str, Any]]:
    """Yield the JSON records of a JSONL file (ledger, train log); a torn line from a writer
    killed mid-write is skipped; a missing file yields nothing."""
    path = Path(path)
    if not path.exists():
        return
    with open(path, "rb") as f:
        for raw in f:
            try:
                yield json.loads(raw)
            except json.JSONDecodeError:
                continue
