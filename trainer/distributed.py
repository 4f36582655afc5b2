"""Process-group and megatron parallel_state setup for one rank, from torchrun-style env."""

from __future__ import annotations

import math
from datetime import timedelta

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

from resilient.rank.env import RankEnv
from trainer.cpu_bridge import install_cpu_bridge
from trainer.model import Layout


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
        dist.init_process_group(backend, init_method=f"tcp://{env.master_addr}:{env.master_port}", rank=env.rank,
                                world_size=env.world_size, timeout=timedelta(seconds=timeout_s))
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
