"""Checkpoint configuration."""

import hashlib
from pathlib import Path

from pydantic import Field

from resilient.core.configbase import Section
from resilient.core.rundir import RunDir


class CheckpointConfig(Section):
    """When and how checkpoints are saved, kept, verified and loaded."""

    interval_steps: int = Field(50, ge=0)
    """Save every N steps (0: no step trigger)."""
    interval_minutes: float = Field(0.0, ge=0)
    """Also save when this many minutes passed since the last save (0: no time trigger)."""
    save_on_finish: bool = True
    """Save the final step, so the last state can be inspected, digested and continued."""
    async_save: bool = True
    """Write in the background; the loop blocks only while tensors are staged to host memory."""
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
    memory_interval_steps: int = Field(0, ge=0)
    """Snapshot the full training state into host shared memory every N steps, replicated to a rank on
    the next node; a restart takes the newest step every rank has in memory when it is newer than disk
    (0: memory tier off)."""
    memory_keep_last: int = Field(2, ge=1)
    """Keep the newest K committed memory snapshots per tier (own, and each replica held)."""
    memory_dir: Path | None = None
    """Root of the memory tier (None: /dev/shm/resilient-<run key>, the key derived from the run dir)."""

    def memory_root(self, run_dir: Path) -> Path:
        """The memory tier's directory of a run in `run_dir` (shared by the nodes' subdirectories)."""
        if self.memory_dir is not None:
            return self.memory_dir
        key = hashlib.sha256(str(Path(run_dir).resolve()).encode()).hexdigest()[:16]
        return Path("/dev/shm") / f"resilient-{key}"

    def root(self, run_dir: Path) -> Path:
        """The checkpoint directory of a run in `run_dir`."""
        return self.dir or RunDir(run_dir).checkpoints
