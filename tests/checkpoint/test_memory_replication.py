"""The memory tier's ring and replication, without processes: ranks are threads joined by the in-process
transport, whose sends return only once received (as gloo's large sends do), so an exchange order that
would deadlock over gloo fails here too. One test runs the same scenario over gloo between two processes."""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from resilient.core.secret import RunKey
from tests.checkpoint.memory_ranks import gloo_rank, transfer_scenario
from trainer.checkpoint.memory import files, naming, replication, slots, snapshot
from trainer.checkpoint.memory.ring import Ring
from trainer.checkpoint.memory.snapshot import SnapshotFormat, Staged
from trainer.checkpoint.memory.tier import MemoryTier
from trainer.checkpoint.memory.transport import InProcessHub, Transport

LAYOUT = {"world": 2, "tp": 1, "pp": 1, "dp": 2}
KEY = RunKey(b"\x01" * 32)


def in_threads(world: int, body: Callable[[int, Transport], Any], timeout_s: float = 30.0) -> list[Any]:
    """body(rank, transport) on `world` threads; their results by rank (an exception is re-raised)."""
    hub = InProcessHub(world, timeout_s=timeout_s)
    results: list[Any] = [None] * world

    def run(rank: int) -> None:
        try:
            results[rank] = body(rank, hub.transport(rank))
        except BaseException as err:  # noqa: BLE001 - handed to the test thread
            results[rank] = err

    threads = [threading.Thread(target=run, args=(r,), daemon=True) for r in range(world)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout_s * 4)
        assert not t.is_alive(), "a rank is still blocked"
    return results


def raised(results: list[Any]) -> list[Any]:
    for r in results:
        if isinstance(r, BaseException):
            raise r
    return results


def payload(rank: int, step: int) -> bytes:
    return bytes([rank + 1, step % 256]) * (1000 + 37 * rank)


def stage_bytes(
    directory: Path, rank: int, step: int, data: bytes, fmt: SnapshotFormat, allocate=slots.shm_file
) -> Staged:
    """What `SnapshotFormat.stage` leaves, for bytes instead of a training state."""
    files.make_dir(directory)
    buffer = allocate(naming.data_file(directory, rank), len(data))
    buffer[: len(data)] = data
    meta = {
        "format": snapshot.FORMAT,
        "step": step,
        "rank": rank,
        "layout": fmt.layout,
        "tensors": [],
        "common": {"start": 0, "nbytes": 0},
        "bytes": len(data),
    }
    return Staged(step, directory, meta, buffer)


def commit(directory: Path) -> None:
    files.write_private(directory / naming.COMMITTED, b"{}")


# -- the ring -------------------------------------------------------------------------------


@pytest.mark.parametrize("nodes,local", [(2, 1), (3, 2), (4, 8)])
def test_every_rank_has_one_holder_on_the_next_node_and_holds_for_one(nodes, local):
    ring = Ring(nodes * local, local)
    world = range(ring.world)
    assert ring.nodes == nodes and ring.replicated
    assert sorted(ring.holder_of(r) for r in world) == list(world)  # a permutation: one replica each
    for r in world:
        holder = ring.holder_of(r)
        assert ring.replica_of(holder) == r
        assert ring.node_of(holder) == (ring.node_of(r) + 1) % nodes  # on the next node
        assert holder % local == r % local  # the same local rank
        assert ring.replica_node_of(ring.node_of(holder)) == ring.node_of(r)


def test_one_node_holds_no_replicas():
    ring = Ring(4, 4)
    assert not ring.replicated
    assert (ring.holder_of(2), ring.replica_of(2), ring.replica_node_of(0)) == (None, None, None)


# -- the in-process transport ---------------------------------------------------------------


def test_a_send_returns_only_once_received():
    # Both ranks send first: over gloo two large sends wait for each other forever; here too, until
    # the timeout says so.
    def both_send_first(rank: int, transport: Transport) -> tuple[bytes, int]:
        transport.send(1 - rank, b"m", b"x" * 100)
        return transport.recv_meta(1 - rank)

    results = in_threads(2, both_send_first, timeout_s=0.5)
    assert all(isinstance(r, TimeoutError) for r in results), results


def test_messages_and_votes():
    def body(rank: int, transport: Transport) -> tuple[Any, ...]:
        if rank == 0:
            transport.send(1, b"first", b"abc")
            transport.send(1, b"second", b"")
            return transport.all_ok(True), transport.all_ok(True)
        meta, size = transport.recv_meta(0)
        into = bytearray(size)
        transport.recv_payload(0, memoryview(into))
        assert transport.recv_meta(0) == (b"second", 0)
        return (meta, bytes(into)), transport.all_ok(False), transport.all_ok(True)

    got = raised(in_threads(2, body))
    assert got[0] == (False, True) and got[1] == ((b"first", b"abc"), False, True)


# -- the exchange after a snapshot ----------------------------------------------------------


@pytest.mark.parametrize("nodes", [2, 3])  # an odd ring must make progress too
def test_each_rank_stores_the_copy_of_the_rank_it_holds_for(tmp_path, nodes):
    ring, fmt, step = Ring(nodes * 2, 2), SnapshotFormat(KEY, LAYOUT), 15

    def body(rank: int, transport: Transport) -> None:
        node = ring.node_of(rank)
        staged = stage_bytes(
            naming.step_dir(naming.own_dir(tmp_path, node), step), rank, step, payload(rank, step), fmt
        )
        meta = fmt.seal(staged)
        src = ring.replica_of(rank)
        held = slots.Slots(naming.replica_dir(tmp_path, node, ring.node_of(src)), src)
        data = memoryview(staged.buffer)[: staged.nbytes]
        replication.exchange(transport, ring, tmp_path, rank, data, meta, held.take)
        data.release()
        held.close()
        staged.buffer.close()

    raised(in_threads(ring.world, body))
    replicas = {}
    for rank in range(ring.world):
        holder = ring.holder_of(rank)
        replicas[rank] = naming.step_dir(naming.replica_dir(tmp_path, ring.node_of(holder), ring.node_of(rank)), step)
        assert not (replicas[rank] / naming.COMMITTED).exists()  # the tier commits after the vote
    for rank, directory in replicas.items():
        own = naming.step_dir(naming.own_dir(tmp_path, ring.node_of(rank)), step)
        assert naming.meta_file(directory, rank).read_bytes() == naming.meta_file(own, rank).read_bytes()
        commit(directory)
        meta, data = fmt.read(directory, rank)  # the replica passes the same checks as the original
        assert (meta["rank"], bytes(data)) == (rank, payload(rank, step))
        assert naming.ranks_in(directory) == [r for r in range(ring.world) if ring.node_of(r) == ring.node_of(rank)]


# -- the transfer at a restart --------------------------------------------------------------


def held_replica(root: Path, step: int, fmt: SnapshotFormat) -> Path:
    """2 nodes of 1 rank: the replica of rank 1's step `step` that rank 0 holds, committed."""
    ring = Ring(2, 1)
    directory = naming.step_dir(naming.replica_dir(root, 0, 1), step)
    staged = stage_bytes(directory, 1, step, payload(1, step), fmt)
    fmt.seal(staged)
    staged.buffer.close()
    commit(directory)
    assert ring.holder_of(1) == 0
    return directory


@pytest.mark.parametrize("replica_there", [True, False])
def test_a_replica_that_vanished_before_the_transfer_is_reported_not_waited_for(tmp_path, replica_there):
    """The holder answers for a replica pruned or damaged since the inventory; its owner fails that copy
    (and the restart chooses again) instead of blocking in recv until the hang detector fires."""
    directory = held_replica(tmp_path, 15, SnapshotFormat(KEY, LAYOUT))
    if not replica_there:
        naming.data_file(directory, 1).unlink()
    got = raised(in_threads(2, lambda rank, transport: transfer_scenario(rank, transport, tmp_path)))
    assert got[0] is None
    meta, data = got[1]
    if replica_there:
        assert meta == json.loads(naming.meta_file(directory, 1).read_text()) and data == payload(1, 15)
    else:
        assert data == b"" and "rank 0: FileNotFoundError" in meta[replication.UNAVAILABLE]


@pytest.mark.parametrize("damage", [None, "flipped byte", "vanished"])
def test_a_rank_that_lost_its_memory_fetches_its_copy_from_the_holder(tmp_path, damage):
    """MemoryTier.fetch end to end: rank 0 reads its own copy, rank 1 (its node's memory gone) receives
    the replica rank 0 holds; whatever is not genuine is refused before anything is unpickled."""
    root, fmt, step = tmp_path / "shm", SnapshotFormat(KEY, LAYOUT), 15
    assert files.root_problem(root) is None
    own = naming.step_dir(naming.own_dir(root, 0), step)
    staged = stage_bytes(own, 0, step, payload(0, step), fmt)
    fmt.seal(staged)
    staged.buffer.close()
    commit(own)
    directory = held_replica(root, step, fmt)
    if damage == "flipped byte":
        data = bytearray(naming.data_file(directory, 1).read_bytes())
        data[7] ^= 1
        naming.data_file(directory, 1).write_bytes(bytes(data))
    elif damage == "vanished":
        naming.data_file(directory, 1).unlink()

    def body(rank: int, transport: Transport) -> Any:
        tier = MemoryTier(root, rank=rank, ring=Ring(2, 1), fmt=fmt, keep_last=2, transport=transport)
        try:
            meta, data = tier.fetch(step, ("own", "replica@0"))
            return meta["rank"], bytes(data)
        except ValueError as err:
            return str(err)

    got = in_threads(2, body)
    assert got[0] == (0, payload(0, step))
    if damage is None:
        assert got[1] == (1, payload(1, step))
    elif damage == "flipped byte":
        assert got[1] == "checksum mismatch"
    else:
        assert got[1].startswith("replica unavailable (rank 0: FileNotFoundError")


def test_the_gloo_transport_runs_the_same_scenario(tmp_path):
    """The in-process transport stands in for gloo: the vanished-replica scenario over real gloo."""
    import multiprocessing

    directory = held_replica(tmp_path, 15, SnapshotFormat(KEY, LAYOUT))
    naming.data_file(directory, 1).unlink()
    ctx = multiprocessing.get_context("spawn")
    results = ctx.Queue()
    procs = [ctx.Process(target=gloo_rank, args=(r, str(tmp_path), str(tmp_path / "init"), results)) for r in (0, 1)]
    for p in procs:
        p.start()
    got = dict(results.get(timeout=90) for _ in procs)
    for p in procs:
        p.join(30)
        assert p.exitcode == 0
    assert got[0] is None
    meta, data = got[1]
    assert data == b"" and "rank 0: FileNotFoundError" in meta[replication.UNAVAILABLE]
