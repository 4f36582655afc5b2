"""Progress of an exit-only rank: the newest complete checkpoint step in its checkpoint directory.

Both formats count: ours (`step_NNNNNNN/` with a completion marker) and Megatron-LM's
(`iter_NNNNNNN/` in any --ckpt-format, and the global non-persistent ones in `non_persistent/`:
a complete one newer than every persistent iteration is progress too).
"""

from __future__ import annotations

from pathlib import Path

from trainer.checkpoint import ondisk
from trainer.megatron_lm import checkpoints as megatron_lm


def progress_dir(configured: Path | None, checkpoint_dir: Path | None, run_dir: Path) -> Path:
    """`supervisor.progress_dir`, else `checkpoint.dir`, else RUN_DIR/checkpoints; relative to the run directory."""
    chosen = configured or checkpoint_dir or Path("checkpoints")
    return chosen if chosen.is_absolute() else run_dir / chosen


def newest_complete_step(root: Path) -> int | None:
    """The newest step (iteration) whose checkpoint is complete, or None (also when the directory
    cannot be read: the supervisor then sees no progress rather than failing)."""
    try:
        if megatron_lm.holds_checkpoints(root):
            return megatron_lm.newest_complete(root)
        committed = ondisk.committed_steps(root)
    except OSError:
        return None
    return committed[-1] if committed else None
