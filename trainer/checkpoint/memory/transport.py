"""How the memory tier's ranks talk: point-to-point messages (a metadata text and a payload) and the
commit vote, behind one small interface.

`GlooTransport` runs over the tier's own gloo process group (its collectives stay off the training
loop's). `InProcessTransport` connects threads of one process with the same semantics, so replication
and its failure paths are tested without processes: a send returns only once its message was received
in full (as gloo's send of a large message does), so an order of sends and receives that could deadlock
over gloo deadlocks there too, and is reported after `timeout_s` instead of hanging.
"""

from __future__ import annotations

import queue
import threading
from typing import Protocol

import torch
import torch.distributed as dist


class Transport(Protocol):
    """One rank's end. Messages between two ranks arrive in the order they were sent."""

    def send(self, dst: int, meta: bytes, payload: memoryview | bytes) -> None:
        """Send one message to rank `dst`; returns once `dst` has received it."""

    def recv_meta(self, src: int) -> tuple[bytes, int]:
        """The next message from rank `src`: its metadata and the size of its payload, which the caller
        then receives with `recv_payload` (where it chooses) unless the size is 0."""

    def recv_payload(self, src: int, into: memoryview) -> None:
        """The payload of the message whose metadata was received last from `src`, into `into` (its size)."""

    def all_ok(self, ok: bool) -> bool:
        """Every rank's vote: True when every rank voted True (a collective: every rank calls it)."""


class GlooTransport:
    def __init__(self, group: dist.ProcessGroup) -> None:
        self.group = group

    def send(self, dst: int, meta: bytes, payload: memoryview | bytes) -> None:
        dist.send(torch.tensor([len(meta), len(payload)], dtype=torch.int64), dst, group=self.group)
        dist.send(torch.frombuffer(bytearray(meta), dtype=torch.uint8), dst, group=self.group)
        if len(payload):
            dist.send(torch.frombuffer(payload, dtype=torch.uint8, count=len(payload)), dst, group=self.group)

    def recv_meta(self, src: int) -> tuple[bytes, int]:
        header = torch.empty(2, dtype=torch.int64)
        dist.recv(header, src, group=self.group)
        text = torch.empty(int(header[0]), dtype=torch.uint8)
        dist.recv(text, src, group=self.group)
        return bytes(text.numpy()), int(header[1])

    def recv_payload(self, src: int, into: memoryview) -> None:
        target = torch.frombuffer(into, dtype=torch.uint8, count=len(into))
        dist.recv(target, src, group=self.group)
        del target

    def all_ok(self, ok: bool) -> bool:
        flag = torch.tensor([1 if ok else 0], dtype=torch.int32)
        dist.all_reduce(flag, op=dist.ReduceOp.MIN, group=self.group)
        return bool(flag.item())


class _Message:
    def __init__(self, meta: bytes, payload: bytes) -> None:
        self.meta, self.payload = meta, payload
        self.received = threading.Event()


class InProcessHub:
    """The wires between `world` in-process ranks; `transport(rank)` is rank `rank`'s end."""

    def __init__(self, world: int, timeout_s: float = 30.0) -> None:
        self.world, self.timeout_s = world, timeout_s
        self.wires = {(s, d): queue.Queue() for s in range(world) for d in range(world)}
        self.votes = threading.Barrier(world, timeout=timeout_s)
        self.ballot: list[bool] = [True] * world

    def transport(self, rank: int) -> InProcessTransport:
        return InProcessTransport(self, rank)


class InProcessTransport:
    def __init__(self, hub: InProcessHub, rank: int) -> None:
        self.hub, self.rank = hub, rank
        self.pending: dict[int, _Message] = {}

    def send(self, dst: int, meta: bytes, payload: memoryview | bytes) -> None:
        message = _Message(bytes(meta), bytes(payload))
        self.hub.wires[(self.rank, dst)].put(message)
        if not message.received.wait(self.hub.timeout_s):
            raise TimeoutError(f"rank {self.rank}: send to rank {dst} not received within {self.hub.timeout_s:g}s")

    def recv_meta(self, src: int) -> tuple[bytes, int]:
        try:
            message = self.hub.wires[(src, self.rank)].get(timeout=self.hub.timeout_s)
        except queue.Empty:
            raise TimeoutError(f"rank {self.rank}: nothing from rank {src} within {self.hub.timeout_s:g}s") from None
        if message.payload:
            self.pending[src] = message
        else:
            message.received.set()
        return message.meta, len(message.payload)

    def recv_payload(self, src: int, into: memoryview) -> None:
        message = self.pending.pop(src)
        into[: len(message.payload)] = message.payload
        message.received.set()

    def all_ok(self, ok: bool) -> bool:
        self.hub.ballot[self.rank] = ok
        self.hub.votes.wait()
        result = all(self.hub.ballot)
        self.hub.votes.wait()  # every rank has read the result before the next vote overwrites it
        return result
