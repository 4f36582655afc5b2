"""The adaptive checkpoint interval as pure functions: a save's true cost, the failure rate, Young/Daly.

- A save's cost to the loop is the extra wall time of the iterations from the save on (the blocking
  call, then the steps slowed by the background write: copy-on-write faults, hashing and writing
  competing for the cores) over the median iteration without a save, not the blocking call alone.
- The mean time between failures blends a prior with what the run observed: the prior counts as one
  failure seen after `prior` seconds, so (prior + exposure) / (1 + failures): the prior rules while
  the run is young, the observed rate once failures accumulate.
- The interval is Daly's higher-order optimum (Young 1974 to first order) of compute time between
  saves, in steps of the median iteration, within the configured bounds.

Nothing here touches processes, clocks or files.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence


def young_interval(delta: float, mtbf: float) -> float:
    """Young's first-order optimal compute time between checkpoints: sqrt(2 delta M)."""
    return math.sqrt(2 * delta * mtbf)


def daly_interval(delta: float, mtbf: float) -> float:
    """Daly 2006 higher-order optimum: sqrt(2dM)[1 + sqrt(d/2M)/3 + (d/2M)/9] - d for d < 2M, else M."""
    if delta >= 2 * mtbf:
        return mtbf
    x = delta / (2 * mtbf)
    return math.sqrt(2 * delta * mtbf) * (1 + math.sqrt(x) / 3 + x / 9) - delta


def save_cost(iterations: Sequence[float], baseline: float) -> float:
    """Extra wall seconds of `iterations` (the save's own iteration and the ones after it) over
    `baseline` (the median iteration without a save), never negative."""
    return max(0.0, sum(iterations) - baseline * len(iterations))


def estimate_mtbf(prior_s: float, failures: int, exposure_s: float) -> tuple[float, str]:
    """Mean time between failures from a prior (worth one failure) and the run's own history."""
    mtbf = (prior_s + max(0.0, exposure_s)) / (1 + max(0, failures))
    return mtbf, (f"MTBF {mtbf:.4g}s = (prior {prior_s:.4g}s + {exposure_s:.4g}s run) / (1 + {failures} failures)")


def choose_interval(
    *, save_cost_s: float, step_s: float, mtbf_s: float, min_steps: int, max_steps: int
) -> tuple[int, str]:
    """Steps between saves: Daly's optimum for a save costing `save_cost_s` and a failure every
    `mtbf_s`, over iterations of `step_s`, clamped to [min_steps, max_steps]."""
    if step_s <= 0 or mtbf_s <= 0:
        return max_steps, f"no step time or MTBF measured: the upper bound {max_steps}"
    if save_cost_s <= 0:
        return min_steps, f"saves cost the loop nothing measurable: the lower bound {min_steps}"
    tau = daly_interval(save_cost_s, mtbf_s)
    raw = tau / step_s
    steps = min(max_steps, max(min_steps, round(raw)))
    why = (
        f"Daly {tau:.4g}s of compute = {raw:.1f} steps of {step_s:.3g}s "
        f"(save costs the loop {save_cost_s:.3g}s, MTBF {mtbf_s:.4g}s)"
    )
    if steps != round(raw):
        why += f", bounded to [{min_steps}, {max_steps}]"
    return steps, why


HYSTERESIS = 0.2
"""An interval moves only when the optimum differs from it by more than this share of it."""


def worth_changing(previous: int, proposed: int, *, min_steps: int, max_steps: int) -> bool:
    """Move from `previous` to `proposed`? Only by more than HYSTERESIS of `previous`, or when
    `previous` is outside the bounds: a save's cost is measured over a few noisy iterations, and
    following every measurement moved a soak's interval 127 times in 10 minutes."""
    if not min_steps <= previous <= max_steps:
        return proposed != previous
    return abs(proposed - previous) > HYSTERESIS * previous


def restored_interval(
    last: int, last_configured: int | None, configured: int, *, min_steps: int, max_steps: int
) -> int:
    """The interval a new attempt starts from: the last one chosen (`last`, 0 if none), held within
    today's bounds (the config may have changed across a requeue); the configured one when nothing
    was chosen yet, or when the configured interval is no longer the one the last choice started from
    (`last_configured`; None: not recorded), an operator's change overriding the past."""
    if last <= 0 or (last_configured is not None and last_configured != configured):
        return configured
    return min(max_steps, max(min_steps, last))


class CostMeter:
    """Iteration wall times of one rank, and the cost of each save measured over the iterations that
    start with it: at least `window`, and on while its background write is in flight (up to `longest`),
    or until the next save. Feed `iteration(...)` once per step and `saved()` at a save."""

    def __init__(
        self, window: int, warmup: int = 2, keep: int = 200, longest: int = 1000, first_saves: int = 1
    ) -> None:
        self.window, self.warmup, self.keep, self.longest = window, warmup, keep, max(window, longest)
        self.first_saves = first_saves
        """Saves of this process whose cost is not recorded: the first one allocates what later ones
        reuse (staging buffers, the memory tier's files), and one such cost set a soak's interval to
        111 steps where 35 was right; their iterations are not baseline either."""
        self._windows = 0
        self.plain: list[float] = []
        """Recent quiet iterations outside any cost window (the baseline)."""
        self.costs: list[float] = []
        """Measured save costs, oldest first."""
        self.fastest = math.inf
        """The fastest iteration inside a window: the baseline while no quiet one has run (every
        write outlasting the interval), so a decision is still taken, and errs towards a lower cost."""
        self._open: list[float] | None = None
        self._floor = 0.0
        """The open window's save's blocking time."""
        self._seen = 0
        self._measured = False
        """A window closed by the next save (its write outlasted the interval), reported by the next
        `iteration` so that decision is taken too."""

    def seed(self, cost: float) -> None:
        """A cost measured before this process (the previous attempt's): one sample among the next
        ones, so the first noisy measurements of a new attempt do not decide alone."""
        if cost > 0:
            self.costs = [cost]

    def saved(self, blocking_s: float = 0.0) -> None:
        """A save happened in the current iteration, blocking the loop `blocking_s`: its cost window
        starts here (a window still open is closed with what it has). The blocking time is the least
        the save can have cost: a window that measures less (its steps ran faster than the baseline)
        is noise, and a cost of 0 would send the interval to its lower bound."""
        self._measured = self._close() or self._measured
        self._open, self._floor = [], max(0.0, blocking_s)

    def iteration(self, seconds: float, in_flight: bool = False, quiet: bool = True) -> bool:
        """Record one iteration (the save's own one included). `in_flight`: this tier's background
        write has not finished (the window stays open); `quiet`: no tier saved or wrote during it (only
        quiet iterations are baseline). True when a save's cost was just measured."""
        self._seen += 1
        measured, self._measured = self._measured, False
        if self._seen <= self.warmup:  # restore, first-step allocations: neither baseline nor cost
            self._open = None
            return False
        if self._open is None:
            if quiet and not in_flight:
                self.plain = (self.plain + [seconds])[-self.keep :]
            return measured
        self._open.append(seconds)
        self.fastest = min(self.fastest, seconds)
        if (len(self._open) >= self.window and not in_flight) or len(self._open) >= self.longest:
            return self._close() or measured
        return measured

    def _close(self) -> bool:
        window, self._open = self._open, None
        if not window:
            return False
        self._windows += 1
        if self._windows <= self.first_saves:
            return False
        self.costs = (self.costs + [max(self._floor, save_cost(window, self.baseline()))])[-self.keep :]
        return True

    def baseline(self) -> float:
        """The median quiet iteration (the fastest windowed one before any; 0 before either)."""
        if self.plain:
            return statistics.median(self.plain)
        return self.fastest if self.fastest < math.inf else 0.0

    def cost(self) -> float:
        """The median of the last five measured save costs (0 before any)."""
        return statistics.median(self.costs[-5:]) if self.costs else 0.0
