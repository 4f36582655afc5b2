"""Process-group and megatron parallel_state setup for one rank, from torchrun-style env."""

from __future__ import annotations

import math
import os
import socket
from datetime import timedelta

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

from resilient.rank import rendezvous
from resilient.rank.env import RankEnv
from trainer.cpu_bridge import install_cpu_bridge
from trainer.model import ModelBuild


def init_distributed(env: RankEnv, build: ModelBuild, *, timeout_s: float) -> torch.device:
    """Join the job's process group (NCCL on GPU, gloo on CPU) and build megatron's groups, all with
    the configured collective timeout."""
    if torch.cuda.is_available():
        torch.cuda.set_device(env.local_rank)
        device, backend = torch.device("cuda", env.local_rank), "nccl"
    else:
        install_cpu_bridge()
        device, backend = torch.device("cpu"), "gloo"
    if not dist.is_initialized():
        key = rendezvous.rendezvous_key(env)
        store = (
            rendezvous.rendezvous_store(env, key, timeout_s)
            if key is not None
            else _rendezvous_store(env.master_addr, env.master_port, env.rank, env.world_size, timeout_s)
        )
        dist.init_process_group(
            backend, store=store, rank=env.rank, world_size=env.world_size, timeout=timedelta(seconds=timeout_s)
        )
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=build.tp,
        pipeline_model_parallel_size=build.pp,
        virtual_pipeline_model_parallel_size=build.vpp,
        context_parallel_size=build.cp,
        distributed_timeout_minutes=max(1, math.ceil(timeout_s / 60)),
    )
    return device


def _rendezvous_store(addr: str, port: int, rank: int, world_size: int, timeout_s: float) -> dist.Store:
    """An unsupervised rank's process-group store (a supervised rank's: resilient.rank.rendezvous), hosted by
    rank 0 on MASTER_ADDR only: torch's own would listen on every interface. Rank 0 binds the socket itself
    and hands it to the (libuv) store server. Under torchrun (or ft_launcher) the agent already serves a store
    on MASTER_PORT for the life of the job: every rank joins it as a client, under a prefix per restart so a
    restarted group never meets the last one's keys."""
    timeout = timedelta(seconds=timeout_s)
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
        agent = dist.TCPStore(addr, port, world_size=world_size, is_master=False, timeout=timeout)
        return dist.PrefixStore(f"/resilient/restart_{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}", agent)
    if rank != 0:
        return dist.TCPStore(addr, port, world_size=world_size, is_master=False, timeout=timeout)
    family, kind, proto, _, sockaddr = socket.getaddrinfo(addr, port, type=socket.SOCK_STREAM)[0]
    listener = socket.socket(family, kind, proto)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(sockaddr)
    listener.listen(1024)
    store = dist.TCPStore(
        addr,
        port,
        world_size=world_size,
        is_master=True,
        timeout=timeout,
        master_listen_fd=listener.fileno(),
        use_libuv=True,
    )
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
