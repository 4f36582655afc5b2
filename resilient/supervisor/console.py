"""The operator's console line: rank 0's numbers every `train.log_every` steps (rank 0 lives on node 0)."""

from __future__ import annotations

from typing import Any

from resilient.rank.heartbeat import Phase
from trainer.config import TrainConfig


def progress_line(hb: dict[str, Any], train: TrainConfig) -> str | None:
    """The line to print for this heartbeat, or None."""
    if hb.get("rank") != 0 or hb.get("phase") != Phase.STEP or "loss" not in hb:
        return None
    step, total = hb["step"], train.steps
    if step % train.log_every and step != total:
        return None
    return (
        f"resilient: step {step}/{total} loss {hb['loss']:.4f} {hb.get('tokens_per_s', 0):,.0f} tok/s "
        f"step {hb.get('step_time', 0):.3f}s mfu {100 * hb.get('mfu', 0):.1f}%"
    )
