"""Process-group and megatron parallel_state setup for one rank, from torchrun-style env."""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

from trainer.cpu_bridge import install_cpu_bridge


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


def init_distributed(env: RankEnv, *, tp: int, pp: int, cp: int, timeout_s: float = 300.0) -> torch.device:
    """Join the job's process group (NCCL on GPU, gloo on CPU) and build megatron's groups."""
    if torch.cuda.is_available():
        torch.cuda.set_device(env.local_rank)
        device, backend = torch.device("cuda", env.local_rank), "nccl"
    else:
        install_cpu_bridge()
        device, backend = torch.device("cpu"), "gloo"
    if not dist.is_initialized():
        store = _rendezvous_store(env.rank, env.world_size, timeout_s)
        dist.init_process_group(backend, store=store, rank=env.rank, world_size=env.world_size,
                                timeout=timedelta(seconds=timeout_s))
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp, context_parallel_size=cp
    )
    return device


def _rendezvous_store(rank: int, world_size: int, timeout_s: float) -> dist.TCPStore:
    """The process group's store, hosted by rank 0 on MASTER_ADDR only: torch's own would listen on every
    interface. Rank 0 binds the socket itself and hands it to the (libuv) store server."""
    addr = os.environ.get("MASTER_ADDR", "127.0.0.1")
    port = int(os.environ.get("MASTER_PORT", "29500"))
    timeout = timedelta(seconds=timeout_s)
    if rank != 0:
        return dist.TCPStore(addr, port, world_size=world_size, is_master=False, timeout=timeout)
    family, kind, proto, _, sockaddr = socket.getaddrinfo(addr, port, type=socket.SOCK_STREAM)[0]
    listener = socket.socket(family, kind, proto)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(sockaddr)
    listener.listen(1024)
    store = dist.TCPStore(addr, port, world_size=world_size, is_master=True, timeout=timeout,
                          master_listen_fd=listener.fileno(), use_libuv=True)
    _LISTENERS.append(listener)  # the server uses the fd for the life of the process group
    return store


_LISTENERS: list[socket.socket] = []


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
