"""Numerical faults: detect a NaN/Inf or spiking loss, roll back, and skip the data window that caused it.

The decision is a pure function of the loss and its recent history. The skip is carried by the data
loader's checkpointed state (`SkippingLoader`), so a run resumed after a rollback skips the same
window again, and a rerun of the same fault schedule ends with the same bits.

`FaultInjection` is a test and chaos-drill facility only: it is active only when RUN_DIR/faults.json
exists, and then multiplies the loss of a named (step, attempt) by NaN, so the gradients and the
optimizer update are poisoned the way a real numerical blow-up poisons them.
"""

from __future__ import annotations

import json
import logging
import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from resilient.core.errors import ResilientError
from resilient.core.exit_codes import ExitCode
from resilient.core.rundir import RunDir

log = logging.getLogger(__name__)


class NumericFaultError(ResilientError):
    """A numerical fault that cannot be rolled back (no checkpoint yet, or too many rollbacks)."""

    exit_code = ExitCode.RANK_FAILED
    label = "numeric fault"


@dataclass(frozen=True)
class Verdict:
    fault: str | None
    """None (healthy), "nan", "inf" or "spike"."""
    reason: str


def judge_loss(loss: float, recent: Sequence[float], *, spike_factor: float, window: int) -> Verdict:
    """Is `loss` a numerical fault given the losses of the preceding steps (oldest first)?

    A spike is a loss above `spike_factor` x the median of the last `window` losses; it is only judged
    once `window` losses are known (spike_factor 0: never)."""
    if math.isnan(loss):
        return Verdict("nan", "loss is NaN")
    if math.isinf(loss):
        return Verdict("inf", "loss is infinite")
    level = recent[-window:]
    if spike_factor > 0 and len(level) >= window:
        typical = statistics.median(level)
        if typical > 0 and loss > spike_factor * typical:
            return Verdict("spike", f"loss {loss:.4g} exceeds {spike_factor:g} x the recent median {typical:.4g}")
    return Verdict(None, "loss is finite and within the spike bound")


def rollback_allowed(rollbacks_done: int, max_rollbacks: int, checkpoint_step: int | None) -> tuple[bool, str]:
    """May the trainer roll back once more? Needs a checkpoint and budget left."""
    if checkpoint_step is None:
        return False, "no checkpoint to roll back to yet"
    if rollbacks_done >= max_rollbacks:
        return False, f"{rollbacks_done} data windows skipped already (train.max_rollbacks={max_rollbacks})"
    return True, f"roll back to step {checkpoint_step} ({rollbacks_done + 1} of at most {max_rollbacks})"


class LossHistory:
    """Losses of the steps before the current one, by step (a rollback forgets the undone steps)."""

    def __init__(self) -> None:
        self._by_step: dict[int, float] = {}

    def add(self, step: int, loss: float) -> None:
        self._by_step[step] = loss

    def before(self, step: int) -> list[float]:
        return [loss for s, loss in sorted(self._by_step.items()) if s < step]

    def forget_after(self, step: int) -> None:
        self._by_step = {s: v for s, v in self._by_step.items() if s <= step}


class SkippingLoader:
    """Wraps the train loader: jumps over skipped sample windows; the windows are part of its state.

    Loading a state keeps windows already known in memory (a rollback must not forget the window it
    just added); a fresh process starts with none, so loading equals the checkpoint's state there."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.skips: list[tuple[int, int]] = []

    @property
    def position(self) -> int:
        """Global samples consumed so far, skipped ones included."""
        return int(self.inner.state_dict()["consumed_samples"])

    def skip(self, from_sample: int, to_sample: int) -> None:
        self.skips = sorted({*self.skips, (from_sample, to_sample)})

    def next_step(self):
        pos = self.position
        for start, end in self.skips:
            if start <= pos < end:
                self.inner.load_state_dict({**self.inner.state_dict(), "consumed_samples": end})
                pos = end
        return self.inner.next_step()

    def state_dict(self) -> dict:
        return {**self.inner.state_dict(), "skips": [list(w) for w in self.skips]}

    def load_state_dict(self, state: dict) -> None:
        state = dict(state)
        saved = [tuple(w) for w in state.pop("skips", [])]
        self.skips = sorted({*self.skips, *saved})
        self.inner.load_state_dict(state)

    def close(self) -> None:
        self.inner.close()


class FaultInjection:
    """Test/chaos facility: NaN losses at steps named in RUN_DIR/faults.json, each at most once per process.

    File format: {"nan_loss": [{"step": 15, "attempt": 0}, ...]} (attempt omitted: any attempt).
    The file is re-read when it changes, so a chaos drill can add entries while the run trains."""

    def __init__(self, run_dir: Path, attempt: int) -> None:
        self.path = RunDir(run_dir).faults
        self.attempt = attempt
        self._mtime: float | None = None
        self._steps: set[int] = set()
        self._fired: set[int] = set()

    def _refresh(self) -> None:
        try:
            mtime = self.path.stat().st_mtime
        except FileNotFoundError:
            self._steps = set()
            return
        if mtime == self._mtime:
            return
        self._mtime = mtime
        try:
            entries = json.loads(self.path.read_text()).get("nan_loss", [])
            self._steps = {int(e["step"]) for e in entries if e.get("attempt", self.attempt) == self.attempt}
        except (ValueError, AttributeError, KeyError, TypeError) as err:
            log.error("ignoring unreadable %s: %s", self.path, err)
            self._steps = set()

    def nan_at(self, step: int) -> bool:
        """Poison the loss of `step` (1-based, the step being computed)? True once per step and process."""
        self._refresh()
        if step in self._steps and step not in self._fired:
            self._fired.add(step)
            log.warning("fault injection (%s): NaN loss at step %d", self.path.name, step)
            return True
        return False
