"""Stragglers seen by one supervisor: step times in from heartbeats, scores out to /metrics, one ledger
entry per rank that becomes a persistent straggler."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from health.config import HealthConfig
from health.stragglers import StragglerTracker
from resilient.core import ledger
from resilient.core.events import LedgerEvent
from resilient.metrics.exporter import NodeMetrics
from resilient.rank.heartbeat import Phase


class StragglerLedger:
    def __init__(self, cfg: HealthConfig, run_dir: Path, node: str, metrics: NodeMetrics) -> None:
        self.tracker = StragglerTracker.from_config(cfg)
        self.run_dir, self.node, self.metrics = run_dir, node, metrics
        self._recorded: set[int] = set()

    def observe(self, hb: dict[str, Any]) -> None:
        # Compute time before the gradient all-reduce: wall step time is the same on every rank.
        busy = hb.get("compute_time", hb.get("step_time"))
        if hb.get("phase") == Phase.STEP and isinstance(busy, (int, float)) and busy > 0:
            self.tracker.observe(hb["rank"], float(busy))

    def check(self) -> None:
        """Export straggler scores; each newly persistent straggler gets one ledger entry."""
        self.metrics.on_stragglers(self.tracker.scores())
        for rank, score, _reason in self.tracker.persistent():
            if rank not in self._recorded:
                self._recorded.add(rank)
                ledger.append(self.run_dir, LedgerEvent.STRAGGLER, rank=rank, node=self.node, score=round(score, 3))
