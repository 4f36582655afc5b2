"""Faults a rank inflicts on itself for tests and chaos drills, named in RUN_DIR/faults.json.

Active only when that file exists (never leave one in a production run directory); re-read when it
changes, so a drill can add entries while the run trains. Format (attempt omitted: any attempt):

    {"nan_loss": [{"step": 15, "attempt": 0}],
     "bitflip": [{"step": 9, "rank": 1, "target": "weights", "bit": 22, "attempt": 0}]}

`nan_loss`: the loss of that step is multiplied by NaN, so gradients and update are poisoned the way a
real blow-up poisons them; in the same process every later execution of the same data window is
poisoned again (a re-execution reproduces it, as a blow-up caused by the data would), while the step
that takes the window's place after a skip is not.

`bitflip`: one bit of one element flips in rank `rank`'s memory, once per process: `weights` (a
parameter, before the step's forward), `gradients` (the gradient buffer after the data-parallel
reduction, before the optimizer) or `activation` (the first transformer layer's input in the step's
forward). A re-execution of the step does not repeat it: a transient hardware fault. trainer/bitflip.py
applies it.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from resilient.core.rundir import RunDir

log = logging.getLogger(__name__)

Target = Literal["weights", "gradients", "activation"]
TARGETS: tuple[Target, ...] = ("weights", "gradients", "activation")


@dataclass(frozen=True)
class BitFlip:
    step: int
    target: Target = "weights"
    bit: int | None = None
    parameter: str | None = None
    index: int | None = None


class FaultInjection:
    """The entries of RUN_DIR/faults.json that concern this rank and attempt."""

    def __init__(self, run_dir: Path, attempt: int, rank: int) -> None:
        self.path = RunDir(run_dir).faults
        self.attempt, self.rank = attempt, rank
        self._mtime: float | None = None
        self._nan_steps: set[int] = set()
        self._flips: dict[int, BitFlip] = {}
        self._poisoned_windows: set[int] = set()
        self._fired: set[tuple[str, int]] = set()

    def _refresh(self) -> None:
        try:
            mtime = self.path.stat().st_mtime
        except FileNotFoundError:
            self._nan_steps, self._flips = set(), {}
            return
        if mtime == self._mtime:
            return
        self._mtime = mtime
        try:
            doc = json.loads(self.path.read_text())

            def mine(e: dict) -> bool:
                return e.get("attempt", self.attempt) == self.attempt

            self._nan_steps = {int(e["step"]) for e in doc.get("nan_loss", []) if mine(e)}
            flips = [
                BitFlip(int(e["step"]), e.get("target", "weights"), e.get("bit"), e.get("parameter"), e.get("index"))
                for e in doc.get("bitflip", [])
                if mine(e) and e.get("rank") == self.rank
            ]
            if any(f.target not in TARGETS for f in flips):
                raise ValueError(f"bitflip target must be one of {', '.join(TARGETS)}")
            self._flips = {f.step: f for f in flips}
        except (ValueError, AttributeError, KeyError, TypeError) as err:
            log.error("ignoring unreadable %s: %s", self.path, err)
            self._nan_steps, self._flips = set(), {}

    def poison(self, step: int, window_start: int) -> float:
        """The factor for the loss of `step` (1-based, the step being computed) whose data window starts at
        global sample `window_start`: NaN for an armed step (once) and for its window ever after, else 1."""
        self._refresh()
        if step in self._nan_steps and ("nan", step) not in self._fired:
            self._fired.add(("nan", step))
            self._poisoned_windows.add(window_start)
            log.warning("fault injection (%s): NaN loss at step %d", self.path.name, step)
        return float("nan") if window_start in self._poisoned_windows else 1.0

    def bitflip(self, step: int) -> BitFlip | None:
        """The bit flip armed for `step` on this rank, the first time the step is computed in this process."""
        self._refresh()
        flip = self._flips.get(step)
        if flip is None or ("bitflip", step) in self._fired:
            return None
        self._fired.add(("bitflip", step))
        return flip
