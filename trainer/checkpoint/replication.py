"""Memory-tier replicas on the next node, over the tier's own gloo process group.

Ring over nodes: rank r sends its snapshot to rank (r + local_world) mod world and receives the one of
rank (r - local_world) mod world, which it stores under node<me>/replica/node<src>/step_<N>/ (as
NVRx's local checkpointing exchanges with torch.distributed). Runs on the tier's background thread.
At a restart, `transfer` hands a rank whose own copy is gone the replica its holder keeps; a holder
whose replica vanished since the inventory says so instead, and its owner reports the copy as failed
(the choice is then taken again) rather than waiting for bytes that never come.
"""

from __future__ import annotations

import json
import mmap
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist

if TYPE_CHECKING:
    from trainer.checkpoint.memory_tier import Staged


UNAVAILABLE = "unavailable"  # the key of a holder's answer in place of a replica's metadata


def peers(rank: int, world: int, local_world: int) -> tuple[int, int]:
    """(rank this one sends to, rank it receives from)."""
    return (rank + local_world) % world, (rank - local_world) % world


def _send(group: dist.ProcessGroup, dst: int, text: bytes, payload: Any) -> None:
    header = torch.tensor([len(text), len(payload)], dtype=torch.int64)
    dist.send(header, dst, group=group)
    dist.send(torch.frombuffer(bytearray(text), dtype=torch.uint8), dst, group=group)
    if len(payload):
        dist.send(torch.frombuffer(payload, dtype=torch.uint8, count=len(payload)), dst, group=group)


def _recv_header(group: dist.ProcessGroup, src: int) -> tuple[dict[str, Any], int]:
    header = torch.empty(2, dtype=torch.int64)
    dist.recv(header, src, group=group)
    text = torch.empty(int(header[0]), dtype=torch.uint8)
    dist.recv(text, src, group=group)
    return json.loads(bytes(text.numpy())), int(header[1])


def ring_exchange(group: dist.ProcessGroup, staged: Staged, text: bytes, *, root: Path, rank: int, world: int,
                  local_world: int, allocate: Callable[[Path, int], mmap.mmap]) -> None:
    """Send this rank's sealed snapshot to the next node and store the previous node's (into a mapped
    file from `allocate`)."""
    from trainer.checkpoint.memory_tier import COMMITTED, replica_dir, step_dir, write_file

    dst, src = peers(rank, world, local_world)
    nbytes = staged.meta["bytes"]
    view = memoryview(staged.buffer)[:nbytes]
    # even nodes send first, odd ones receive first: no two ranks both block in send (gloo's send
    # of a large message waits for the matching recv); a ring of odd length still makes progress
    # because the last node's sender pairs with node 0's receive after node 0 has sent.
    node, nodes = rank // local_world, world // local_world
    if node % 2 == 0:
        _send(group, dst, text, view)
        meta, size = _recv_header(group, src)
    else:
        meta, size = _recv_header(group, src)
    directory = step_dir(replica_dir(root, node, (node - 1) % nodes), meta["step"])
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    (directory / COMMITTED).unlink(missing_ok=True)  # a step trained again is a new snapshot
    (directory / f"rank{src}.json").unlink(missing_ok=True)
    buffer = allocate(directory / f"rank{src}.bin", size)
    if size:
        target = torch.frombuffer(buffer, dtype=torch.uint8, count=size)
        dist.recv(target, src, group=group)
        del target
    write_file(directory / f"rank{src}.json", json.dumps(meta).encode())
    if node % 2 == 1:
        _send(group, dst, text, view)
    view.release()


def transfer(group: dist.ProcessGroup, root: Path, step: int, sources: tuple[str, ...], *, rank: int,
             local_world: int, world: int) -> tuple[dict[str, Any], bytearray] | None:
    """Every rank calls this with the same `sources`: each holder sends the replica it keeps to the
    rank that lacks its own copy, pair by pair in rank order (so no cycle of blocked sends).
    Returns what this rank received, if anything: (metadata, bytes), the metadata being
    {UNAVAILABLE: why} when its holder could not read it."""
    from trainer.checkpoint.memory_tier import read_data, replica_dir, step_dir

    received = None
    for owner, source in enumerate(sources):
        if source == "own":
            continue
        holder = int(source.split("@", 1)[1])
        if rank == holder:
            directory = step_dir(replica_dir(root, holder // local_world, owner // local_world), step)
            try:
                text = (directory / f"rank{owner}.json").read_bytes()
                data = read_data(directory / f"rank{owner}.bin", json.loads(text)["bytes"])
            except (OSError, ValueError, KeyError) as err:  # pruned or damaged since the inventory
                text, data = json.dumps({UNAVAILABLE: f"rank {holder}: {type(err).__name__}: {err}"}).encode(), b""
            _send(group, owner, text, data)
        elif rank == owner:
            meta, size = _recv_header(group, holder)
            data = bytearray(size)  # received in place: the loader uses it as it is
            if size:
                dist.recv(torch.frombuffer(data, dtype=torch.uint8), holder, group=group)
            received = (meta, data)
    return received
