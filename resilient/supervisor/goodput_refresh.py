"""Goodput for /metrics: recomputed from the whole ledger and train log on a thread of node 0's supervisor,
so the watch loop never reads those files."""

from __future__ import annotations

import sys
import threading
from pathlib import Path

from resilient.metrics.exporter import NodeMetrics
from resilient.status import run_goodput


class GoodputRefresh:
    """Every `interval_s`, the run's goodput into `metrics`; a failing refresh is told and retried."""

    def __init__(self, run_dir: Path, interval_s: float, metrics: NodeMetrics) -> None:
        self.run_dir, self.interval_s, self.metrics = run_dir, interval_s, metrics
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="goodput", daemon=True)

    def start(self) -> GoodputRefresh:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                report = run_goodput(self.run_dir)
            except Exception as err:  # noqa: BLE001 - a goodput bug must not end the supervisor
                print(f"resilient: goodput refresh failed: {err}", file=sys.stderr)
                continue
            self.metrics.set_goodput(report)
