"""Checkpoint configuration."""

from pathlib import Path

from pydantic import Field, model_validator

from resilient.core.configbase import Section
from resilient.core.rundir import RunDir
from resilient.core.secret import RunKey
from trainer.checkpoint.memory import naming


class CheckpointConfig(Section):
    """When and how checkpoints are saved, kept, verified and loaded."""

    interval_steps: int = Field(50, ge=0)
    """Save every N steps (0: no step trigger)."""
    interval_minutes: float = Field(0.0, ge=0)
    """Also save when this many minutes passed since the last save (0: no time trigger)."""
    save_on_finish: bool = True
    """Save the final step, so the last state can be inspected, digested and continued."""
    async_save: bool = True
    """Write in the background (a thread of the rank at idle CPU priority); the loop blocks only while
    this rank's share is copied into host buffers kept from save to save (trainer/checkpoint/writer.py)."""
    keep_last: int = Field(3, ge=1)
    """Keep the newest K complete checkpoints."""
    keep_every: int = Field(0, ge=0)
    """Also keep every checkpoint whose step is a multiple of M, for rollback (0: none)."""
    verify_checksums: bool = True
    """On load, verify every file's checksum, not only its size (the ranks share the hashing)."""
    load_step: int | None = None
    """Resume from this step instead of the latest complete checkpoint."""
    dir: Path | None = None
    """Checkpoint directory (None: RUN_DIR/checkpoints)."""
    adaptive: bool = False
    """Let the trainer set each tier's step interval (`interval_steps` is the starting value) to Daly's
    optimum for the save's measured cost to the loop and the run's failure rate; every change goes to
    the ledger (`ckpt_interval`) and the `resilient_checkpoint_interval_steps` metric."""
    prior_mtbf_hours: float = Field(24.0, gt=0)
    """Adaptive interval: the mean time between failures assumed before the run has its own history
    (weighted as one failure; the run's observed failures and time take over as they accumulate)."""
    min_interval_steps: int = Field(1, ge=1)
    """Adaptive interval: never save more often than every N steps."""
    max_interval_steps: int = Field(10000, ge=1)
    """Adaptive interval: never save less often than every N steps."""
    cost_window_steps: int = Field(5, ge=1)
    """Adaptive interval: iterations, from the save's own on, whose extra wall time over the median
    iteration counts as the save's cost to the loop (at least these; more while the background write,
    which slows the steps after it, is still in flight)."""

    memory_interval_steps: int = Field(0, ge=0)
    """Snapshot the full training state into host shared memory every N steps, replicated to a rank on
    the next node; a restart takes the newest step every rank has in memory when it is newer than disk
    (0: memory tier off)."""
    memory_keep_last: int = Field(2, ge=1)
    """Keep the newest K committed memory snapshots per tier (own, and each replica held)."""
    memory_dir: Path | None = None
    """Root of the memory tier (None: /dev/shm/resilient-<name>, the name derived from the run's secret and
    its directory). One that is not this user's own falls back to disk with a warning (a configured one
    whose path others own or can write is refused at start, as the run and checkpoint directories are)."""

    @model_validator(mode="after")
    def _adaptive_bounds(self) -> "CheckpointConfig":
        if self.min_interval_steps > self.max_interval_steps:
            raise ValueError(
                f"min_interval_steps {self.min_interval_steps} exceeds max_interval_steps {self.max_interval_steps}"
            )
        if self.adaptive and not self.interval_steps:
            raise ValueError("adaptive needs interval_steps > 0 as the starting interval (saves are what it measures)")
        return self

    def memory_root(self, run_dir: Path, key: RunKey) -> Path:
        """The memory tier's directory of the run of `key` in `run_dir` (shared by the nodes' subdirectories)."""
        return self.memory_dir if self.memory_dir is not None else naming.default_root(run_dir, key)

    def root(self, run_dir: Path) -> Path:
        """The checkpoint directory of a run in `run_dir`."""
        return self.dir or RunDir(run_dir).checkpoints
