"""How long before the end of an allocation Slurm must warn the job (the `--signal` lead time).

After the warning the job still has to: finish the step in flight (the stop is agreed at a step
boundary), wait for the previous asynchronous checkpoint to finish writing, write the final
checkpoint, tear down and requeue. docs/slurm.md explains the estimate.
"""

from __future__ import annotations

import math

from resilient.config import RunConfig
from resilient.core.errors import ConfigError
from resilient.planner import StateBytes
from trainer.flops import parameter_count
from trainer.megatron_lm.arguments import MegatronRun
from trainer.presets import Architecture

SLURM_MAX_SIGNAL_S = 65535
"""The longest lead time `sbatch --signal` takes."""


def _model(cfg: RunConfig) -> tuple[Architecture, bool, str]:
    """(the model the ranks train, whether its saves are asynchronous, where that was read): the config's
    own model, or for a Megatron-LM rank command its command line."""
    run = MegatronRun.of(cfg.supervisor.rank_command)
    if run is None:
        return cfg.model.architecture(), cfg.checkpoint.async_save, "the model section"
    arch, where = run.architecture()
    if arch is None:
        raise ConfigError(
            f"slurm.signal_seconds: cannot size the Megatron-LM run's checkpoints ({where}); set it, "
            "in seconds: the longest step + 2 x one node's checkpoint write + a margin"
        )
    return arch, run.has("--async-save"), where


def checkpoint_seconds(cfg: RunConfig) -> float:
    """Estimated time for one node to write its share of a full checkpoint (14 B per parameter)."""
    total = parameter_count(_model(cfg)[0]) * StateBytes().checkpoint
    return total / cfg.nodes / (cfg.slurm.storage_write_gbps_per_node * 1e9)


def signal_seconds(cfg: RunConfig) -> tuple[int, str]:
    """Seconds before the time limit to send the warning signal, and how they were chosen."""
    s = cfg.slurm
    if s.signal_seconds is not None:
        return s.signal_seconds, "slurm.signal_seconds set explicitly"
    _, asynchronous, where = _model(cfg)
    save = checkpoint_seconds(cfg)
    # Asynchronous saves: the one in flight and the final one both have to finish (2 x save).
    saves = 2 if asynchronous else 1
    needed = s.expected_step_seconds + saves * save + s.signal_margin_seconds
    reason = (
        f"step {s.expected_step_seconds:g}s + {saves} x checkpoint {save:.1f}s "
        f"(at {s.storage_write_gbps_per_node:g} GB/s per node; model {where}) + margin {s.signal_margin_seconds}s"
    )
    if not math.isfinite(needed):  # a bandwidth so small the save never ends: no lead time can cover it
        raise ConfigError(
            f"slurm.storage_write_gbps_per_node: {s.storage_write_gbps_per_node:g} GB/s makes the final "
            f"checkpoint's write endless; give the real bandwidth, or set slurm.signal_seconds"
        )
    return min(math.ceil(needed), SLURM_MAX_SIGNAL_S), reason
