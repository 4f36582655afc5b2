"""Checkpoint configuration."""

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

    def root(self, run_dir: Path) -> Path:
        """The checkpoint directory of a run in `run_dir`."""
        return self.dir or RunDir(run_dir).checkpoints
