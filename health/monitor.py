"""Periodic health checks on a background thread; the supervisor reads `latest()` and never waits."""

from __future__ import annotations

import threading
from pathlib import Path

from health.config import HealthConfig
from health.gpu.provider import GpuProvider, provider_for
from health.gpu.rules import evaluate
from health.gpu.state import GpuSample
from health.node_checks import node_checks
from health.types import CheckResult, HealthReport, Severity


class HealthMonitor:
    """Samples GPU and node health every `interval_s` seconds; growth rules compare consecutive samples."""

    def __init__(self, cfg: HealthConfig, node: str, ckpt_dir: Path, interval_s: float | None = None) -> None:
        self.cfg = cfg
        self.node = node
        self.ckpt_dir = Path(ckpt_dir)
        self.interval_s = self.cfg.monitor_interval_s if interval_s is None else interval_s
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._latest: HealthReport | None = None
        self._thread: threading.Thread | None = None
        self._provider: GpuProvider | None = None
        self._prev: GpuSample | None = None

    def start(self) -> HealthMonitor:
        self._thread = threading.Thread(target=self._loop, name=f"health-monitor-{self.node}", daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
        if self._provider is not None:
            self._provider.close()
            self._provider = None

    def latest(self) -> HealthReport | None:
        with self._lock:
            return self._latest

    def check_once(self) -> HealthReport:
        """One round of checks (the thread's body; callable directly for a synchronous check)."""
        results: list[CheckResult] = []
        try:
            if self._provider is None:
                self._provider = provider_for(self.cfg, self.node)
            cur = self._provider.sample()
            results += evaluate(self._prev, cur, self.cfg)
            self._prev = cur
        except Exception as err:  # a broken probe must not kill the monitor; it shows up as a warning
            results.append(CheckResult("gpu.sample", Severity.WARN, f"GPU sampling failed: {err}"))
        try:
            results += node_checks(self.ckpt_dir, self.cfg)
        except Exception as err:
            results.append(CheckResult("node.checks", Severity.WARN, f"node checks failed: {err}"))
        report = HealthReport(self.node, results)
        with self._lock:
            self._latest = report
        return report

    def _loop(self) -> None:
        while not self._stop.is_set():
            self.check_once()
            self._stop.wait(self.interval_s)
