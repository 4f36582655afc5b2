"""The replica transfer scenario of test_memory_replication.py, run by in-process and by gloo ranks.
Kept apart from the tests: a spawned gloo rank imports only this (torch, not megatron)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from trainer.checkpoint.memory import replication
from trainer.checkpoint.memory.ring import Ring
from trainer.checkpoint.memory.transport import Transport


def transfer_scenario(rank: int, transport: Transport, root: Path) -> Any:
    """Two nodes of one rank at a restart from step 15: rank 1 lost its own copy, rank 0 holds its replica."""
    got = replication.transfer(transport, Ring(2, 1), root, rank, 15, ("own", "replica@0"))
    return None if got is None else (got[0], bytes(got[1]))


def gloo_rank(rank: int, root: str, init: str, results) -> None:
    """One of two gloo ranks (a spawned process) running `transfer_scenario`; its result goes to `results`."""
    from datetime import timedelta

    import torch.distributed as dist

    from trainer.checkpoint.memory.transport import GlooTransport

    dist.init_process_group(
        "gloo", init_method=f"file://{init}", rank=rank, world_size=2, timeout=timedelta(seconds=60)
    )
    results.put((rank, transfer_scenario(rank, GlooTransport(dist.group.WORLD), Path(root))))
    dist.destroy_process_group()
