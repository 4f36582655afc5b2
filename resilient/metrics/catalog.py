"""Every Prometheus metric family the supervisor exports, defined once on a dedicated registry.

Conventions (Prometheus naming): prefix `resilient_`, counters end in `_total`, durations in
`_seconds`, sizes in `_bytes`. Labels are bounded: node, rank, gpu, kind, check, reason, tier,
category, state; never a step number. Run-level values (loss, tokens/s, ...) carry only `node`:
every node reports the same run, so dashboards aggregate them with `max`.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, Generic, TypeVar, overload

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


M = TypeVar("M", Gauge, Counter, Histogram)


class _Family(Generic[M]):
    """One metric family of the catalog: kind, name, help, labels after `node` and options (buckets).

    A class attribute of `Catalog`; each catalog makes the metric on its own registry as the instance attribute
    of the same name (typed by `__get__`).
    """

    def __init__(self, kind: type[M], name: str, doc: str, *labels: str, **options: Any) -> None:
        self.kind: type[M] = kind
        self.name, self.doc, self.labels, self.options = name, doc, ("node", *labels), options

    def __set_name__(self, owner: type, attr: str) -> None:
        self.attr = attr

    def make(self, registry: CollectorRegistry) -> M:
        return self.kind(self.name, self.doc, self.labels, registry=registry, **self.options)

    @overload
    def __get__(self, catalog: None, owner: type) -> _Family[M]: ...
    @overload
    def __get__(self, catalog: Catalog, owner: type) -> M: ...
    def __get__(self, catalog: Catalog | None, owner: type) -> _Family[M] | M:
        return self if catalog is None else catalog.__dict__[self.attr]


class Catalog:
    """The metric families of one node's exporter, registered on `registry`."""

    def __init__(self, registry: CollectorRegistry) -> None:
        # The families below in the order defined (the exposition's order), then the two read from the ledger.
        for attr, family in vars(Catalog).items():
            if isinstance(family, _Family):
                setattr(self, attr, family.make(registry))
        self.ckpt_failures = LedgerCounter(
            "resilient_checkpoint_save_failures",
            "Failed checkpoint saves in the run (counted from the ledger, so it survives supervisor restarts)",
            registry=registry,
        )
        # Numerical trust.
        self.sdc_findings = LedgerCounter(
            "resilient_sdc_findings",
            "Silent data corruption findings that named a rank and its node in the run (sdc_confirmed in the ledger)",
            registry=registry,
        )

    # Run progress.
    run_state = _Family(Gauge, "resilient_run_state", "1 for the supervisor's current state, 0 for the others", "state")
    attempt = _Family(Gauge, "resilient_attempt", "In-job attempt number (0-based)")
    step = _Family(Gauge, "resilient_step", "Latest optimizer step reported by this node's ranks")
    consumed_tokens = _Family(Gauge, "resilient_consumed_tokens", "Training tokens consumed by the run so far")
    loss = _Family(Gauge, "resilient_loss", "Training loss of the latest step")
    loss_nonfinite_ts = _Family(
        Gauge,
        "resilient_loss_nonfinite_timestamp_seconds",
        "Unix time of the latest step whose loss was NaN or infinite",
    )
    validation_loss = _Family(Gauge, "resilient_validation_loss", "Latest validation loss (nats)")
    learning_rate = _Family(Gauge, "resilient_learning_rate", "Learning rate of the latest step")
    grad_norm = _Family(Gauge, "resilient_grad_norm", "Global gradient norm of the latest step")
    tokens_per_second = _Family(Gauge, "resilient_tokens_per_second", "Run throughput in tokens per second")
    mfu = _Family(Gauge, "resilient_mfu_ratio", "Model FLOPs utilisation (0..1)")
    step_time = _Family(
        Histogram,
        "resilient_step_time_seconds",
        "Optimizer step time, one observation per rank per step",
        buckets=STEP_TIME_BUCKETS,
    )
    # Per rank.
    rank_step = _Family(Gauge, "resilient_rank_step", "Latest step reported by the rank", "rank")
    rank_step_time = _Family(Gauge, "resilient_rank_step_time_seconds", "The rank's latest step time", "rank")
    heartbeat_age = _Family(Gauge, "resilient_heartbeat_age_seconds", "Seconds since the rank's last heartbeat", "rank")
    heartbeat_age_limit = _Family(
        Gauge, "resilient_heartbeat_age_limit_seconds", "Heartbeat age above which the RankHeartbeatStale alert fires"
    )
    straggler_score = _Family(
        Gauge, "resilient_straggler_score", "Rank step time over the run's median (1 = typical)", "rank"
    )
    # Checkpoints.
    ckpt_blocking = _Family(
        Histogram,
        "resilient_checkpoint_save_blocking_seconds",
        "Time the training loop was blocked by a checkpoint save",
        buckets=CKPT_BUCKETS,
    )
    ckpt_total = _Family(
        Histogram,
        "resilient_checkpoint_save_total_seconds",
        "Time from save start to the checkpoint being complete",
        buckets=CKPT_BUCKETS,
    )
    ckpt_size = _Family(Gauge, "resilient_checkpoint_size_bytes", "Size of the latest complete checkpoint")
    ckpt_written = _Family(Counter, "resilient_checkpoint_written_bytes", "Bytes of complete checkpoints written")
    ckpt_last_step = _Family(Gauge, "resilient_checkpoint_last_step", "Step of the latest complete checkpoint")
    ckpt_last_ts = _Family(
        Gauge,
        "resilient_checkpoint_last_complete_timestamp_seconds",
        "Unix time the latest complete checkpoint was committed",
    )
    ckpt_age = _Family(
        Gauge,
        "resilient_checkpoint_last_complete_age_seconds",
        "Seconds since the latest complete checkpoint was committed",
    )
    ckpt_interval = _Family(
        Gauge,
        "resilient_checkpoint_interval_steps",
        "Steps between saves of a checkpoint tier as the trainer uses them now (checkpoint.adaptive: Daly's optimum)",
        "tier",
    )
    ckpt_age_limit = _Family(
        Gauge, "resilient_checkpoint_age_limit_seconds", "Checkpoint age above which the CheckpointTooOld alert fires"
    )
    # Failures and restarts (this supervisor's lifetime; the ledger keeps the whole run).
    spares = _Family(Gauge, "resilient_spares", "Warm standby rank processes parked on the node")
    spares_rss = _Family(Gauge, "resilient_spares_rss_bytes", "Resident memory of the node's parked spares")
    restarts = _Family(Counter, "resilient_restarts", "In-job restarts of all ranks")
    # Spare nodes (exported by the coordinating supervisor: a fact of the whole allocation).
    spare_nodes = _Family(
        Gauge, "resilient_spare_nodes_available", "Healthy spare nodes ready to replace a failed node in-job"
    )
    spare_nodes_configured = _Family(
        Gauge, "resilient_spare_nodes_configured", "Spare nodes the allocation started with (slurm.spare_nodes)"
    )
    bad_nodes = _Family(Gauge, "resilient_bad_nodes", "Nodes taken out of the run in this allocation (unhealthy, lost)")
    node_replacements = _Family(Counter, "resilient_node_replacements", "Failed nodes replaced in-job by a spare")
    failures = _Family(Counter, "resilient_failures", "Detected failures by kind", "kind")
    storage_faults = _Family(
        Counter,
        "resilient_storage_faults",
        "Checkpoint storage low, full or failing, or a final step left uncommitted (never counted as a node failure)",
    )
    # Health.
    gpu_temperature = _Family(Gauge, "resilient_gpu_temperature_celsius", "GPU core temperature", "gpu")
    gpu_power = _Family(Gauge, "resilient_gpu_power_watts", "GPU power draw", "gpu")
    gpu_ecc_uncorrectable = _Family(
        Gauge, "resilient_gpu_ecc_uncorrectable_errors", "Uncorrectable ECC errors since the driver loaded", "gpu"
    )
    gpu_last_xid = _Family(Gauge, "resilient_gpu_last_xid", "Latest XID error code seen (0: none)", "gpu")
    gpu_remap_pending = _Family(Gauge, "resilient_gpu_row_remap_pending", "1 if a row remap awaits a GPU reset", "gpu")
    gpu_remap_failed = _Family(Gauge, "resilient_gpu_row_remap_failed", "1 if a row remap failed", "gpu")
    gpu_throttle = _Family(
        Gauge, "resilient_gpu_throttle_active", "1 while the GPU is throttled for `reason`", "gpu", "reason"
    )
    gpu_lost = _Family(Gauge, "resilient_gpu_lost", "1 if the GPU fell off the bus or NVML lost it", "gpu")
    check_severity = _Family(
        Gauge, "resilient_health_check_severity", "Health check severity (0 ok, 1 warn, 2 fatal)", "check"
    )
    node_severity = _Family(Gauge, "resilient_node_health_severity", "Worst health check severity of the node")
    bus_bandwidth = _Family(
        Gauge, "resilient_collective_bus_bandwidth_bytes_per_second", "Bus bandwidth measured by the collective probe"
    )
    # Goodput (from the ledger and train log).
    goodput_ratio = _Family(
        Gauge, "resilient_goodput_ratio", "Productive training time over wall time since the run began"
    )
    productive = _Family(Gauge, "resilient_productive_seconds", "Productive training time since the run began")
    wall = _Family(Gauge, "resilient_run_wall_seconds", "Wall time since the run began")
    badput = _Family(Gauge, "resilient_badput_seconds", "Non-productive time by category", "category")

    RANK_FAMILIES = ("rank_step", "rank_step_time", "heartbeat_age", "straggler_score")
    """Per-rank families, cleared when ranks are respawned so dead ranks leave no stale series."""
