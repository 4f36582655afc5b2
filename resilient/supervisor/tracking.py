"""Heartbeat tracking: what the supervisor knows about each local rank, and the attempt's progress.

Progress is a new (phase, step) pair; step and save durations feed the calibrated hang timeouts.
"""

from __future__ import annotations

import collections
import time
from dataclasses import dataclass, field
from typing import Any

from resilient.rank.heartbeat import Heartbeat, Phase


@dataclass
class RankView:
    """What the supervisor knows about one local rank from its heartbeats."""

    rank: int
    local_rank: int
    pid: int
    last_progress: float
    """Monotonic time of the last new (phase, step), or of the spawn."""
    phase: str = Phase.INIT
    step: int | None = None
    last_heartbeat: float | None = None
    """Wall-clock time of the last heartbeat (for status)."""
    progress_key: tuple[str, int | None] = (Phase.INIT, None)
    error: str | None = None
    """The message of an `error` heartbeat."""
    error_code: int | None = None
    """The exit code an `error` heartbeat announced, if any."""
    done_message: str | None = None
    """Why the rank's work ended, as its `done` heartbeat said (e.g. Megatron's --exit-interval)."""
    trains_from: int | None = None
    """The step the rank (re)started training from: its first `step` heartbeat of the attempt, or one that went
    back (a rollback). Until it moves past it, its first step, with the one-off costs, is under way."""

    @property
    def in_first_step(self) -> bool:
        """Training started (or restarted) and no step completed since: lazy communicator setup, data-loader
        workers and compilation fall in this step, so its duration says nothing about the steps after."""
        return self.phase == Phase.STEP and self.step is not None and self.step == self.trains_from


@dataclass
class HeartbeatTracker:
    """Rank views of the current attempt plus the step/save durations observed across attempts."""

    window: int
    views: dict[int, RankView] = field(default_factory=dict)
    start_step: int | None = None
    """Highest step the ranks resumed from (`init`/`restore` heartbeats) in this attempt."""
    reached_step: int | None = None
    """Highest step completed (`step`/`done` heartbeats) in this attempt."""

    def __post_init__(self) -> None:
        self.step_times: collections.deque[float] = collections.deque(maxlen=self.window)
        self.ckpt_times: collections.deque[float] = collections.deque(maxlen=self.window)

    def new_attempt(self) -> None:
        """Forget the last attempt's steps (its rank views stay for status until new ranks are tracked)."""
        self.start_step = self.reached_step = None

    def track(self, ranks: list[RankView]) -> None:
        """The freshly spawned ranks of this attempt."""
        self.views = {v.rank: v for v in ranks}

    def observe(self, hb: Heartbeat, attempt: int, now: float) -> bool:
        """Apply one heartbeat; False when it is not for a rank of this attempt (a late one of an earlier attempt)."""
        view = self.views.get(hb["rank"])
        if view is None or hb.get("attempt") != attempt:
            return False
        phase, step = str(hb.get("phase")), hb["step"]
        if phase == Phase.STEP and (view.trains_from is None or (view.step is not None and step < view.step)):
            view.trains_from = step
        if (phase, step) != view.progress_key:
            # Without a reported step time, the gap between two step heartbeats is the step time.
            if phase == Phase.STEP and view.progress_key[0] == Phase.STEP and not _positive(hb.get("step_time")):
                self.step_times.append(now - view.last_progress)
            view.progress_key, view.last_progress = (phase, step), now
        if phase == Phase.STEP and _positive(hb.get("step_time")):
            self.step_times.append(float(hb["step_time"]))
        if _positive(hb.get("ckpt_blocking_s")):
            self.ckpt_times.append(float(hb["ckpt_blocking_s"]))
        view.phase, view.step, view.last_heartbeat = phase, step, time.time()
        if phase in (Phase.INIT, Phase.BUILD, Phase.RESTORE):
            self.start_step = max(self.start_step or 0, step)
        elif phase in (Phase.STEP, Phase.DONE):
            self.reached_step = max(self.reached_step or 0, step)
            if phase == Phase.DONE and hb.get("message"):
                view.done_message = str(hb["message"])
        elif phase == Phase.ERROR:
            view.error = str(hb.get("message", ""))
            view.error_code = hb.get("exit_code")
        return True

    def current_step(self) -> int | None:
        """The newest step any rank reported, else the attempt's reached step."""
        steps = [v.step for v in self.views.values() if v.step is not None]
        return max(steps, default=self.reached_step)


def _positive(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0
