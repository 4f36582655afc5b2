"""What a checkpoint holds, as megatron sharded state dicts, and how it is put back.

Model chunks and the megatron optimizer's state are ShardedTensors keyed by global parameter
names (resharded by dist_checkpointing on load when TP/PP/DP change); the distributed optimizer
saves its fp32 main parameters and moments in the same per-parameter form (OPTIMIZER_SHARDING). Every
rank's RNG states are one row of a [world_size, n] ShardedTensor (restored when the world size is
unchanged); step, consumed samples, scheduler and data-loader position are common state written once by
rank 0 (plain Python values, loadable with torch.load(weights_only=True)).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from megatron.core.dist_checkpointing import ShardedTensor
from megatron.core.optimizer import DistributedOptimizer, MegatronOptimizer
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

from trainer.model import unwrap

# 'fully_sharded_model_space' would save each rank's flat slice without gathering, but megatron-core
# 0.16.1's dist_checkpointing refuses its flattened ShardedTensors; 'fully_reshardable' gathers the
# distributed optimizer's shards per data-parallel group and saves per-parameter tensors, which
# reshard on load to any TP/PP/DP layout.
OPTIMIZER_SHARDING = {"distrib_optim_sharding_type": "fully_reshardable"}


@dataclass
class TrainState:
    """Everything a bit-identical continuation needs, by reference."""

    chunks: list[torch.nn.Module]
    optimizer: MegatronOptimizer
    scheduler: OptimizerParamScheduler
    loader: Any
    step: int = 0
    consumed_samples: int = 0
    consumed_tokens: int = 0
    identity: dict[str, Any] = field(default_factory=dict)


def _rng_rows() -> dict[str, torch.Tensor]:
    """This rank's generator states as uint8 tensors (CPU, CUDA if present, megatron's tracker)."""
    rows = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        rows["cuda"] = torch.cuda.get_rng_state()
    for name, state in sorted(get_cuda_rng_tracker().get_states().items()):
        rows[f"tracker.{name}"] = state if isinstance(state, torch.Tensor) else torch.as_tensor(state)
    return {k: v.to(torch.uint8).cpu() for k, v in rows.items()}


def _set_rng_rows(rows: dict[str, torch.Tensor]) -> None:
    torch.set_rng_state(rows["cpu"])
    if torch.cuda.is_available() and "cuda" in rows:
        torch.cuda.set_rng_state(rows["cuda"])
    tracker = get_cuda_rng_tracker()
    states = tracker.get_states()
    for key, value in rows.items():
        if key.startswith("tracker."):
            states[key.removeprefix("tracker.")] = value.clone()
    tracker.set_states(states)


def sharded_state(state: TrainState, *, include_rng: bool, is_loading: bool = False) -> dict[str, Any]:
    """The sharded state dict to save, or to load into (same structure both ways)."""
    model_sd = {f"chunk{i}": unwrap(chunk).sharded_state_dict() for i, chunk in enumerate(state.chunks)}
    tree: dict[str, Any] = {
        "model": model_sd,
        "optimizer": state.optimizer.sharded_state_dict(model_sd, is_loading=is_loading, metadata=OPTIMIZER_SHARDING),
    }
    if include_rng:
        rank, world = dist.get_rank(), dist.get_world_size()
        tree["rng"] = {
            key: ShardedTensor.from_rank_offsets(f"rng.{key}", row.unsqueeze(0), (0, rank, world), replica_id=0)
            for key, row in _rng_rows().items()
        }
    tree["common"] = common_state(state)
    return tree


def common_state(state: TrainState) -> dict[str, Any]:
    return {
        "step": state.step,
        "consumed_samples": state.consumed_samples,
        "consumed_tokens": state.consumed_tokens,
        "scheduler": state.scheduler.state_dict(),
        "loader": state.loader.state_dict(),
        "identity": state.identity,
        "world_size": dist.get_world_size(),
    }


def _load_optimizer(optimizer: MegatronOptimizer, loaded: dict[str, Any]) -> None:
    """megatron's load, with one repair for its distributed optimizer over plain torch Adam (no
    TE/apex, as on CPU): it puts one shared `step` tensor into every parameter's state (torch would
    then add 1 per parameter each step) and then copies per-parameter tensors into every state key,
    `step` included, which the checkpoint does not carry. The steps are taken out right after the
    inner load and put back, one tensor each, when megatron is done."""
    steps: dict[torch.Tensor, torch.Tensor] = {}

    def take_steps(inner: torch.optim.Optimizer) -> None:
        for param, st in inner.state.items():
            if "step" in st:
                steps[param] = st.pop("step").detach().clone()

    inners = [
        o.optimizer
        for o in getattr(optimizer, "chained_optimizers", [optimizer])
        if isinstance(o, DistributedOptimizer) and isinstance(o.optimizer, torch.optim.Adam | torch.optim.AdamW)
    ]
    hooks = [inner.register_load_state_dict_post_hook(take_steps) for inner in inners]
    try:
        optimizer.load_state_dict(loaded)
    finally:
        for hook in hooks:
            hook.remove()
        for inner in inners:
            for param, step in steps.items():
                if param in inner.state:
                    inner.state[param]["step"] = step


def apply_loaded(state: TrainState, loaded: dict[str, Any]) -> None:
    """Copy a loaded tree (plain tensors in place of ShardedTensors) into the live objects."""
    for i, chunk in enumerate(state.chunks):
        unwrap(chunk).load_state_dict(loaded["model"][f"chunk{i}"], strict=True)
    _load_optimizer(state.optimizer, loaded["optimizer"])
    common = loaded["common"]
    state.scheduler.load_state_dict(common["scheduler"])
    state.loader.load_state_dict(common["loader"])
    state.step = int(common["step"])
    state.consumed_samples = int(common["consumed_samples"])
    state.consumed_tokens = int(common["consumed_tokens"])
    if "rng" in loaded:
        _set_rng_rows({key: value.reshape(-1) for key, value in loaded["rng"].items()})
