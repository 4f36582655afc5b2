"""The bytes of one rank's snapshot, and what makes a copy genuine.

`rank<r>.bin` holds the local data of every ShardedTensor of `sharded_state` (each at a 64-byte
aligned offset) followed by one torch.save blob with the common state and the ShardedObjects;
`rank<r>.json` (the metadata) says where each tensor is (key, global offset, flattened range, dtype,
shape), whose copy it is (run id, rank, parallel layout), the xxh3-64 checksum of the .bin, and the seal:
an HMAC of all of that under a key derived from the run's secret.

`SnapshotFormat` is the one place that seals a copy and checks one before anything is unpickled: a
copy read back from shared memory or received from a peer passes `verify` before `load` sees it.
A copy of another run (a stale /dev/shm directory, a foreign memory_dir, a peer of another job) or
one whose metadata was altered fails the seal and is never loaded. The data's own checksum stays xxh3
(corruption, at copy speed); the seal binds it to the run. What the seal covers and how it is keyed
lives here and nowhere else.
"""

from __future__ import annotations

import io
import json
import mmap
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from megatron.core.dist_checkpointing import ShardedObject, ShardedTensor
from megatron.core.dist_checkpointing.dict_utils import dict_list_map_inplace, merge, nested_values
from megatron.core.dist_checkpointing.mapping import apply_factory_merges
from megatron.core.dist_checkpointing.state_dict_utils import load_preprocess, save_preprocess
from megatron.core.dist_checkpointing.utils import extract_sharded_base

from resilient.core.secret import RunKey
from trainer.checkpoint import manifest
from trainer.checkpoint.memory import files, naming
from trainer.checkpoint.state import TrainState, apply_loaded, sharded_state

ALIGN = 64
FORMAT = 3
"""3: sealed with the run's id and an HMAC (2: xxh3-64 unsealed; 1: zlib CRC-32; older snapshots are
refused and the restart uses disk)."""
SEAL = "memory snapshot v1"
"""The purpose of the snapshot MAC's key (resilient.core.secret.RunKey)."""


@dataclass
class Staged:
    """One rank's snapshot copied into its shared-memory file, not yet sealed."""

    step: int
    directory: Path
    meta: dict[str, Any]
    buffer: mmap.mmap

    @property
    def nbytes(self) -> int:
        return int(self.meta["bytes"])


def _ident(item: ShardedTensor | ShardedObject) -> str:
    rng = getattr(item, "flattened_range", None)
    return f"{item.key}|{tuple(item.global_offset)}|{(rng.start, rng.stop) if rng is not None else None}"


def _dtype(name: str) -> torch.dtype:
    dtype = getattr(torch, name.removeprefix("torch."), None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"unknown dtype {name!r}")
    return dtype


def _sealed_bytes(meta: dict[str, Any]) -> bytes:
    return json.dumps({k: v for k, v in meta.items() if k != "mac"}, sort_keys=True, separators=(",", ":")).encode()


@dataclass(frozen=True)
class SnapshotFormat:
    """Writes and checks the copies of one run's tier. `key`: the run's (copies of another run, or whose
    seal fails, are refused; None: seals are not checked, for listing without the run's secret).
    `layout` (world, tp, pp, dp): copies of another layout are refused (None: any layout, for listing)."""

    key: RunKey | None = None
    layout: dict[str, int] | None = None

    # -- writing ------------------------------------------------------------------------------

    def stage(
        self, state: TrainState, directory: Path, rank: int, allocate: Callable[[Path, int], mmap.mmap]
    ) -> Staged:
        """The loop's part: build the sharded state and copy it into directory/rank<r>.bin (a mapped
        file of at least the size needed from `allocate`)."""
        tree = sharded_state(state, include_rng=True)
        sharded, common = save_preprocess(tree, validate_access_integrity=False)
        entries, tensors, objects, offset = [], [], {}, 0
        for item in nested_values(sharded):
            if isinstance(item, ShardedTensor):
                data = item.data.detach()
                nbytes = data.numel() * data.element_size()
                entries.append(
                    {
                        "id": _ident(item),
                        "dtype": str(data.dtype),
                        "shape": list(data.shape),
                        "start": offset,
                        "nbytes": nbytes,
                    }
                )
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
        files.make_dir(directory)
        (directory / naming.COMMITTED).unlink(missing_ok=True)  # a step trained again (after a fallback) is new
        naming.meta_file(directory, rank).unlink(missing_ok=True)
        buffer = allocate(naming.data_file(directory, rank), total)
        flat = torch.frombuffer(buffer, dtype=torch.uint8, count=total) if total else None
        for entry, data in zip(entries, tensors, strict=True):
            if entry["nbytes"]:
                start = entry["start"]
                flat[start : start + entry["nbytes"]].view(data.dtype).view(data.shape).copy_(data)
        del flat
        buffer[offset:total] = blob_bytes
        meta = {
            "format": FORMAT,
            "step": state.step,
            "rank": rank,
            "layout": self.layout,
            "tensors": entries,
            "common": {"start": offset, "nbytes": len(blob_bytes)},
            "bytes": total,
        }
        return Staged(state.step, directory, meta, buffer)

    def seal(self, staged: Staged) -> bytes:
        """The background part: seal the staged bytes and write rank<r>.json; returns the metadata's
        bytes (what a replica carries with the data)."""
        assert self.key is not None, "only a run's own tier writes snapshots"
        staged.meta["xxh3"] = manifest.hexdigest(memoryview(staged.buffer)[: staged.nbytes], "xxh3")
        staged.meta["run_id"] = self.key.run_id
        staged.meta["mac"] = self.key.mac(SEAL, _sealed_bytes(staged.meta))
        text = json.dumps(staged.meta).encode()
        files.write_private(naming.meta_file(staged.directory, staged.meta["rank"]), text)
        return text

    # -- checking -----------------------------------------------------------------------------

    def check_meta(self, meta: dict[str, Any], size: int, rank: int) -> None:
        """What can be checked without reading the data: the seal, whose, which layout, the size."""
        if meta.get("format") != FORMAT:
            raise ValueError(f"format {meta.get('format')!s:.20}, not {FORMAT} (written by another version)")
        if self.key is not None:
            if meta.get("run_id") != self.key.run_id:
                raise ValueError(
                    f"a snapshot of run {meta.get('run_id')!s:.40}, not of this run ({self.key.run_id}); refusing it"
                )
            if not self.key.verify(SEAL, _sealed_bytes(meta), meta.get("mac")):
                raise ValueError("its seal does not verify (metadata altered or forged)")
        if meta.get("rank") != rank:
            raise ValueError("not this rank's snapshot")
        if self.layout is not None and meta.get("layout") != self.layout:
            raise ValueError(f"other layout {meta.get('layout')}")
        if not isinstance(meta.get("bytes"), int) or meta["bytes"] < 0:
            raise ValueError("metadata without a size")
        if size < meta["bytes"]:
            raise ValueError(f"size {size} < {meta['bytes']}")

    def verify(self, meta: dict[str, Any], data: bytearray, rank: int) -> bytearray:
        """`data` (at least the snapshot's size) checked against `meta`: the snapshot's bytes, ready
        for `load`. Raises ValueError with the problem."""
        self.check_meta(meta, len(data), rank)
        nbytes = meta["bytes"]
        if manifest.hexdigest(memoryview(data)[:nbytes], "xxh3") != meta.get("xxh3"):
            raise ValueError("checksum mismatch")
        return data if len(data) == nbytes else data[:nbytes]

    def read(self, directory: Path, rank: int) -> tuple[dict[str, Any], bytearray]:
        """A committed, verified copy from a step directory: (meta, data). Raises ValueError with the problem."""
        meta = read_meta(directory, rank)
        try:
            data = files.read_prefix(naming.data_file(directory, rank), int(meta["bytes"]))
        except OSError as err:
            raise ValueError(f"unreadable: {err}") from None
        return meta, self.verify(meta, data, rank)

    def problem(self, directory: Path, rank: int, checksums: bool = True) -> str | None:
        """None if the copy is usable, else why not. Without `checksums` only what needs no read of the
        data: committed, metadata, layout, size (a restart verifies the copy it picks)."""
        try:
            if checksums:
                self.read(directory, rank)
            else:
                meta = read_meta(directory, rank)
                self.check_meta(meta, naming.data_file(directory, rank).lstat().st_size, rank)
        except OSError as err:
            return f"unreadable: {err}"
        except ValueError as err:
            return str(err)
        return None


def read_meta(directory: Path, rank: int) -> dict[str, Any]:
    """A committed copy's metadata, unchecked. Raises ValueError with the problem."""
    if not (directory / naming.COMMITTED).exists():
        raise ValueError("not committed")
    try:
        meta = json.loads(files.read_bytes(naming.meta_file(directory, rank)))
    except (OSError, ValueError) as err:
        raise ValueError(f"unreadable: {err}") from None
    if not isinstance(meta, dict):
        raise ValueError("unreadable: metadata is not an object")
    return meta


def load(state: TrainState, meta: dict[str, Any], data: bytearray) -> None:
    """Fill the loading tree from a copy `SnapshotFormat.verify` passed and put it into the live objects."""
    buffer = data  # owned and writable: tensors below are views of it
    flat = torch.frombuffer(buffer, dtype=torch.uint8) if buffer else torch.empty(0, dtype=torch.uint8)
    tensors = {}
    for entry in meta["tensors"]:
        start, nbytes = entry["start"], entry["nbytes"]
        tensors[entry["id"]] = flat[start : start + nbytes].view(_dtype(entry["dtype"])).view(entry["shape"])
    c = meta["common"]
    blob = torch.load(io.BytesIO(bytes(buffer[c["start"] : c["start"] + c["nbytes"]])), weights_only=True)
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
