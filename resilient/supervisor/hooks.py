"""The supervisor's one place of contact with the metrics and health components.

Everything here is best-effort observability except `preflight` and `fatal_health`, whose
verdicts decide whether this node may keep training.
"""

from __future__ import annotations

import sys
import threading
from pathlib import Path
from typing import Any

from health.actions import Action, HealthDecision, decide_health, record
from health.monitor import HealthMonitor
from health.preflight import run_preflight
from health.stragglers import StragglerTracker
from health.types import HealthReport, Severity
from resilient.config import RunConfig
from resilient.core import ledger
from resilient.core.errors import ConfigError
from resilient.core.events import LedgerEvent
from resilient.metrics.exporter import NodeMetrics
from resilient.rank.heartbeat import Phase
from resilient.status import run_goodput
from resilient.supervisor.failures import FailureKind


class NodeHooks:
    """Metrics exporter, health pre-flight/monitor and goodput refresh for one supervisor."""

    def __init__(self, cfg: RunConfig, node: str, run_dir: Path, *, is_node0: bool) -> None:
        self.cfg, self.node, self.run_dir = cfg, node, run_dir
        self.metrics = NodeMetrics(cfg.metrics, node) if cfg.metrics.enabled else None
        if self.metrics is not None:
            self.metrics.declare_failure_kinds(FailureKind)
        self.monitor: HealthMonitor | None = None
        self._goodput_stop = threading.Event()
        self._goodput_thread: threading.Thread | None = None
        self._is_node0 = is_node0
        self._last_health_ts: float | None = None
        self._last_bad: frozenset[tuple[str, Severity]] = frozenset()
        self.stragglers = StragglerTracker.from_config(cfg.health)
        self._stragglers_recorded: set[int] = set()

    def start(self) -> int | None:
        """Start serving /metrics; returns the bound port (None when metrics are off)."""
        if self.metrics is None:
            return None
        try:
            port = self.metrics.start()
        except OSError as err:
            raise ConfigError(f"metrics.port {self.cfg.metrics.port} on {self.cfg.metrics.address}: "
                              f"{err.strerror} (set metrics.port=0 for any free port)") from None
        if self._is_node0:
            # Goodput reads the whole ledger and train log: off the watch loop, on node 0 only.
            self._goodput_thread = threading.Thread(target=self._goodput_loop, name="goodput", daemon=True)
            self._goodput_thread.start()
        return port

    def stop(self) -> None:
        self.stop_monitor()
        self._goodput_stop.set()
        if self.metrics is not None:
            self.metrics.stop()

    # -- health -------------------------------------------------------------------------------

    def preflight(self) -> tuple[str, str] | None:
        """Run the pre-flight checks; returns ("unhealthy" | "storage", reason naming node and check) or None."""
        if not self.cfg.health.enabled:
            return None
        report = run_preflight(self.cfg.health, node=self.node, ckpt_dir=self.cfg.checkpoint.root(self.run_dir),
                               nproc=self.cfg.supervisor.nproc_per_node)
        self._on_report(report)
        return _fault(decide_health(report, "preflight"))

    def start_monitor(self) -> None:
        if self.cfg.health.enabled and self.monitor is None:
            self.monitor = HealthMonitor(self.cfg.health, self.node, self.cfg.checkpoint.root(self.run_dir)).start()

    def stop_monitor(self) -> None:
        if self.monitor is not None:
            self.monitor.stop()
            self.monitor = None

    def fatal_health(self) -> tuple[str, str] | None:
        """The monitor's newest report, handled once: recorded, exported; returns ("unhealthy" | "storage",
        reason) when it ends this attempt."""
        report = self.monitor.latest() if self.monitor is not None else None
        if report is None or report.ts == self._last_health_ts:
            return None
        self._last_health_ts = report.ts
        self._on_report(report)
        return _fault(decide_health(report, "training"))

    def on_storage_fault(self) -> None:
        if self.metrics is not None:
            self.metrics.on_storage_fault()

    def _on_report(self, report: HealthReport) -> None:
        # The ledger gets a report only when its set of problems changes: a lasting warning is one entry, not one per check.
        bad = frozenset((r.name, r.severity) for r in report.results if r.severity is not Severity.OK)
        if bad != self._last_bad:
            record(self.run_dir, report)
            self._last_bad = bad
        if self.metrics is not None:
            self.metrics.on_health(report)

    def check_stragglers(self) -> None:
        """Export straggler scores; each newly persistent straggler gets one ledger entry."""
        if self.metrics is not None:
            self.metrics.on_stragglers(self.stragglers.scores())
        for rank, score, _reason in self.stragglers.persistent():
            if rank not in self._stragglers_recorded:
                self._stragglers_recorded.add(rank)
                ledger.append(self.run_dir, LedgerEvent.STRAGGLER, rank=rank, node=self.node, score=round(score, 3))

    # -- metrics ------------------------------------------------------------------------------

    def on_heartbeat(self, hb: dict[str, Any]) -> None:
        if self.metrics is not None:
            self.metrics.on_heartbeat(hb["rank"], hb.get("local_rank", 0), hb)
        # Compute time before the gradient all-reduce: wall step time is the same on every rank.
        busy = hb.get("compute_time", hb.get("step_time"))
        if hb.get("phase") == Phase.STEP and isinstance(busy, (int, float)) and busy > 0:
            self.stragglers.observe(hb["rank"], float(busy))
        if self._is_node0 and hb["rank"] == 0 and hb.get("phase") == Phase.STEP and "loss" in hb:
            self._progress(hb)

    def _progress(self, hb: dict[str, Any]) -> None:
        """The operator's console line, every `train.log_every` steps (rank 0's numbers)."""
        step, total = hb["step"], self.cfg.train.steps
        if step % self.cfg.train.log_every and step != total:
            return
        print(f"resilient: step {step}/{total} loss {hb['loss']:.4f} {hb.get('tokens_per_s', 0):,.0f} tok/s "
              f"step {hb.get('step_time', 0):.3f}s mfu {100 * hb.get('mfu', 0):.1f}%", file=sys.stderr, flush=True)

    def heartbeat_age(self, rank: int, seconds: float) -> None:
        if self.metrics is not None:
            self.metrics.heartbeat_age(rank, seconds)

    def on_failure(self, kind: str) -> None:
        if self.metrics is not None:
            self.metrics.on_failure(kind)

    def on_restart(self) -> None:
        if self.metrics is not None:
            self.metrics.on_restart()

    def on_spares(self, count: int, rss_bytes: int) -> None:
        if self.metrics is not None:
            self.metrics.on_spares(count, rss_bytes)

    def on_roster(self, spares: int, bad: int, configured: int) -> None:
        """The coordinator's roster changed: spare nodes left, nodes out of the run, spares configured."""
        if self.metrics is not None:
            self.metrics.on_roster(spares, bad, configured)

    def on_replacement(self) -> None:
        if self.metrics is not None:
            self.metrics.on_replacement()

    def set_state(self, state: str, attempt: int) -> None:
        if self.metrics is not None:
            self.metrics.set_state(state, attempt)

    def _goodput_loop(self) -> None:
        while not self._goodput_stop.wait(self.cfg.metrics.goodput_interval_s):
            try:
                report = run_goodput(self.run_dir)
            except Exception as err:  # noqa: BLE001 - a goodput bug must not end the supervisor
                print(f"resilient: goodput refresh failed: {err}", file=sys.stderr)
                continue
            if self.metrics is not None:
                self.metrics.set_goodput(report)


def _fault(verdict: HealthDecision) -> tuple[str, str] | None:
    kinds = {Action.STOP: "unhealthy", Action.SAVE_AND_STOP: "storage"}
    return (kinds[verdict.action], verdict.reason) if verdict.action in kinds else None
