"""What a node's supervisor learns about a run that must survive requeues and its own death: the
failures it recorded, the time it has supervised, and the step and save times behind its calibrated
hang timeouts. One JSON file per node, RUN_DIR/calibration/node<N>.json (0700 dir, 0600 file, replaced
atomically), read when the supervisor starts: a requeued run keeps its calibrated timeouts. The run's
failure history over every node's file goes to each rank it starts (`RankEnv.history`), for the
trainer's adaptive checkpoint interval: only the supervisor reads these files.

A supervisor marks its file `open` while it runs and closes it at a clean end; a file still open at
the next start means the previous supervisor died (node loss, SIGKILL), which counts as a failure.
"""

from __future__ import annotations

import hashlib
import json
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from resilient.core import guarded
from resilient.core.atomic import atomic_write
from resilient.core.rundir import RunDir
from resilient.rank.env import FailureHistory
from resilient.supervisor.tracking import HeartbeatTracker

WRITE_EVERY_S = 10.0
"""How often a running supervisor refreshes its file (the supervised time a SIGKILL can lose)."""


@dataclass
class Calibration:
    """The persisted record of one node."""

    failures: list[dict[str, Any]] = field(default_factory=list)
    """Failures this node recorded (ts, attempt, kind, step), across attempts and requeues."""
    exposure_s: float = 0.0
    """Wall seconds this node's supervisors have run the job, summed over their lives."""
    step_times: list[float] = field(default_factory=list)
    """The newest observed step times (seconds), the calibrated step timeout's input."""
    ckpt_times: list[float] = field(default_factory=list)
    """The newest observed loop-blocking save times (seconds), the calibrated checkpoint timeout's input."""
    open: bool = False
    """A supervisor is (or was, when it died) running with this file."""
    signature: str = ""
    """What the step and save times were measured on (model, layout, batch, topology): times measured
    on another are dropped, the failure history is kept."""


def parse(text: str) -> tuple[Calibration, str | None]:
    """A calibration record from its JSON text, or an empty one and why the text was unusable."""
    try:
        raw = json.loads(text)
        if not isinstance(raw, dict):
            raise ValueError("not a JSON object")
        cal = Calibration(
            failures=[f for f in raw.get("failures", []) if isinstance(f, dict)],
            exposure_s=float(raw.get("exposure_s", 0.0)),
            step_times=[float(t) for t in raw.get("step_times", [])],
            ckpt_times=[float(t) for t in raw.get("ckpt_times", [])],
            open=bool(raw.get("open", False)),
            signature=str(raw.get("signature", "")),
        )
    except (ValueError, TypeError) as err:
        return Calibration(), f"{type(err).__name__}: {err}"
    return cal, None


def load(path: Path) -> Calibration:
    """The record in `path`; missing is empty; unreadable is empty with one line on stderr."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        return Calibration()
    except OSError as err:
        print(f"resilient: {path}: unreadable calibration ({err}); starting without it", file=sys.stderr)
        return Calibration()
    cal, problem = parse(text)
    if problem:
        print(f"resilient: {path}: damaged calibration ({problem}); starting without it", file=sys.stderr)
    return cal


def failure_history(records: Sequence[Calibration]) -> FailureHistory:
    """The run's history from its nodes' records. Every failure is recorded by exactly one node; one at
    the same step as that node's previous one (an unhealthy node failing its pre-flight again, a crash
    loop) lost no work since and counts once. The nodes run side by side, so the run's exposure is the
    longest any node has supervised."""
    failures = 0
    for cal in records:
        last: object = object()
        for f in cal.failures:
            step = f.get("step")
            failures += step is None or step != last
            last = step
    return FailureHistory(failures, max((cal.exposure_s for cal in records), default=0.0))


def signature(*parts: Any) -> str:
    """A short digest of what step and save times depend on (JSON-able parts)."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


class CalibrationStore:
    """The supervisor's handle on its node's record: seeds the tracker, records failures, keeps time."""

    def __init__(
        self,
        run_dir: Path,
        node: int,
        tracker: HeartbeatTracker,
        signature: str,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.path = RunDir(run_dir).calibration_file(node)
        self.tracker, self.clock = tracker, clock
        self.cal = load(self.path)
        self.died_before = self.cal.open
        if self.cal.signature != signature:
            if self.cal.step_times or self.cal.ckpt_times:
                print(
                    f"resilient: {self.path}: step and save times were measured on another model, layout or "
                    "topology; calibrating again",
                    file=sys.stderr,
                )
            self.cal.step_times, self.cal.ckpt_times, self.cal.signature = [], [], signature
        tracker.step_times.extend(self.cal.step_times)
        tracker.ckpt_times.extend(self.cal.ckpt_times)
        self._base_exposure = self.cal.exposure_s
        self._started: float | None = None
        self._next_write = 0.0

    def begin(self, attempt: int) -> None:
        """The supervisor runs from now (the run dir exists); a previous one that died is a failure."""
        if self.died_before:
            self.cal.failures.append({"ts": time.time(), "attempt": attempt, "kind": "supervisor_lost", "step": None})
        self._started = self.clock()
        self.cal.open = True
        self.write()

    def on_failure(self, record: dict[str, Any], attempt: int) -> None:
        """A failure this node recorded in the ledger (its `Failure.record()`)."""
        self.cal.failures.append(
            {"ts": time.time(), "attempt": attempt, "kind": record.get("kind"), "step": record.get("step")}
        )
        self.write()

    def history(self) -> FailureHistory:
        """The run's failure history now: this node's record as it stands, the other nodes' files as
        last written (an unreadable one is left out: the trainer's prior stands in for it)."""
        self._update_exposure()
        records = [self.cal]
        for path in sorted(self.path.parent.glob("node*.json")):
            if path.name == self.path.name:
                continue
            try:
                cal, problem = parse(path.read_text())
            except OSError:
                continue
            if problem is None:
                records.append(cal)
        return failure_history(records)

    def maybe_write(self) -> None:
        if self._started is not None and self.clock() >= self._next_write:
            self.write()

    def close(self) -> None:
        """A clean end: the file no longer says a supervisor is running."""
        if self._started is None:
            return
        self.cal.open = False
        self.write()

    def _update_exposure(self) -> None:
        if self._started is not None:
            self.cal.exposure_s = self._base_exposure + (self.clock() - self._started)

    def write(self) -> None:
        self._next_write = self.clock() + WRITE_EVERY_S
        self._update_exposure()
        self.cal.step_times = list(self.tracker.step_times)
        self.cal.ckpt_times = list(self.tracker.ckpt_times)
        text = json.dumps(asdict(self.cal))

        def write_file() -> None:
            self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            atomic_write(self.path, text, durable=False)

        guarded.write(self.path, write_file)  # an optimisation: never fail the run for it; said once
