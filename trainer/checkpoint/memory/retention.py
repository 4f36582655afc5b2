"""Which memory snapshots a base (a node's own, or the replicas it holds for one node) keeps."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from trainer.checkpoint.memory import naming


def prune(base: Path, keep_last: int) -> None:
    """Keep the newest `keep_last` committed steps; drop older ones and uncommitted ones older than
    the newest committed (a newer uncommitted one may be in flight). The newest dropped directory
    replaces `base/.spare`: its files are reused by the next snapshot (slots.Slots)."""
    steps = naming.steps_in(base)
    committed = [s for s, p in steps.items() if (p / naming.COMMITTED).exists()]
    keep = set(committed[-keep_last:])
    newest = committed[-1] if committed else None
    dropped = [p for step, p in steps.items() if not (step in keep or newest is None or step > newest)]
    for path in dropped:
        (path / naming.COMMITTED).unlink(missing_ok=True)  # uncommit first
    if dropped:
        shutil.rmtree(base / naming.SPARE, ignore_errors=True)
        for meta in dropped[-1].glob("rank*.json"):
            meta.unlink(missing_ok=True)
        try:
            os.replace(dropped[-1], base / naming.SPARE)
            dropped.pop()
        except OSError:
            pass  # removed below like the rest
    for path in dropped:
        shutil.rmtree(path, ignore_errors=True)


def uncommit_after(base: Path, step: int | None) -> list[int]:
    """Withdraw the commit of every snapshot after `step` (all of them for None): a restart never takes
    them, and `prune` reclaims their space. Returns the steps withdrawn."""
    withdrawn = []
    for found, path in naming.steps_in(base).items():
        if (step is None or found > step) and (path / naming.COMMITTED).exists():
            (path / naming.COMMITTED).unlink(missing_ok=True)
            withdrawn.append(found)
    return withdrawn
