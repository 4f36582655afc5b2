"""What the report shows, read from a run directory and shaped into plain series. Pure after `load`."""

from __future__ import annotations

import json
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from resilient.core import ledger
from resilient.core.errors import ConfigError
from resilient.core.events import LedgerEvent
from resilient.core.rundir import RunDir
from resilient.report import rank_steps

# Ledger events that end an attempt on the timeline.
_ATTEMPT_ENDS = (
    LedgerEvent.FAILURE,
    LedgerEvent.RESTART,
    LedgerEvent.FINISHED,
    LedgerEvent.PREEMPTED,
    LedgerEvent.GAVE_UP,
    LedgerEvent.JOB_END,
    LedgerEvent.RUN_START,
)


@dataclass(frozen=True)
class RunData:
    run_dir: Path
    ledger: list[dict[str, Any]]
    train: list[dict[str, Any]]
    rank_steps: list[dict[str, Any]]
    status: dict[str, Any] | None


def load(run_dir: Path) -> RunData:
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise ConfigError(f"{run_dir}: no such run directory")
    names = RunDir(run_dir)
    records = list(ledger.read(run_dir))
    train = list(ledger.read_jsonl(names.train_log))
    if not records and not train:
        raise ConfigError(f"{run_dir}: no {names.ledger.name} or {names.train_log.name} (not a run directory?)")
    try:
        status = json.loads(names.status.read_text())
    except (OSError, ValueError):
        status = None
    return RunData(run_dir, records, train, list(rank_steps.read(run_dir)), status)


def _num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def by_attempt(train: list[dict[str, Any]], key: str) -> dict[Any, tuple[list[int], list[float]]]:
    """(steps, values) of `key` per attempt, in log order: a restart's recomputed steps show as its own line."""
    out: dict[Any, tuple[list[int], list[float]]] = {}
    for r in train:
        if _num(r.get(key)) and _num(r.get("step")):
            steps, values = out.setdefault(r.get("attempt"), ([], []))
            steps.append(r["step"])
            values.append(float(r[key]))
    return out


def per_rank_step_times(samples: list[dict[str, Any]], t0: float) -> dict[int, tuple[list[float], list[float]]]:
    """rank -> (hours since t0, mean step time of the sample) from rank_steps.jsonl."""
    out: dict[int, tuple[list[float], list[float]]] = defaultdict(lambda: ([], []))
    for s in samples:
        for rank, v in (s.get("ranks") or {}).items():
            if _num(v.get("step_time")) and _num(s.get("ts")):
                xs, ys = out[int(rank)]
                xs.append((s["ts"] - t0) / 3600)
                ys.append(float(v["step_time"]))
    return dict(sorted(out.items()))


@dataclass(frozen=True)
class Span:
    attempt: Any
    start: float
    end: float
    outcome: str


def start_time(data: RunData) -> float:
    stamps = [r["ts"] for r in data.ledger + data.train if _num(r.get("ts"))]
    return min(stamps, default=0.0)


def attempt_spans(records: list[dict[str, Any]], end_of_run: float) -> list[Span]:
    """Each attempt from its first `attempt_start` to the first event that ends it."""
    spans, current = [], None
    for r in records:
        ev, ts = r.get("event"), r.get("ts")
        if not _num(ts):
            continue
        if ev == LedgerEvent.ATTEMPT_START:
            if current is None or current[0] != r.get("attempt"):
                if current is not None:
                    spans.append(Span(current[0], current[1], ts, "?"))
                current = (r.get("attempt"), ts)
        elif ev in _ATTEMPT_ENDS and current is not None:
            spans.append(Span(current[0], current[1], ts, ev))
            current = None
    if current is not None:
        spans.append(Span(current[0], current[1], max(end_of_run, current[1]), "running"))
    return spans


def events(records: list[dict[str, Any]], *kinds: str) -> list[dict[str, Any]]:
    return [r for r in records if r.get("event") in kinds and _num(r.get("ts"))]


TIMELINE_ROWS: tuple[tuple[str, tuple[LedgerEvent, ...]], ...] = (
    ("checkpoints", (LedgerEvent.CKPT_SAVE,)),
    ("faults", (LedgerEvent.FAILURE,)),
    ("silent data corruption", (LedgerEvent.SDC_SUSPECTED, LedgerEvent.SDC_CONFIRMED)),
    ("starts / requeues", (LedgerEvent.RUN_START, LedgerEvent.REQUEUE, LedgerEvent.PREEMPTED)),
)
"""The timeline's marker rows, top to bottom: a label and the ledger events marked on it."""


def timeline_marks(records: list[dict[str, Any]]) -> dict[str, list[float]]:
    """Each timeline row's marker times (unix seconds)."""
    return {label: [e["ts"] for e in events(records, *kinds)] for label, kinds in TIMELINE_ROWS}
