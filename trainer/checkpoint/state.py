"""What a checkpoint holds, as megatron sharded state dicts, and how it is put back.

Model and Adam moments are ShardedTensors (resharded by dist_checkpointing on load); every
rank's RNG states are one row of a [world_size, n] ShardedTensor (restored when the world
size is unchanged); step, consumed samples, scheduler and data-loader position are common
state written once by rank 0 (plain Python values, loadable with torch.load(weights_only=True)).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from megatron.core.dist_checkpointing import ShardedTensor
from megatron.core.dist_checkpointing.optimizer import (
    get_param_id_to_sharded_param_map,
    optim_state_to_sharding_state,
)
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
from megatron.core.tensor_parallel.random import get_cuda_rng_tracker


@dataclass
class TrainState:
    """Everything a bit-identical continuation needs, by reference."""

    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: OptimizerParamScheduler
    loader: Any
    step: int = 0
    consumed_samples: int = 0
    consumed_tokens: int = 0
    identity: dict[str, Any] = field(default_factory=dict)


def init_optimizer_state(optimizer: torch.optim.Optimizer) -> None:
    """Create Adam's moments up front, so a fresh and a resumed run have the same state layout."""
    for group in optimizer.param_groups:
        for p in group["params"]:
            if not optimizer.state[p]:
                optimizer.state[p] = {
                    "step": torch.zeros((), dtype=torch.float32),
                    "exp_avg": torch.zeros_like(p, memory_format=torch.preserve_format),
                    "exp_avg_sq": torch.zeros_like(p, memory_format=torch.preserve_format),
                }


def _optimizer_params(optimizer: torch.optim.Optimizer) -> list[torch.nn.Parameter]:
    return [p for group in optimizer.param_groups for p in group["params"]]


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


def sharded_state(state: TrainState, *, include_rng: bool) -> dict[str, Any]:
    """The sharded state dict to save, or to load into (same structure both ways)."""
    model_sd = state.model.sharded_state_dict()
    optim_sd = state.optimizer.state_dict()
    id_map = get_param_id_to_sharded_param_map(model_sd, _optimizer_params(state.optimizer))
    optim_state_to_sharding_state(optim_sd, id_map, exclude_keys=("step",))
    tree: dict[str, Any] = {"model": model_sd, "optimizer": {"state": optim_sd["state"]}}
    if include_rng:
        rank, world = dist.get_rank(), dist.get_world_size()
        tree["rng"] = {
            key: ShardedTensor.from_rank_offsets(f"rng.{key}", row.unsqueeze(0), (0, rank, world), replica_id=0)
            for key, row in _rng_rows().items()
        }
    tree["common"] = common_state(state)
    return tree


def common_state(state: TrainState) -> dict[str, Any]:
    first = next(iter(state.optimizer.state.values()), {})
    return {
        "step": state.step,
        "consumed_samples": state.consumed_samples,
        "consumed_tokens": state.consumed_tokens,
        "adam_step": float(first.get("step", torch.zeros(())).item()),
        "scheduler": state.scheduler.state_dict(),
        "loader": state.loader.state_dict(),
        "identity": state.identity,
        "world_size": dist.get_world_size(),
    }


def apply_loaded(state: TrainState, loaded: dict[str, Any]) -> None:
    """Copy a loaded tree (plain tensors in place of ShardedTensors) into the live objects."""
    state.model.load_state_dict(loaded["model"], strict=True)
    params = _optimizer_params(state.optimizer)
    common = loaded["common"]
    for idx, moments in loaded["optimizer"]["state"].items():
        target = state.optimizer.state[params[int(idx)]]
        for key, value in moments.items():
            target[key].copy_(value)
        target["step"].fill_(common["adam_step"])
    state.scheduler.load_state_dict(common["scheduler"])
    state.loader.load_state_dict(common["loader"])
    state.step = int(common["step"])
    state.consumed_samples = int(common["consumed_samples"])
    state.consumed_tokens = int(common["consumed_tokens"])
    if "rng" in loaded:
        _set_rng_rows({key: value.reshape(-1) for key, value in loaded["rng"].items()})
