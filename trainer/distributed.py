"""Process-group and megatron parallel_state setup for one rank, from torchrun-style env."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

from trainer.cpu_bridge import install_cpu_bridge
from trainer.model import Layout


@dataclass(frozen=True)
class RankEnv:
    """Who this rank is, as the supervisor (or torchrun) describes it in the environment."""

    rank: int
    local_rank: int
    world_size: int
    local_world_size: int
    attempt: int
    node_rank: int
    node_name: str

    @classmethod
    def from_environ(cls) -> "RankEnv":
        env = os.environ
        return cls(
            rank=int(env.get("RANK", "0")),
            local_rank=int(env.get("LOCAL_RANK", "0")),
            world_size=int(env.get("WORLD_SIZE", "1")),
            local_world_size=int(env.get("LOCAL_WORLD_SIZE", env.get("WORLD_SIZE", "1"))),
            attempt=int(env.get("RESILIENT_ATTEMPT", "0")),
            node_rank=int(env.get("RESILIENT_NODE_RANK", env.get("GROUP_RANK", "0"))),
            node_name=env.get("RESILIENT_NODE_NAME", os.uname().nodename),
        )


def run_dir_from_environ(default: Path) -> Path:
    """The run directory the supervisor assigned, else the config's."""
    return Path(os.environ.get("RESILIENT_RUN_DIR", default))


def init_distributed(env: RankEnv, layout: Layout, *, timeout_s: float) -> torch.device:
    """Join the job's process group (NCCL on GPU, gloo on CPU) and build megatron's groups, all with
    the configured collective timeout."""
    if torch.cuda.is_available():
        torch.cuda.set_device(env.local_rank)
        device, backend = torch.device("cuda", env.local_rank), "nccl"
    else:
        install_cpu_bridge()
        device, backend = torch.device("cpu"), "gloo"
    if not dist.is_initialized():
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", "29500")
        dist.init_process_group(backend, rank=env.rank, world_size=env.world_size,
                                timeout=timedelta(seconds=timeout_s))
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=layout.tp, pipeline_model_parallel_size=layout.pp,
        virtual_pipeline_model_parallel_size=layout.vpp, context_parallel_size=layout.cp,
        distributed_timeout_minutes=max(1, math.ceil(timeout_s / 60)),
    )
    return device


def seed_all(seed: int) -> None:
    """Same CPU stream on every rank (CPU-initialized weights are then TP-invariant) and megatron's
    named streams (data-parallel, tensor-parallel) as megatron seeds them."""
    torch.manual_seed(seed)
    model_parallel_cuda_manual_seed(seed)


def shutdown() -> None:
    """Leave the process group cleanly."""
    if dist.is_initialized():
        parallel_state.destroy_model_parallel()
        dist.destroy_process_group()
