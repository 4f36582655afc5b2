"""The supervisor's health checks: pre-flight before each attempt, the monitor during it, typed verdicts out.

Each report is judged once (health.actions.decide_health), recorded in the ledger when its set of
problems changes, and exported (live, and as the node's durable facts) before its verdict is handed
to the supervisor: a supervisor that stops at once has already said why.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from health.actions import HealthVerdict, decide_health, record
from health.config import HealthConfig
from health.monitor import HealthMonitor
from health.preflight import run_preflight
from health.types import HealthReport, Severity
from resilient.metrics.exporter import NodeMetrics


class HealthWatch:
    """Health of one node for its supervisor: `preflight()` and `fatal()` return the verdict that ends an
    attempt (UNHEALTHY or STORAGE), None otherwise."""

    def __init__(
        self, cfg: HealthConfig, node: str, run_dir: Path, ckpt_dir: Path, nproc: int, metrics: NodeMetrics
    ) -> None:
        self.cfg, self.node, self.run_dir, self.ckpt_dir, self.nproc = cfg, node, run_dir, ckpt_dir, nproc
        self.metrics = metrics
        self.monitor: HealthMonitor | None = None
        self._last_ts: float | None = None
        self._last_bad: frozenset[tuple[str, Severity]] = frozenset()

    def preflight(self) -> HealthVerdict | None:
        if not self.cfg.enabled:
            return None
        report = run_preflight(self.cfg, node=self.node, ckpt_dir=self.ckpt_dir, nproc=self.nproc)
        return self._judge(report, "preflight")

    def start_monitor(self) -> None:
        if self.cfg.enabled and self.monitor is None:
            self.monitor = HealthMonitor(self.cfg, self.node, self.ckpt_dir).start()

    def stop_monitor(self) -> None:
        if self.monitor is not None:
            self.monitor.stop()
            self.monitor = None

    def fatal(self) -> HealthVerdict | None:
        """The monitor's newest report, judged once."""
        report = self.monitor.latest() if self.monitor is not None else None
        if report is None or report.ts == self._last_ts:
            return None
        self._last_ts = report.ts
        return self._judge(report, "training")

    def _judge(self, report: HealthReport, phase: Literal["preflight", "training"]) -> HealthVerdict | None:
        verdict = decide_health(report, phase)
        # The ledger gets a report only when its set of problems changes: a lasting warning is one entry, not one
        # per check.
        bad = frozenset((r.name, r.severity) for r in report.results if r.severity is not Severity.OK)
        if bad != self._last_bad:
            record(self.run_dir, report)
            self._last_bad = bad
        self.metrics.on_health(report, verdict)
        return verdict if verdict.ends_attempt else None
