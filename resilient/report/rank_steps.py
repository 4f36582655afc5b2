"""RUN_DIR/rank_steps.jsonl: every rank's step time, sampled, so the report can show stragglers.

Only rank 0 writes the train log; per-rank step times live in heartbeats and die with the
supervisor. Each node's supervisor appends one line per interval with the mean step time of each
local rank since the last line: one small O_APPEND write per node per interval.
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from resilient.core import ledger
from resilient.core.rundir import RunDir

INTERVAL_S = 30.0


class RankStepLog:
    def __init__(self, run_dir: Path, node: int, interval_s: float = INTERVAL_S) -> None:
        self.path, self.node, self.interval_s = RunDir(run_dir).rank_steps, node, interval_s
        self._sums: dict[int, list[float]] = defaultdict(lambda: [0.0, 0.0])
        self._steps: dict[int, int] = {}
        self._attempt: Any = None
        self._next: float | None = None

    def observe(self, hb: dict[str, Any], now: float | None = None) -> None:
        """Take one heartbeat (at monotonic time `now`); append a line when the interval has passed."""
        now = time.monotonic() if now is None else now
        if self._next is None:
            self._next = now + self.interval_s
        t = hb.get("step_time")
        if hb.get("phase") == "step" and isinstance(t, (int, float)) and not isinstance(t, bool) and t > 0:
            acc = self._sums[hb["rank"]]
            acc[0] += t
            acc[1] += 1
            self._steps[hb["rank"]] = hb["step"]
            self._attempt = hb.get("attempt")
        if (now >= self._next or hb.get("phase") == "done") and self._sums:  # a short run still leaves a sample
            self._next = now + self.interval_s
            ranks = {str(r): {"step": self._steps[r], "step_time": round(s / n, 6)} for r, (s, n) in self._sums.items()}
            self._sums.clear()
            try:
                ledger.append_jsonl(
                    self.path, {"ts": time.time(), "attempt": self._attempt, "node": self.node, "ranks": ranks}
                )
            except OSError:
                pass  # observability only


def read(run_dir: Path) -> Iterator[dict[str, Any]]:
    return ledger.read_jsonl(RunDir(run_dir).rank_steps)
