"""How long before the end of an allocation Slurm must warn the job (the `--signal` lead time).

After the warning the job still has to: finish the step in flight (the stop is agreed at a step
boundary), wait for the previous asynchronous checkpoint to finish writing, write the final
checkpoint, tear down and requeue. docs/slurm.md explains the estimate.
"""

from __future__ import annotations

import math

from resilient.config import RunConfig
from resilient.planner import StateBytes
from trainer.flops import parameter_count


def checkpoint_seconds(cfg: RunConfig) -> float:
    """Estimated time for one node to write its share of a full checkpoint (14 B per parameter)."""
    total = parameter_count(cfg.model.architecture()) * StateBytes().checkpoint
    return total / cfg.nodes / (cfg.slurm.storage_write_gbps_per_node * 1e9)


def signal_seconds(cfg: RunConfig) -> tuple[int, str]:
    """Seconds before the time limit to send the warning signal, and how they were chosen."""
    s = cfg.slurm
    if s.signal_seconds is not None:
        return s.signal_seconds, "slurm.signal_seconds set explicitly"
    save = checkpoint_seconds(cfg)
    # The in-flight async save and the final save both have to finish: 2 x save.
    seconds = math.ceil(s.expected_step_seconds + 2 * save + s.signal_margin_seconds)
    reason = (
        f"step {s.expected_step_seconds:g}s + 2 x checkpoint {save:.1f}s "
        f"(at {s.storage_write_gbps_per_node:g} GB/s per node) + margin {s.signal_margin_seconds}s"
    )
    return min(seconds, 65535), reason
