"""Numerical faults: detect a NaN/Inf or spiking loss, roll back, and skip the data window that caused it.

The decision is a pure function of the loss and its recent history. The skip is carried by the data
loader's checkpointed state (`SkippingLoader`), so a run resumed after a rollback skips the same
window again, and a rerun of the same fault schedule ends with the same bits.

A gradient-norm spike (`numerics.grad_norm_spike_factor`) is judged the same way as a loss spike.
"""

from __future__ import annotations

import logging
import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from resilient.core.errors import ResilientError
from resilient.core.exit_codes import ExitCode

log = logging.getLogger(__name__)


class NumericFaultError(ResilientError):
    """A numerical fault that cannot be rolled back (no checkpoint yet, or too many rollbacks)."""

    exit_code = ExitCode.RANK_FAILED
    label = "numeric fault"


@dataclass(frozen=True)
class Verdict:
    fault: str | None
    """None (healthy), "nan", "inf" or "spike" (the loss), or the same prefixed grad_norm_ (the gradient norm)."""
    reason: str


def judge_loss(loss: float, recent: Sequence[float], *, spike_factor: float, window: int) -> Verdict:
    """Is `loss` a numerical fault given the losses of the preceding steps (oldest first)?

    A spike is a loss above `spike_factor` x the median of the last `window` losses; it is only judged
    once `window` losses are known (spike_factor 0: never)."""
    return _judge("loss", "", loss, recent, spike_factor, window)


def judge_grad_norm(norm: float, recent: Sequence[float], *, spike_factor: float, window: int) -> Verdict:
    """`judge_loss` for the global gradient norm (before clipping); kinds are prefixed `grad_norm_`."""
    return _judge("gradient norm", "grad_norm_", norm, recent, spike_factor, window)


def _judge(what: str, prefix: str, value: float, recent: Sequence[float], spike_factor: float, window: int) -> Verdict:
    if math.isnan(value):
        return Verdict(f"{prefix}nan", f"{what} is NaN")
    if math.isinf(value):
        return Verdict(f"{prefix}inf", f"{what} is infinite")
    level = recent[-window:]
    if spike_factor > 0 and len(level) >= window:
        typical = statistics.median(level)
        if typical > 0 and value > spike_factor * typical:
            return Verdict(
                f"{prefix}spike", f"{what} {value:.4g} exceeds {spike_factor:g} x the recent median {typical:.4g}"
            )
    return Verdict(None, f"{what} is finite and within the spike bound")


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
