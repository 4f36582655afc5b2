"""Memory-tier replicas on the next node (ring.py), moved by a `Transport`.

After each snapshot, on the tier's background thread, `exchange` sends this rank's sealed copy to its
holder and stores the copy of the rank it holds for, under node<me>/replica/node<src>/step_<N>/. At a
restart, `transfer` hands a rank whose own copy is gone the replica its holder keeps; a holder whose
replica vanished since the inventory answers so instead, and its owner reports the copy as failed
(the choice is then taken again) rather than waiting for bytes that never come.
"""

from __future__ import annotations

import json
import mmap
from collections.abc import Callable
from pathlib import Path
from typing import Any

from trainer.checkpoint.memory import choice, files, naming
from trainer.checkpoint.memory.ring import Ring
from trainer.checkpoint.memory.transport import Transport

UNAVAILABLE = "unavailable"
"""The key of a holder's answer in place of a replica's metadata."""


def exchange(
    transport: Transport,
    ring: Ring,
    root: Path,
    rank: int,
    data: memoryview,
    meta: bytes,
    allocate: Callable[[Path, int], mmap.mmap],
) -> None:
    """Send this rank's sealed snapshot (`data`, and `meta`: its metadata's bytes) to its holder and
    store the one this rank holds (into a mapped file from `allocate`), uncommitted: the tier commits it."""
    holder, src = ring.holder_of(rank), ring.replica_of(rank)
    assert holder is not None and src is not None, "one node: nothing to exchange"
    first = ring.sends_first(rank)
    if first:
        transport.send(holder, meta, data)
    text, size = transport.recv_meta(src)
    directory = naming.step_dir(
        naming.replica_dir(root, ring.node_of(rank), ring.node_of(src)), json.loads(text)["step"]
    )
    files.make_dir(directory)
    (directory / naming.COMMITTED).unlink(missing_ok=True)  # a step trained again is a new snapshot
    naming.meta_file(directory, src).unlink(missing_ok=True)
    buffer = allocate(naming.data_file(directory, src), size)
    if size:
        target = memoryview(buffer)[:size]
        transport.recv_payload(src, target)
        target.release()  # on an error it goes with the frame: a live export keeps the mapping from closing
    files.write_private(naming.meta_file(directory, src), text)
    if not first:
        transport.send(holder, meta, data)


def transfer(
    transport: Transport, ring: Ring, root: Path, rank: int, step: int, sources: tuple[str, ...]
) -> tuple[dict[str, Any], bytearray] | None:
    """Every rank calls this with the same `sources` (`choice.TierChoice.sources`): each holder sends
    the replica it keeps to the rank that lacks its own copy, pair by pair in rank order (so no cycle
    of blocked sends). Returns what this rank received, if anything: (metadata, bytes), the metadata
    being {UNAVAILABLE: why} when its holder could not read it. Nothing is verified here."""
    received = None
    for owner, source in enumerate(sources):
        holder = choice.holder_in(source)
        if holder is None:
            continue
        if rank == holder:
            directory = naming.step_dir(naming.replica_dir(root, ring.node_of(holder), ring.node_of(owner)), step)
            try:
                text = files.read_bytes(naming.meta_file(directory, owner))
                data = files.read_prefix(naming.data_file(directory, owner), json.loads(text)["bytes"])
            except (OSError, ValueError, KeyError) as err:  # pruned or damaged since the inventory
                text, data = json.dumps({UNAVAILABLE: f"rank {holder}: {type(err).__name__}: {err}"}).encode(), b""
            transport.send(owner, text, data)
        elif rank == owner:
            text, size = transport.recv_meta(holder)
            data = bytearray(size)  # received in place: the loader uses it as it is
            if size:
                transport.recv_payload(holder, memoryview(data))
            received = (json.loads(text), data)
    return received
