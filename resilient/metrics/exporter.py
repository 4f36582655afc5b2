"""One supervisor's metrics: heartbeats, health, stragglers and goodput, served live on /metrics, and the
node's facts that must outlive the supervisor (resilient.metrics.textfile) written for node_exporter.

The supervisor calls these methods from its own threads; prometheus-client metrics are
thread-safe and the little state kept here is guarded by a lock. Malformed heartbeat fields are
ignored (a rank must never crash its supervisor through the metrics path).
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from prometheus_client import CollectorRegistry

from health.actions import HealthVerdict
from health.types import HealthReport
from resilient.core.errors import ConfigError
from resilient.core.exit_codes import ExitCode
from resilient.goodput import BADPUT_CATEGORIES, GoodputReport
from resilient.metrics import http
from resilient.metrics.catalog import THROTTLE_REASONS, Catalog
from resilient.metrics.config import MetricsConfig
from resilient.metrics.textfile import GPU_FACTS, NodeFacts

SEVERITY_NAMES = {"ok": 0, "warn": 1, "fatal": 2}

GPU_GAUGES = {
    # key in a health CheckResult's per-GPU values -> Catalog attribute
    "temperature_c": "gpu_temperature",
    "power_w": "gpu_power",
    "ecc_uncorrectable": "gpu_ecc_uncorrectable",
    "last_xid": "gpu_last_xid",
    "remap_pending": "gpu_remap_pending",
    "remap_failed": "gpu_remap_failed",
    "lost": "gpu_lost",
}


CHECKPOINT_TIERS = ("disk", "memory")
"""The `tier` label's values (bounded: anything else a heartbeat names is ignored)."""


def _num(value: Any) -> float | None:
    """The value as a float if it is an int or float (not a bool), else None."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value)


def severity_value(severity: Any) -> int:
    """0/1/2 from an IntEnum-like severity or its name."""
    if isinstance(severity, int):
        return int(severity)
    return SEVERITY_NAMES.get(str(getattr(severity, "name", severity)).lower(), 0)


def gpu_measurements(values: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """Per-GPU measurements in a check's values: `{"gpu": i, ...}` for one GPU, or `{"gpus": {i: {...}}}`."""
    if "gpus" in values and isinstance(values["gpus"], Mapping):
        return {str(i): dict(v) for i, v in values["gpus"].items() if isinstance(v, Mapping)}
    if "gpu" in values:
        return {str(values["gpu"]): dict(values)}
    return {}


def throttle_flags(raw: Any) -> dict[str, int]:
    """Active flag per THROTTLE_REASONS from an NVML bitmask or a list of reason names."""
    if isinstance(raw, int) and not isinstance(raw, bool):
        return {name: int(bool(raw & bit)) for name, bit in THROTTLE_REASONS.items()}
    names = {str(n) for n in raw} if isinstance(raw, (list, tuple, set)) else set()
    return {name: int(name in names) for name in THROTTLE_REASONS}


class NodeMetrics:
    """The metrics of one node: served over HTTP from a dedicated registry while `cfg.enabled`; the facts
    that must outlive the supervisor go to `cfg.textfile_dir` either way."""

    def __init__(self, cfg: MetricsConfig, node: str, *, clock: Callable[[], float] = time.time) -> None:
        self.cfg, self.node, self._clock = cfg, node, clock
        self.facts = NodeFacts(cfg.textfile_dir, node, clock=clock)
        self.registry = CollectorRegistry()
        self.m = Catalog(self.registry)
        self._lock = threading.Lock()
        self._server: Any = None
        self._state: str | None = None
        self._attempt: int | None = None
        self._rank_steps: dict[int, int] = {}
        self._ckpt_seen: set[tuple[str, int]] = set()
        self._ckpt_ts: float | None = None
        self.m.ckpt_age_limit.labels(node).set(cfg.checkpoint_max_age_s)
        self.m.heartbeat_age_limit.labels(node).set(cfg.heartbeat_max_age_s)
        self.m.ckpt_age.labels(node).set_function(self._checkpoint_age)
        self.m.restarts.labels(node)

    # -- lifecycle -----------------------------------------------------------------------------

    def start(self) -> int | None:
        """Serve /metrics on cfg.address:cfg.port (0: any free port) and return the bound port, None when
        metrics are off. A port in use is a ConfigError."""
        if not self.cfg.enabled:
            return None
        try:
            self._server = http.serve(self.registry, self.cfg.address, self.cfg.port)
        except OSError as err:
            raise ConfigError(
                f"metrics.port {self.cfg.port} on {self.cfg.address}: {err.strerror} "
                "(set metrics.port=0 for any free port)"
            ) from None
        return int(self._server.server_port)

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    # -- supervisor events ---------------------------------------------------------------------

    def set_state(self, state: str, attempt: int) -> None:
        """The supervisor's state (one series per state seen, 1 for the current one) and attempt."""
        with self._lock:
            if attempt != self._attempt:
                # Ranks were respawned: series of the previous attempt's ranks would go stale.
                for family in Catalog.RANK_FAMILIES:
                    getattr(self.m, family).clear()
                self._rank_steps.clear()
                self._attempt = attempt
            if self._state is not None and self._state != state:
                self.m.run_state.labels(self.node, self._state).set(0)
            self._state = state
        self.m.run_state.labels(self.node, state).set(1)
        self.m.attempt.labels(self.node).set(attempt)

    def on_failure(self, kind: str) -> None:
        self.m.failures.labels(self.node, kind).inc()

    def on_storage_fault(self) -> None:
        self.m.storage_faults.labels(self.node).inc()

    def declare_failure_kinds(self, kinds: Iterable[str]) -> None:
        """A zero series per known kind: "failures by kind" shows 0, not nothing, in a run without failures."""
        for kind in kinds:
            self.m.failures.labels(self.node, kind)

    def on_restart(self) -> None:
        self.m.restarts.labels(self.node).inc()

    def on_exit(self, code: ExitCode, reason: str) -> None:
        """Why the supervisor exits, kept in the node's facts (the live series end with the process)."""
        self.facts.on_exit(code, reason)

    def on_spares(self, count: int, rss_bytes: int) -> None:
        self.m.spares.labels(self.node).set(count)
        self.m.spares_rss.labels(self.node).set(rss_bytes)

    def on_roster(self, spares: int, bad: int, configured: int) -> None:
        self.m.spare_nodes.labels(self.node).set(spares)
        self.m.bad_nodes.labels(self.node).set(bad)
        self.m.spare_nodes_configured.labels(self.node).set(configured)
        self.m.node_replacements.labels(self.node)  # the series exists, at 0, before the first replacement

    def on_replacement(self) -> None:
        self.m.node_replacements.labels(self.node).inc()

    def heartbeat_age(self, rank: int, seconds: float) -> None:
        self.m.heartbeat_age.labels(self.node, str(rank)).set(seconds)

    def on_stragglers(self, scores: Mapping[int, float]) -> None:
        for rank, score in scores.items():
            self.m.straggler_score.labels(self.node, str(rank)).set(score)

    # -- rank heartbeats -----------------------------------------------------------------------

    def on_heartbeat(self, rank: int, local_rank: int, hb: Mapping[str, Any]) -> None:
        """Translate one heartbeat (channel contract fields) into metric updates."""
        del local_rank  # per-rank series are keyed by the global rank; `gpu` carries the local index
        node, r = self.node, str(rank)
        step = hb.get("step")
        if isinstance(step, int) and not isinstance(step, bool):
            with self._lock:
                previous = self._rank_steps.get(rank)
                self._rank_steps[rank] = step
                node_step = max(self._rank_steps.values())
            self.m.rank_step.labels(node, r).set(step)
            self.m.step.labels(node).set(node_step)
            step_time = _num(hb.get("step_time"))
            if hb.get("phase") == "step" and step_time is not None and (previous is None or step > previous):
                self.m.step_time.labels(node).observe(step_time)
                self.m.rank_step_time.labels(node, r).set(step_time)
        for key, family in (
            ("loss", "loss"),
            ("val_loss", "validation_loss"),
            ("lr", "learning_rate"),
            ("grad_norm", "grad_norm"),
            ("tokens", "consumed_tokens"),
            ("tokens_per_s", "tokens_per_second"),
            ("mfu", "mfu"),
        ):
            value = _num(hb.get(key))
            if value is not None:
                getattr(self.m, family).labels(node).set(value)
        loss = _num(hb.get("loss"))
        if loss is not None and not math.isfinite(loss):
            # The loss gauge is NaN for one step only (the trainer rolls back): a 15 s scrape needs a lasting fact.
            self.m.loss_nonfinite_ts.labels(node).set(self._clock())
        self._on_checkpoint_fields(hb)
        intervals = hb.get("ckpt_intervals")
        if isinstance(intervals, dict):
            for tier, steps in intervals.items():
                if tier in CHECKPOINT_TIERS and _num(steps) is not None:
                    self.m.ckpt_interval.labels(node, tier).set(steps)

    def _on_checkpoint_fields(self, hb: Mapping[str, Any]) -> None:
        """Record each checkpoint once per node, though every rank may report it."""
        ckpt_step = hb.get("ckpt_step")
        if not isinstance(ckpt_step, int) or isinstance(ckpt_step, bool):
            return
        blocking, total, size = (_num(hb.get(k)) for k in ("ckpt_blocking_s", "ckpt_total_s", "ckpt_bytes"))
        with self._lock:
            new_blocking = blocking is not None and ("blocking", ckpt_step) not in self._ckpt_seen
            complete = total is not None and ("complete", ckpt_step) not in self._ckpt_seen
            if new_blocking:
                self._ckpt_seen.add(("blocking", ckpt_step))
            if complete:
                self._ckpt_seen.add(("complete", ckpt_step))
                self._ckpt_ts = self._clock()
        node = self.node
        if new_blocking:
            self.m.ckpt_blocking.labels(node).observe(blocking)
        if complete:
            self.m.ckpt_total.labels(node).observe(total)
            self.m.ckpt_last_step.labels(node).set(ckpt_step)
            self.m.ckpt_last_ts.labels(node).set(self._ckpt_ts)
            if size is not None:
                self.m.ckpt_size.labels(node).set(size)
                self.m.ckpt_written.labels(node).inc(size)

    def _checkpoint_age(self) -> float:
        # NaN (no series value) until a complete checkpoint is known, so the age alert cannot fire on nothing.
        return float("nan") if self._ckpt_ts is None else max(0.0, self._clock() - self._ckpt_ts)

    # -- health, goodput -----------------------------------------------------------------------

    def on_health(self, report: HealthReport, verdict: HealthVerdict) -> None:
        """Export a health report; its verdict and GPU fault readings also go to the node's facts."""
        node, worst = self.node, 0
        durable: dict[str, dict[str, float]] = {}
        for result in report.results:
            severity = severity_value(result.severity)
            worst = max(worst, severity)
            self.m.check_severity.labels(node, result.name).set(severity)
            values = result.values or {}
            busbw = _num(values.get("busbw_gbps"))  # the probe reports GB/s (nccl-tests); the metric is bytes/s
            if busbw is not None:
                self.m.bus_bandwidth.labels(node).set(busbw * 1e9)
            for gpu, measured in gpu_measurements(values).items():
                for key, family in GPU_GAUGES.items():
                    raw = measured.get(key)
                    value = float(raw) if isinstance(raw, bool) else _num(raw)  # lost/remap flags may be bools
                    if value is not None:
                        getattr(self.m, family).labels(node, gpu).set(value)
                        if key in GPU_FACTS:
                            durable.setdefault(gpu, {})[key] = value
                if "throttle_reasons" in measured:
                    for reason, active in throttle_flags(measured["throttle_reasons"]).items():
                        self.m.gpu_throttle.labels(node, gpu, reason).set(active)
        self.m.node_severity.labels(node).set(worst)
        self.facts.on_health(verdict, durable, report.ts)

    def set_goodput(self, report: GoodputReport) -> None:
        node = self.node
        self.m.goodput_ratio.labels(node).set(report.ratio)
        self.m.productive.labels(node).set(report.productive_seconds)
        self.m.wall.labels(node).set(report.wall_seconds)
        for category in BADPUT_CATEGORIES:
            self.m.badput.labels(node, category).set(report.badput_seconds.get(category, 0.0))
        self.m.ckpt_failures.set(node, report.failed_saves)
        self.m.sdc_findings.set(node, report.sdc_findings)
        if report.last_checkpoint_ts is not None:
            # The ledger knows checkpoints committed before this supervisor started.
            with self._lock:
                if self._ckpt_ts is None or report.last_checkpoint_ts > self._ckpt_ts:
                    self._ckpt_ts = report.last_checkpoint_ts
                    self.m.ckpt_last_ts.labels(node).set(report.last_checkpoint_ts)
                    if report.last_checkpoint_step is not None:
                        self.m.ckpt_last_step.labels(node).set(report.last_checkpoint_step)
