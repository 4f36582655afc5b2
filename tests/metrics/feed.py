"""A supervisor stand-in for the tests: drives NodeMetrics with contract-shaped heartbeats, health and goodput."""

from __future__ import annotations

import threading
import time

from health.actions import decide_health
from health.types import CheckResult, HealthReport, Severity
from resilient.goodput import compute_goodput
from resilient.metrics.exporter import NodeMetrics

NODE = "node0"
RANKS = (0, 1)


def heartbeat(rank: int, step: int, **extra) -> dict:
    """A step heartbeat with the contract's fields, as a rank sends it."""
    return {
        "phase": "step",
        "step": step,
        "rank": rank,
        "local_rank": rank,
        "pid": 1000 + rank,
        "attempt": 0,
        "loss": 4.0 - step * 0.001,
        "lr": 3e-3,
        "grad_norm": 1.5,
        "step_time": 0.4 + 0.1 * rank,
        "tokens": step * 8192,
        "tokens_per_s": 20480.0,
        "mfu": 0.41,
        "consumed_samples": step * 8,
        **extra,
    }


def health_report() -> HealthReport:
    gpus = {
        str(i): {
            "temperature_c": 60 + i,
            "power_w": 350.0,
            "ecc_uncorrectable": 0,
            "last_xid": 0,
            "remap_pending": False,
            "remap_failed": False,
            "lost": False,
            "throttle_reasons": 0,
        }
        for i in range(2)
    }
    gpus["1"].update(temperature_c=91, throttle_reasons=0x40, last_xid=79)
    return HealthReport(
        NODE,
        [
            CheckResult("gpu.state", Severity.FATAL, "gpu 1: XID 79", {"gpus": gpus}),
            CheckResult("node.collective", Severity.OK, "bus bandwidth ok", {"busbw_gbps": 180.0}),
            CheckResult("node.disk", Severity.WARN, "ckpt dir 91% full", {"used_ratio": 0.91}),
        ],
    )


def supervisor_ledger(now: float) -> list[dict]:
    return [
        {"ts": now - 100, "event": "run_start", "attempt": 0, "node": NODE},
        {"ts": now - 95, "event": "rank_init", "rank": 0, "attempt": 0, "seconds": 5.0},
        {
            "ts": now - 50,
            "event": "ckpt_save",
            "step": 20,
            "blocking_seconds": 1.0,
            "total_seconds": 3.0,
            "bytes": 1 << 20,
        },
        {"ts": now - 40, "event": "sdc_confirmed", "step": 25, "ranks": [1], "nodes": [NODE]},
    ]


class Feeder:
    """Calls NodeMetrics the way a supervisor does: heartbeats every `period` seconds, a checkpoint every 10 steps."""

    def __init__(self, metrics: NodeMetrics, period: float = 0.2) -> None:
        self.metrics, self.period, self.step = metrics, period, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def prime(self) -> None:
        m = self.metrics
        m.set_state("running", 0)
        m.on_failure("rank_exit")
        m.on_restart()
        m.on_roster(1, 0, 1)  # one spare node configured and ready
        m.on_replacement()
        m.on_roster(0, 1, 1)  # it replaced a failed node: none left, one node out
        report = health_report()
        m.on_health(report, decide_health(report, "training"))
        self.advance()

    def advance(self) -> None:
        self.step += 1
        ckpt = {}
        if self.step % 10 == 0:
            ckpt = {
                "ckpt_step": self.step,
                "ckpt_blocking_s": 0.3,
                "ckpt_total_s": 1.2,
                "ckpt_bytes": 1 << 20,
                "ckpt_intervals": {"disk": 10, "memory": 2},
            }  # an adaptive run's tiers
        for rank in RANKS:
            extra = {"val_loss": 3.9} if self.step % 5 == 0 else {}
            self.metrics.on_heartbeat(rank, rank, heartbeat(rank, self.step, **ckpt, **extra))
            self.metrics.heartbeat_age(rank, self.period)
        self.metrics.on_stragglers({0: 1.0, 1: 1.25})
        now = time.time()
        train_log = [{"ts": now, "attempt": 0, "step": s, "step_time": 0.4} for s in range(1, self.step + 1)]
        self.metrics.set_goodput(compute_goodput(supervisor_ledger(now), train_log, now))

    def _run(self) -> None:
        while not self._stop.wait(self.period):
            self.advance()

    def start(self) -> Feeder:
        self.prime()
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


# The dcgm-exporter fields the GPU dashboard and alerts read, with dcgm-exporter's labels.
DCGM_FIELDS = {
    "DCGM_FI_DEV_GPU_TEMP": 61.0,
    "DCGM_FI_DEV_POWER_USAGE": 350.0,
    "DCGM_FI_DEV_GPU_UTIL": 97.0,
    "DCGM_FI_DEV_FB_USED": 61000.0,
    "DCGM_FI_DEV_ECC_DBE_VOL_TOTAL": 0.0,
    "DCGM_FI_DEV_XID_ERRORS": 0.0,
    "DCGM_FI_DEV_ROW_REMAP_PENDING": 0.0,
    "DCGM_FI_DEV_ROW_REMAP_FAILURE": 0.0,
}
DCGM_COUNTERS = ("DCGM_FI_DEV_THERMAL_VIOLATION", "DCGM_FI_DEV_POWER_VIOLATION")  # microseconds, rising


class DcgmExporter:
    """A stand-in for NVIDIA's dcgm-exporter on this node: two healthy GPUs, throttled a little."""

    def __init__(self) -> None:
        from prometheus_client import CollectorRegistry, Gauge

        self.registry = CollectorRegistry()
        labels = ("gpu", "UUID", "device", "modelName", "Hostname")
        t0 = time.time()
        for name in (*DCGM_FIELDS, *DCGM_COUNTERS):
            gauge = Gauge(name, f"dcgm-exporter field {name}", labels, registry=self.registry)
            for gpu in ("0", "1"):
                child = gauge.labels(gpu, f"GPU-{gpu}", f"nvidia{gpu}", "NVIDIA H100 80GB HBM3", NODE)
                if name in DCGM_COUNTERS:
                    child.set_function(lambda: (time.time() - t0) * 1e5)  # throttled 10% of the time
                else:
                    child.set(DCGM_FIELDS[name])
        self.server = None

    def start(self) -> int:
        from prometheus_client import start_http_server

        self.server, _ = start_http_server(0, addr="127.0.0.1", registry=self.registry)
        return self.server.server_port

    def stop(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()
