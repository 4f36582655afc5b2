"""Every Prometheus metric family the supervisor exports, defined once on a dedicated registry.

Conventions (Prometheus naming): prefix `resilient_`, counters end in `_total`, durations in
`_seconds`, sizes in `_bytes`. Labels are bounded: node, rank, gpu, kind, check, reason, tier,
category, state; never a step number. Run-level values (loss, tokens/s, ...) carry only `node`:
every node reports the same run, so dashboards aggregate them with `max`.
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily
from prometheus_client.registry import Collector

STEP_TIME_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 15, 30, 60, 120, float("inf"))
CKPT_BUCKETS = (0.1, 0.5, 1, 2, 5, 10, 30, 60, 120, 300, 600, 1800, float("inf"))

THROTTLE_REASONS = {
    # NVML clocksThrottleReasons bits that mean the GPU runs slower than asked.
    "sw_power_cap": 0x4,
    "hw_slowdown": 0x8,
    "sw_thermal": 0x20,
    "hw_thermal": 0x40,
    "hw_power_brake": 0x80,
}


class LedgerCounter(Collector):
    """A `node`-labelled counter whose cumulative value is read from the ledger, not incremented here.

    It appears with its run-wide value once known, so `increase()` does not mistake a supervisor
    restart for new events.
    """

    def __init__(self, name: str, documentation: str, registry: CollectorRegistry) -> None:
        self._name, self._doc = name, documentation
        self._values: dict[str, float] = {}
        registry.register(self)

    def set(self, node: str, value: float) -> None:
        self._values[node] = value

    def describe(self) -> list[CounterMetricFamily]:
        return [CounterMetricFamily(self._name, self._doc, labels=("node",))]

    def collect(self) -> Iterator[CounterMetricFamily]:
        family = CounterMetricFamily(self._name, self._doc, labels=("node",))
        for node, value in self._values.items():
            family.add_metric((node,), value)
        yield family


class Catalog:
    """The metric families of one node's exporter, registered on `registry`."""

    def __init__(self, registry: CollectorRegistry) -> None:
        r = registry
        n = ("node",)
        # Run progress.
        self.run_state = Gauge(
            "resilient_run_state", "1 for the supervisor's current state, 0 for the others", n + ("state",), registry=r
        )
        self.attempt = Gauge("resilient_attempt", "In-job attempt number (0-based)", n, registry=r)
        self.step = Gauge("resilient_step", "Latest optimizer step reported by this node's ranks", n, registry=r)
        self.consumed_tokens = Gauge(
            "resilient_consumed_tokens", "Training tokens consumed by the run so far", n, registry=r
        )
        self.loss = Gauge("resilient_loss", "Training loss of the latest step", n, registry=r)
        self.loss_nonfinite_ts = Gauge(
            "resilient_loss_nonfinite_timestamp_seconds",
            "Unix time of the latest step whose loss was NaN or infinite",
            n,
            registry=r,
        )
        self.validation_loss = Gauge("resilient_validation_loss", "Latest validation loss (nats)", n, registry=r)
        self.learning_rate = Gauge("resilient_learning_rate", "Learning rate of the latest step", n, registry=r)
        self.grad_norm = Gauge("resilient_grad_norm", "Global gradient norm of the latest step", n, registry=r)
        self.tokens_per_second = Gauge(
            "resilient_tokens_per_second", "Run throughput in tokens per second", n, registry=r
        )
        self.mfu = Gauge("resilient_mfu_ratio", "Model FLOPs utilisation (0..1)", n, registry=r)
        self.step_time = Histogram(
            "resilient_step_time_seconds",
            "Optimizer step time, one observation per rank per step",
            n,
            buckets=STEP_TIME_BUCKETS,
            registry=r,
        )
        # Per rank.
        nr = ("node", "rank")
        self.rank_step = Gauge("resilient_rank_step", "Latest step reported by the rank", nr, registry=r)
        self.rank_step_time = Gauge("resilient_rank_step_time_seconds", "The rank's latest step time", nr, registry=r)
        self.heartbeat_age = Gauge(
            "resilient_heartbeat_age_seconds", "Seconds since the rank's last heartbeat", nr, registry=r
        )
        self.heartbeat_age_limit = Gauge(
            "resilient_heartbeat_age_limit_seconds",
            "Heartbeat age above which the RankHeartbeatStale alert fires",
            n,
            registry=r,
        )
        self.straggler_score = Gauge(
            "resilient_straggler_score", "Rank step time over the run's median (1 = typical)", nr, registry=r
        )
        # Checkpoints.
        self.ckpt_blocking = Histogram(
            "resilient_checkpoint_save_blocking_seconds",
            "Time the training loop was blocked by a checkpoint save",
            n,
            buckets=CKPT_BUCKETS,
            registry=r,
        )
        self.ckpt_total = Histogram(
            "resilient_checkpoint_save_total_seconds",
            "Time from save start to the checkpoint being complete",
            n,
            buckets=CKPT_BUCKETS,
            registry=r,
        )
        self.ckpt_size = Gauge(
            "resilient_checkpoint_size_bytes", "Size of the latest complete checkpoint", n, registry=r
        )
        self.ckpt_written = Counter(
            "resilient_checkpoint_written_bytes", "Bytes of complete checkpoints written", n, registry=r
        )
        self.ckpt_last_step = Gauge(
            "resilient_checkpoint_last_step", "Step of the latest complete checkpoint", n, registry=r
        )
        self.ckpt_last_ts = Gauge(
            "resilient_checkpoint_last_complete_timestamp_seconds",
            "Unix time the latest complete checkpoint was committed",
            n,
            registry=r,
        )
        self.ckpt_age = Gauge(
            "resilient_checkpoint_last_complete_age_seconds",
            "Seconds since the latest complete checkpoint was committed",
            n,
            registry=r,
        )
        self.ckpt_interval = Gauge(
            "resilient_checkpoint_interval_steps",
            "Steps between saves of a checkpoint "
            "tier as the trainer uses them now (checkpoint.adaptive: Daly's optimum)",
            n + ("tier",),
            registry=r,
        )
        self.ckpt_age_limit = Gauge(
            "resilient_checkpoint_age_limit_seconds",
            "Checkpoint age above which the CheckpointTooOld alert fires",
            n,
            registry=r,
        )
        # Failures and restarts (this supervisor's lifetime; the ledger keeps the whole run).
        self.spares = Gauge("resilient_spares", "Warm standby rank processes parked on the node", n, registry=r)
        self.spares_rss = Gauge(
            "resilient_spares_rss_bytes", "Resident memory of the node's parked spares", n, registry=r
        )
        self.restarts = Counter("resilient_restarts", "In-job restarts of all ranks", n, registry=r)
        # Spare nodes (exported by the coordinating supervisor: a fact of the whole allocation).
        self.spare_nodes = Gauge(
            "resilient_spare_nodes_available",
            "Healthy spare nodes ready to replace a failed node in-job",
            n,
            registry=r,
        )
        self.spare_nodes_configured = Gauge(
            "resilient_spare_nodes_configured",
            "Spare nodes the allocation started with (slurm.spare_nodes)",
            n,
            registry=r,
        )
        self.bad_nodes = Gauge(
            "resilient_bad_nodes", "Nodes taken out of the run in this allocation (unhealthy, lost)", n, registry=r
        )
        self.node_replacements = Counter(
            "resilient_node_replacements", "Failed nodes replaced in-job by a spare", n, registry=r
        )
        self.failures = Counter("resilient_failures", "Detected failures by kind", n + ("kind",), registry=r)
        self.storage_faults = Counter(
            "resilient_storage_faults",
            "Checkpoint storage low, full or failing, or a "
            "final step left uncommitted (never counted as a node failure)",
            n,
            registry=r,
        )
        # Health.
        ng = ("node", "gpu")
        self.gpu_temperature = Gauge("resilient_gpu_temperature_celsius", "GPU core temperature", ng, registry=r)
        self.gpu_power = Gauge("resilient_gpu_power_watts", "GPU power draw", ng, registry=r)
        self.gpu_ecc_uncorrectable = Gauge(
            "resilient_gpu_ecc_uncorrectable_errors", "Uncorrectable ECC errors since the driver loaded", ng, registry=r
        )
        self.gpu_last_xid = Gauge("resilient_gpu_last_xid", "Latest XID error code seen (0: none)", ng, registry=r)
        self.gpu_remap_pending = Gauge(
            "resilient_gpu_row_remap_pending", "1 if a row remap awaits a GPU reset", ng, registry=r
        )
        self.gpu_remap_failed = Gauge("resilient_gpu_row_remap_failed", "1 if a row remap failed", ng, registry=r)
        self.gpu_throttle = Gauge(
            "resilient_gpu_throttle_active", "1 while the GPU is throttled for `reason`", ng + ("reason",), registry=r
        )
        self.gpu_lost = Gauge("resilient_gpu_lost", "1 if the GPU fell off the bus or NVML lost it", ng, registry=r)
        self.check_severity = Gauge(
            "resilient_health_check_severity",
            "Health check severity (0 ok, 1 warn, 2 fatal)",
            n + ("check",),
            registry=r,
        )
        self.node_severity = Gauge(
            "resilient_node_health_severity", "Worst health check severity of the node", n, registry=r
        )
        self.bus_bandwidth = Gauge(
            "resilient_collective_bus_bandwidth_bytes_per_second",
            "Bus bandwidth measured by the collective probe",
            n,
            registry=r,
        )
        # Goodput (from the ledger and train log).
        self.goodput_ratio = Gauge(
            "resilient_goodput_ratio", "Productive training time over wall time since the run began", n, registry=r
        )
        self.productive = Gauge(
            "resilient_productive_seconds", "Productive training time since the run began", n, registry=r
        )
        self.wall = Gauge("resilient_run_wall_seconds", "Wall time since the run began", n, registry=r)
        self.badput = Gauge(
            "resilient_badput_seconds", "Non-productive time by category", n + ("category",), registry=r
        )
        self.ckpt_failures = LedgerCounter(
            "resilient_checkpoint_save_failures",
            "Failed checkpoint saves in the run (counted from the ledger, so it survives supervisor restarts)",
            registry=r,
        )
        # Numerical trust.
        self.sdc_findings = LedgerCounter(
            "resilient_sdc_findings",
            "Silent data corruption findings that named a rank and its node in the run (sdc_confirmed in the ledger)",
            registry=r,
        )

    RANK_FAMILIES = ("rank_step", "rank_step_time", "heartbeat_age", "straggler_score")
    """Per-rank families, cleared when ranks are respawned so dead ranks leave no stale series."""
