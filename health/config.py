"""Health-check configuration (owned by the health package)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from resilient.core.configbase import Section

# Application-caused XIDs (illegal address, MMU fault from user code, reset channel, preemption cleanup,
# video decoder, ECC-contained kill of another context): they do not mean the GPU is broken.
DEFAULT_XID_IGNORE = [13, 31, 43, 45, 68, 109]


class HealthConfig(Section):
    """What the health checks expect and how strict they are."""

    enabled: bool = True
    """Run pre-flight checks before each attempt and periodic checks during training."""
    fake_nvml_dir: Path | None = None
    """Read scripted GPU states from <dir>/<node>.json instead of NVML (tests, chaos drills)."""
    gpus_per_node: int | None = Field(None, ge=0)
    """Expected GPU count on each node (None: do not check; when set, a node without NVML is fatal)."""
    xid_ignore: list[int] = Field(default_factory=lambda: list(DEFAULT_XID_IGNORE))
    """XID codes caused by applications rather than hardware; all other XIDs are fatal."""
    throttle_severity: Literal["warn", "fatal"] = "warn"
    """Severity of HW slowdown, HW thermal and HW power-brake clock throttling."""
    temp_warn_c: int = 85
    """GPU temperature (Celsius) at or above which the node gets a warning."""
    temp_fatal_c: int = 95
    """GPU temperature (Celsius) at or above which the node is unhealthy."""
    pcie_replay_growth_warn: int = Field(8, ge=1)
    """PCIe replay counter growth between two samples that gives a warning."""
    pcie_replay_growth_fatal: int = Field(1000, ge=1)
    """PCIe replay counter growth between two samples that makes the node unhealthy."""
    nvlink_error_growth_warn: int = Field(1, ge=1)
    """NVLink error counter growth (all links and counters) between two samples that gives a warning."""
    nvlink_error_growth_fatal: int = Field(100, ge=1)
    """NVLink error counter growth between two samples that makes the node unhealthy."""
    event_timeout_ms: int = Field(100, ge=0)
    """How long one poll for NVML XID events waits (short: the monitor must never block)."""
    monitor_interval_s: float = Field(30.0, gt=0)
    """Seconds between periodic checks during training."""
    ckpt_min_free_gib: float = Field(1.0, ge=0)
    """Free space (GiB) the checkpoint directory needs; less is fatal."""
    write_test_bytes: int = Field(1 << 20, ge=1)
    """Bytes written and fsynced to the checkpoint directory by the write test."""
    mem_min_available_gib: float = Field(1.0, ge=0)
    """Available host memory (GiB) below which the node is unhealthy."""
    shm_min_gib: float = Field(1.0, ge=0)
    """Size (GiB) of /dev/shm below which the node is unhealthy (NCCL and loaders need it)."""
    shm_path: Path = Path("/dev/shm")
    """Shared-memory mount checked by the /dev/shm rule."""
    preflight_collective: bool = False
    """Also run the collective probe over this node's ranks in the supervisor's pre-flight (a few seconds
    per start; catches a bad link or NCCL before training and feeds the bus-bandwidth metric)."""
    collective_nbytes: int = Field(32 << 20, ge=4)
    """Bytes per all-reduce in the collective probe."""
    collective_iters: int = Field(5, ge=1)
    """Timed all-reduce iterations in the collective probe (after one warm-up)."""
    collective_timeout_s: float = Field(60.0, gt=0)
    """Seconds any one probe operation (join, all-reduce, pair test) may take before it fails."""
    collective_min_busbw_gbps: float = Field(0.0, ge=0)
    """Bus bandwidth (GB/s) below which the probe is slow and runs pair tests (0: no threshold)."""
    collective_late_s: float = Field(0.25, gt=0)
    """A rank arriving this many seconds later than the others at each all-reduce is named."""
    collective_slow_severity: Literal["warn", "fatal"] = "warn"
    """Severity of a probe that completed but was slow or had a late rank."""
    straggler_window: int = Field(10, ge=1)
    """Step times per rank in one straggler window."""
    straggler_threshold: float = Field(1.2, gt=1.0)
    """A rank whose median step time exceeds this multiple of all ranks' median is slow in a window."""
    straggler_windows: int = Field(3, ge=1)
    """Consecutive slow windows that make a rank a persistent straggler."""
    straggler_action: Literal["record", "exclude"] = "record"
    """What to do with a persistent straggler: record it, or also exclude its node on the next requeue."""

    @model_validator(mode="after")
    def _ordered(self) -> HealthConfig:
        if self.temp_warn_c > self.temp_fatal_c:
            raise ValueError(f"temp_warn_c {self.temp_warn_c} exceeds temp_fatal_c {self.temp_fatal_c}")
        if self.pcie_replay_growth_warn > self.pcie_replay_growth_fatal:
            raise ValueError("pcie_replay_growth_warn exceeds pcie_replay_growth_fatal")
        if self.nvlink_error_growth_warn > self.nvlink_error_growth_fatal:
            raise ValueError("nvlink_error_growth_warn exceeds nvlink_error_growth_fatal")
        return self
