"""The in-memory checkpoint tier: each rank's full training state in host shared memory.

Layout under the tier's root (/dev/shm/resilient-<run key>, 0700 dirs, 0600 files):

    node<k>/own/step_<N>/rank<r>.bin, rank<r>.json, COMMITTED
    node<k>/replica/node<src>/step_<N>/rank<r>.bin, rank<r>.json, COMMITTED

`rank<r>.bin` holds the local data of every ShardedTensor of `sharded_state` (each at a 64-byte
aligned offset) followed by one torch.save blob with the common state and the ShardedObjects;
`rank<r>.json` says where each tensor is (key, global offset, flattened range, dtype, shape), the
parallel layout, and the xxh3-64 checksum of the .bin. The loop pays only the copy into the mapped
file: a pruned snapshot's file is renamed to `.spare/` and reused, still mapped, by the next one
(a fresh file costs ~3x the copy in page faults; replicas are received the same way). The checksum,
the replica (replication.py) and the commit run on a background thread. A step's COMMITTED marker
is written by each node's local rank 0 once every rank of the job reported its copy written and
checksummed (one all_reduce on the tier's own gloo group): the disk tier's commit rule. A restart
verifies the checksum of the copy it picks before torch.load(weights_only=True) sees the blob, and
works for the same layout only (another layout falls back to disk).
"""

from __future__ import annotations

import io
import json
import logging
import mmap
import os
import queue
import shutil
import stat
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from megatron.core.dist_checkpointing import ShardedObject, ShardedTensor
from megatron.core.dist_checkpointing.dict_utils import (
    dict_list_map_inplace,
    merge,
    nested_values,
)
from megatron.core.dist_checkpointing.mapping import apply_factory_merges
from megatron.core.dist_checkpointing.state_dict_utils import (
    load_preprocess,
    save_preprocess,
)
from megatron.core.dist_checkpointing.utils import extract_sharded_base

from resilient.core.errors import CheckpointError
from trainer.checkpoint import manifest, replication
from trainer.checkpoint.policy import Inventory
from trainer.checkpoint.state import TrainState, apply_loaded, sharded_state

log = logging.getLogger(__name__)

COMMITTED = "COMMITTED"
ALIGN = 64
FORMAT = 2
"""2: xxh3-64 checksums (1: zlib CRC-32; such snapshots are refused and the restart uses disk)."""
SPARE = ".spare"
SLACK = 1 << 20
"""Files are sized up to a MiB multiple: the common-state blob's size varies a little from step to
step, and a spare file must still fit."""


# -- names ----------------------------------------------------------------------------------

def own_dir(root: Path, node: int) -> Path:
    return root / f"node{node}" / "own"


def replica_dir(root: Path, node: int, src_node: int) -> Path:
    return root / f"node{node}" / "replica" / f"node{src_node}"


def step_dir(base: Path, step: int) -> Path:
    return base / f"step_{step:07d}"


def steps_in(base: Path) -> dict[int, Path]:
    """step -> directory, committed or not."""
    found = {}
    if base.is_dir():
        for path in base.iterdir():
            if path.name.startswith("step_") and path.name[5:].isdigit():
                found[int(path.name[5:])] = path
    return dict(sorted(found.items()))


def _mkdir(path: Path) -> None:
    path.mkdir(mode=0o700, parents=True, exist_ok=True)


def check_root(root: Path) -> None:
    """Create the tier's root owner-only; refuse one (in world-writable /dev/shm) that another user
    made, that is a link, or that others can open."""
    try:
        root.mkdir(mode=0o700, parents=True, exist_ok=True)
        st = root.lstat()
    except OSError as err:
        raise CheckpointError(f"memory tier {root}: {err}") from None
    if stat.S_ISLNK(st.st_mode) or not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid() or st.st_mode & 0o077:
        raise CheckpointError(f"memory tier {root}: not an owner-only directory of this user; refusing it")


def shm_file(path: Path, size: int) -> mmap.mmap:
    """A new owner-only file of `size` bytes, mapped. The blocks are reserved up front: a full tmpfs
    fails here with ENOSPC instead of killing the process with SIGBUS on the first write."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.posix_fallocate(fd, 0, max(size, 1))
        return mmap.mmap(fd, max(size, 1))
    finally:
        os.close(fd)


class Slots:
    """One rank's snapshot files in one base (its own, or a replica it receives), kept mapped: a
    pruned one (moved to `.spare/` by prune) is renamed into the next snapshot's directory and written
    through the mapping it already has, so steady-state snapshots cost the copy, not page faults.
    Anything missing or too small: a fresh file (correct, only slower). Mappings whose file is gone
    are closed."""

    def __init__(self, base: Path, rank: int) -> None:
        self.spare = base / SPARE / f"rank{rank}.bin"
        self.base, self.name = base, f"rank{rank}.bin"
        self.maps: dict[int, mmap.mmap] = {}
        """inode -> the mapping of that file."""

    def take(self, path: Path, size: int) -> mmap.mmap:
        """A mapped owner-only file of at least `size` bytes at `path`."""
        try:
            st = self.spare.lstat()
            if stat.S_ISREG(st.st_mode) and st.st_uid == os.getuid() and st.st_size >= size:
                buffer = self.maps.pop(st.st_ino, None)
                if buffer is None:  # left by an earlier process: its pages exist, map them
                    fd = os.open(self.spare, os.O_RDWR | os.O_NOFOLLOW)
                    try:
                        buffer = mmap.mmap(fd, st.st_size)
                    finally:
                        os.close(fd)
                os.replace(self.spare, path)  # ENOENT if prune removed it meanwhile: a fresh file then
                self.maps[st.st_ino] = buffer
                return buffer
        except OSError:
            pass
        buffer = shm_file(path, -(-size // SLACK) * SLACK)
        self.maps[path.stat().st_ino] = buffer
        return buffer

    def forget_gone(self) -> None:
        """Close the mappings of files no longer among this rank's snapshots or the spare."""
        alive = set()
        for path in [self.spare, *(d / self.name for d in steps_in(self.base).values())]:
            try:
                alive.add(path.lstat().st_ino)
            except OSError:
                pass
        for ino in [i for i in self.maps if i not in alive]:
            self.maps.pop(ino).close()

    def close(self) -> None:
        for buffer in self.maps.values():
            buffer.close()
        self.maps.clear()


def write_file(path: Path, data: bytes) -> None:
    """Owner-only, replaced atomically (tmpfs: no fsync)."""
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


# -- the bytes of one rank's snapshot -------------------------------------------------------

def _ident(item: ShardedTensor | ShardedObject) -> str:
    rng = getattr(item, "flattened_range", None)
    return f"{item.key}|{tuple(item.global_offset)}|{(rng.start, rng.stop) if rng is not None else None}"


def _dtype(name: str) -> torch.dtype:
    dtype = getattr(torch, name.removeprefix("torch."), None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"unknown dtype {name!r}")
    return dtype


@dataclass
class Staged:
    """One rank's snapshot copied into its shared-memory file, not yet checksummed."""

    step: int
    directory: Path
    meta: dict[str, Any]
    buffer: mmap.mmap


def stage(state: TrainState, directory: Path, rank: int, layout: dict[str, int],
          allocate: Callable[[Path, int], mmap.mmap] = shm_file) -> Staged:
    """The loop's part: build the sharded state and copy it into directory/rank<r>.bin (a mapped file
    of at least the size needed from `allocate`)."""
    tree = sharded_state(state, include_rng=True)
    sharded, common = save_preprocess(tree, validate_access_integrity=False)
    entries, tensors, objects, offset = [], [], {}, 0
    for item in nested_values(sharded):
        if isinstance(item, ShardedTensor):
            data = item.data.detach()
            nbytes = data.numel() * data.element_size()
            entries.append({"id": _ident(item), "dtype": str(data.dtype), "shape": list(data.shape),
                            "start": offset, "nbytes": nbytes})
            tensors.append(data)
            offset += -(-nbytes // ALIGN) * ALIGN
        elif isinstance(item, ShardedObject):
            objects[_ident(item)] = item.data
        else:
            raise TypeError(f"memory tier cannot hold {type(item).__name__} {getattr(item, 'key', '')}")
    blob = io.BytesIO()
    torch.save({"common": common, "objects": objects}, blob)
    blob_bytes = blob.getbuffer()
    total = offset + len(blob_bytes)
    _mkdir(directory)
    (directory / COMMITTED).unlink(missing_ok=True)  # a step trained again (after a fallback) is new
    (directory / f"rank{rank}.json").unlink(missing_ok=True)
    buffer = allocate(directory / f"rank{rank}.bin", total)
    flat = torch.frombuffer(buffer, dtype=torch.uint8, count=total) if total else None
    for entry, data in zip(entries, tensors):
        if entry["nbytes"]:
            start = entry["start"]
            flat[start:start + entry["nbytes"]].view(data.dtype).view(data.shape).copy_(data)
    del flat
    buffer[offset:total] = blob_bytes
    meta = {"format": FORMAT, "step": state.step, "rank": rank, "layout": layout, "tensors": entries,
            "common": {"start": offset, "nbytes": len(blob_bytes)}, "bytes": total}
    return Staged(state.step, directory, meta, buffer)


def seal(staged: Staged) -> bytes:
    """The background part: checksum the staged bytes and write rank<r>.json; returns the json bytes."""
    staged.meta["xxh3"] = manifest.hexdigest(memoryview(staged.buffer)[:staged.meta["bytes"]], "xxh3")
    text = json.dumps(staged.meta).encode()
    write_file(staged.directory / f"rank{staged.meta['rank']}.json", text)
    return text


def read_copy(directory: Path, rank: int, layout: dict[str, int] | None) -> tuple[dict[str, Any], bytes]:
    """A verified copy: (meta, data). Raises ValueError with the problem."""
    meta = read_meta(directory, rank)
    try:
        data = read_data(directory / f"rank{rank}.bin", int(meta["bytes"]))
    except OSError as err:
        raise ValueError(f"unreadable: {err}") from None
    return meta, check_copy(meta, data, rank, layout)


def read_data(path: Path, nbytes: int) -> bytearray:
    """The first `nbytes` of a snapshot file, read once into memory the loader can use as it is."""
    data = bytearray(nbytes)
    with open(path, "rb", buffering=0) as f:
        got = f.readinto(data) if nbytes else 0
    if got != nbytes:
        raise ValueError(f"size {got} < {nbytes}")
    return data


def read_meta(directory: Path, rank: int) -> dict[str, Any]:
    if not (directory / COMMITTED).exists():
        raise ValueError("not committed")
    try:
        return json.loads((directory / f"rank{rank}.json").read_text())
    except (OSError, ValueError) as err:
        raise ValueError(f"unreadable: {err}") from None


def check_meta(meta: dict[str, Any], size: int, rank: int, layout: dict[str, int] | None) -> None:
    """What can be checked without reading the data: whose, which layout, the size."""
    if meta.get("format") != FORMAT or meta.get("rank") != rank:
        raise ValueError("not this rank's snapshot")
    if layout is not None and meta.get("layout") != layout:
        raise ValueError(f"other layout {meta.get('layout')}")
    if size < meta["bytes"]:
        raise ValueError(f"size {size} < {meta['bytes']}")


def check_copy(meta: dict[str, Any], data: bytearray, rank: int, layout: dict[str, int] | None) -> bytearray:
    """`data` (at least the snapshot's size) verified against `meta`: the snapshot's bytes."""
    check_meta(meta, len(data), rank, layout)
    nbytes = meta["bytes"]
    if manifest.hexdigest(memoryview(data)[:nbytes], "xxh3") != meta.get("xxh3"):
        raise ValueError("checksum mismatch")
    return data if len(data) == nbytes else data[:nbytes]


def copy_problem(directory: Path, rank: int, layout: dict[str, int] | None, checksums: bool = True) -> str | None:
    """None if the copy is usable, else why not. Without `checksums` only what needs no read of the
    data: committed, metadata, layout, size (a restart verifies the checksum of the copy it picks)."""
    try:
        if checksums:
            read_copy(directory, rank, layout)
        else:
            meta = read_meta(directory, rank)
            check_meta(meta, (directory / f"rank{rank}.bin").stat().st_size, rank, layout)
    except OSError as err:
        return f"unreadable: {err}"
    except ValueError as err:
        return str(err)
    return None


def load_copy(state: TrainState, meta: dict[str, Any], data: bytearray) -> None:
    """Fill the loading tree from a verified copy and put it into the live objects."""
    buffer = data  # owned and writable: tensors below are views of it
    flat = torch.frombuffer(buffer, dtype=torch.uint8) if buffer else torch.empty(0, dtype=torch.uint8)
    tensors = {}
    for entry in meta["tensors"]:
        start, nbytes = entry["start"], entry["nbytes"]
        tensors[entry["id"]] = flat[start:start + nbytes].view(_dtype(entry["dtype"])).view(entry["shape"])
    c = meta["common"]
    blob = torch.load(io.BytesIO(bytes(buffer[c["start"]:c["start"] + c["nbytes"]])), weights_only=True)
    common, objects = blob["common"], blob["objects"]

    tree = sharded_state(state, include_rng=True, is_loading=True)
    sharded, nonpersistent, factories = load_preprocess(tree)
    merge(common, nonpersistent)
    sharded, _ = extract_sharded_base(sharded)

    def fill(item: Any) -> Any:
        ident = _ident(item)
        if isinstance(item, ShardedObject):
            if ident not in objects:
                raise ValueError(f"snapshot lacks object {ident}")
            return objects[ident]
        if ident not in tensors:
            raise ValueError(f"snapshot lacks tensor {ident}")
        got = tensors[ident]
        if item.data is not None and got.numel() != item.data.numel():
            raise ValueError(f"tensor {ident}: {got.numel()} elements, expected {item.data.numel()}")
        # a fresh tensor, as megatron's load returns: views into the buffer (storage offset != 0)
        # are not safe everywhere (torch.set_rng_state reads the storage from its start)
        return (got.view(item.data.shape) if item.data is not None else got).clone()

    dict_list_map_inplace(fill, sharded)
    merge(common, sharded)
    apply_loaded(state, apply_factory_merges(common, factories))


# -- inventory, retention, listing ----------------------------------------------------------

def inventory(root: Path, *, rank: int, world: int, local_world: int, layout: dict[str, int],
              checksums: bool = True) -> Inventory:
    """This rank's usable (committed, same layout; with `checksums`, checksum-verified) own copies and
    the replicas it holds for the rank one node back in the ring."""
    node, nodes = rank // local_world, world // local_world
    own = {step: copy_problem(path, rank, layout, checksums) for step, path in steps_in(own_dir(root, node)).items()}
    if nodes < 2:
        return Inventory(own)
    src = (rank - local_world) % world
    held = steps_in(replica_dir(root, node, src // local_world))
    return Inventory(own, src, {step: copy_problem(path, src, layout, checksums) for step, path in held.items()})


def prune(base: Path, keep_last: int) -> None:
    """Keep the newest `keep_last` committed steps; drop older ones and uncommitted ones older than
    the newest committed (a newer uncommitted one may be in flight). The newest dropped directory
    replaces `base/.spare`: its files are reused by the next snapshot (`Slots`)."""
    steps = steps_in(base)
    committed = [s for s, p in steps.items() if (p / COMMITTED).exists()]
    keep = set(committed[-keep_last:])
    newest = committed[-1] if committed else None
    dropped = [p for step, p in steps.items() if not (step in keep or newest is None or step > newest)]
    for path in dropped:
        (path / COMMITTED).unlink(missing_ok=True)  # uncommit first
    if dropped:
        shutil.rmtree(base / SPARE, ignore_errors=True)
        for meta in dropped[-1].glob("rank*.json"):
            meta.unlink(missing_ok=True)
        try:
            os.replace(dropped[-1], base / SPARE)
            dropped.pop()
        except OSError:
            pass  # removed below like the rest
    for path in dropped:
        shutil.rmtree(path, ignore_errors=True)


def listing(root: Path) -> list[dict[str, Any]]:
    """Every memory-tier step directory under `root`: tier, node, step, ranks, state (checksums verified)."""
    rows = []
    for node_path in sorted(root.glob("node*")):
        if not node_path.name[4:].isdigit():
            continue
        node = int(node_path.name[4:])
        bases = [("memory-own", None, node_path / "own")]
        bases += [("memory-replica", int(p.name[4:]), p) for p in sorted((node_path / "replica").glob("node*"))
                  if p.name[4:].isdigit()]
        for tier, src, base in bases:
            for step, path in steps_in(base).items():
                ranks = sorted(int(p.stem[4:]) for p in path.glob("rank*.json") if p.stem[4:].isdigit())
                problems = [f"rank {r}: {p}" for r in ranks if (p := copy_problem(path, r, None))]
                state = "complete" if (path / COMMITTED).exists() and not problems else (
                    "damaged" if (path / COMMITTED).exists() else "incomplete")
                size = sum(p.stat().st_size for p in path.glob("rank*.bin"))
                rows.append({"tier": tier, "node": node, "of_node": src, "step": step, "ranks": ranks,
                             "state": state, "bytes": size, "problem": "; ".join(problems) or None,
                             "path": str(path)})
    return rows


# -- the tier as a rank uses it --------------------------------------------------------------

class MemoryTier:
    """One per rank. `snapshot` is called by all ranks at the same step boundary; a background
    thread checksums, replicates and commits, one snapshot at a time, in the same order on every rank."""

    def __init__(self, root: Path, *, rank: int, world: int, local_world: int, layout: dict[str, int],
                 keep_last: int, on_commit: Callable[[int, int, bool], None] | None = None) -> None:
        self.root, self.rank, self.world, self.local_world = root, rank, world, local_world
        self.node, self.nodes = rank // local_world, max(1, world // local_world)
        self.layout, self.keep_last = layout, keep_last
        self.on_commit = on_commit
        """Called on the background thread after each commit with (step, bytes, replicated)."""
        self.group = dist.new_group(backend="gloo")  # the tier's own: its collectives run off the loop
        self.last_step: int | None = None
        self.last_committed: int | None = None
        self.failures = 0
        self._jobs: queue.Queue[Staged | int] = queue.Queue()
        self._worker = threading.Thread(target=self._work, name="memory-tier", daemon=True)
        self._worker.start()
        check_root(root)
        _mkdir(own_dir(root, self.node))
        self.slots = [Slots(own_dir(root, self.node), rank)]
        """This rank's own files, and the replica files it receives (the rank one node back)."""
        if self.nodes > 1:
            src = (rank - local_world) % world
            self.slots.append(Slots(replica_dir(root, self.node, src // local_world), src))

    def snapshot(self, state: TrainState) -> None:
        """Copy `state` into shared memory (the loop's only cost); the rest happens in the background."""
        self._jobs.join()  # one snapshot in flight at a time
        for slots in self.slots:
            slots.forget_gone()
        try:
            staged: Staged | int = stage(state, step_dir(own_dir(self.root, self.node), state.step), self.rank,
                                         self.layout, self.slots[0].take)
        except OSError as err:  # /dev/shm full or failing: this step has no memory copy, training goes on
            log.error("memory snapshot of step %d not staged: %s", state.step, err)
            staged = state.step  # the background still joins the commit vote (with a no)
        self.last_step = state.step
        self._jobs.put(staged)

    def wait(self) -> None:
        self._jobs.join()

    def _work(self) -> None:
        while True:
            staged = self._jobs.get()
            try:
                self._finish(staged)
            except Exception:  # a broken peer or a full /dev/shm never stops training
                log.exception("memory snapshot of step %s failed", getattr(staged, "step", None))
                self.failures += 1
            finally:
                self._jobs.task_done()

    def _finish(self, staged: Staged | int) -> None:
        if isinstance(staged, int):  # not staged on this rank: vote no
            flag = torch.tensor([0], dtype=torch.int32)
            dist.all_reduce(flag, op=dist.ReduceOp.MIN, group=self.group)
            self.failures += 1
            return
        ok = True
        try:
            text = seal(staged)
            if self.nodes > 1:
                replication.ring_exchange(self.group, staged, text, root=self.root, rank=self.rank,
                                          world=self.world, local_world=self.local_world,
                                          allocate=self.slots[1].take)
        except Exception:
            log.exception("memory snapshot of step %d not written", staged.step)
            ok = False
        flag = torch.tensor([1 if ok else 0], dtype=torch.int32)
        dist.all_reduce(flag, op=dist.ReduceOp.MIN, group=self.group)
        if not flag.item():
            self.failures += 1
            return
        self.last_committed = staged.step
        if self.rank % self.local_world == 0:  # the node's local rank 0 commits for the node
            bases = [own_dir(self.root, self.node)]
            if self.nodes > 1:
                bases.append(replica_dir(self.root, self.node, (self.node - 1) % self.nodes))
            for base in bases:
                write_file(step_dir(base, staged.step) / COMMITTED, json.dumps({"step": staged.step}).encode())
                prune(base, self.keep_last)
        if self.on_commit is not None:
            self.on_commit(staged.step, staged.meta["bytes"], self.nodes > 1)

    def inventory(self) -> Inventory:
        """What this rank offers at a restart, checksums not yet verified: `fetch` verifies the one
        chosen, so a restart hashes one copy per rank, not every one kept."""
        return inventory(self.root, rank=self.rank, world=self.world, local_world=self.local_world,
                         layout=self.layout, checksums=False)

    def fetch(self, step: int, sources: tuple[str, ...]) -> tuple[dict[str, Any], bytearray]:
        """This rank's copy of `step`: its own, or received from the rank holding its replica (every
        rank calls this: holders send in one global order)."""
        received = replication.transfer(self.group, self.root, step, sources, rank=self.rank,
                                        local_world=self.local_world, world=self.world)
        if sources[self.rank] == "own":
            return read_copy(step_dir(own_dir(self.root, self.node), step), self.rank, self.layout)
        meta, data = received
        if replication.UNAVAILABLE in meta:
            raise ValueError(f"replica unavailable ({meta[replication.UNAVAILABLE]})")
        return meta, check_copy(meta, data, self.rank, self.layout)

    def remove_node_dir(self) -> None:
        """The run finished: its snapshots are no longer needed (the node's local rank 0 calls it)."""
        shutil.rmtree(self.root / f"node{self.node}", ignore_errors=True)
        try:
            self.root.rmdir()
        except OSError:
            pass  # another node's directory is still there
