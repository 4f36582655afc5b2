"""Straggler detection from per-rank step times.

A rank's score is its median step time over the last `window` observations divided by the median of
all ranks' medians (1.0 = typical). Each time every rank has `window` new observations a window
closes; a rank slow (score >= threshold) in `windows` consecutive closed windows is a persistent
straggler. Feed it times that differ between ranks, such as each rank's compute time before the
gradient all-reduce: synchronous data parallelism makes wall-clock step times equal on all ranks.
"""

from __future__ import annotations

import statistics
from collections import deque

from health.config import HealthConfig


class StragglerTracker:
    """Per-rank step-time scores relative to the other ranks, with persistence over windows."""

    def __init__(
        self, *, window: int = 10, threshold: float = 1.2, windows: int = 3, nodes: dict[int, str] | None = None
    ) -> None:
        if window < 1 or windows < 1 or threshold <= 1.0:
            raise ValueError("window and windows must be >= 1 and threshold > 1.0")
        self.window, self.threshold, self.windows = window, threshold, windows
        self.nodes = dict(nodes or {})
        self._times: dict[int, deque[float]] = {}
        self._new: dict[int, int] = {}
        self._slow_runs: dict[int, int] = {}
        self._closed: dict[int, float] = {}

    @classmethod
    def from_config(cls, cfg: HealthConfig, nodes: dict[int, str] | None = None) -> StragglerTracker:
        return cls(
            window=cfg.straggler_window, threshold=cfg.straggler_threshold, windows=cfg.straggler_windows, nodes=nodes
        )

    def observe(self, rank: int, step_time: float) -> None:
        self._times.setdefault(rank, deque(maxlen=self.window)).append(float(step_time))
        self._new[rank] = self._new.get(rank, 0) + 1
        if len(self._times) >= 2 and min(self._new.values()) >= self.window:
            self._close_window()

    def scores(self) -> dict[int, float]:
        """Current score per rank (1.0 each while fewer than two ranks reported)."""
        medians = {r: statistics.median(ts) for r, ts in self._times.items() if ts}
        if len(medians) < 2:
            return {r: 1.0 for r in medians}
        typical = statistics.median(medians.values())
        return {r: (m / typical if typical > 0 else 1.0) for r, m in medians.items()}

    def _close_window(self) -> None:
        self._closed = self.scores()
        for rank, score in self._closed.items():
            self._slow_runs[rank] = self._slow_runs.get(rank, 0) + 1 if score >= self.threshold else 0
        self._new = {r: 0 for r in self._new}

    def persistent(self) -> list[tuple[int, float, str]]:
        """(rank, score, reason) for ranks slow in the last `windows` closed windows, worst first."""
        out = []
        for rank, runs in self._slow_runs.items():
            if runs >= self.windows:
                score = self._closed[rank]
                where = f" on node {self.nodes[rank]}" if rank in self.nodes else ""
                out.append(
                    (
                        rank,
                        score,
                        f"rank {rank}{where} is a persistent straggler: step time "
                        f"{score:.2f}x the median for {runs} windows of {self.window} steps",
                    )
                )
        return sorted(out, key=lambda item: -item[1])
