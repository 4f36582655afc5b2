"""The background writer of a rank's checkpoint share: a thread of the rank, at idle CPU priority.

megatron's async save forks the rank (TemporalAsyncCaller), and on CPU its staging copies nothing:
the fork's copy-on-write is the snapshot, paid page by page by the next optimizer step; the writer
forks once more per file, and the files were then read back to be hashed, all competing with training
for the cores. Here the loop copies its share once into buffers kept from save to save (the memcpy
floor, no page faults after the first save); a thread that runs when a core is otherwise idle
(SCHED_IDLE) writes each file and checksums it in the same pass (file writes and xxh3 release the
GIL); when the loop has to wait for it (the next save, the end of the run) it gets normal priority.
A synchronous save runs the same writer at normal priority from the live tensors, without staging.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from megatron.core.dist_checkpointing.strategies import filesystem_async
from megatron.core.dist_checkpointing.strategies.async_utils import AsyncCaller, AsyncCallsQueue, AsyncRequest
from torch.distributed.checkpoint.filesystem import SerializationFormat, _StorageWriterTransforms, _write_item
from torch.utils.serialization import config as serialization_config

from resilient.core import sched
from trainer.checkpoint import manifest

log = logging.getLogger(__name__)

# (file path, storage key, (byte items, tensor items)): megatron's FileSystemWriterAsync write bucket
Bucket = tuple[str, str, tuple[list[tuple[Any, Any]], list[tuple[Any, torch.Tensor]]]]


def configure() -> None:
    """Process-wide settings the writer relies on, set once by the checkpointer:
    - megatron's writer reports through a process-shared queue (a Manager server process); the writer
      is a thread here, so a plain queue does, and no server process exists to outlive the rank;
    - torch.save's zip records skip their own CRC-32: the manifest's checksum (hashed as each file is
      written, verified before anything is loaded) covers every byte, and the second hash was most
      of the writer's CPU time (torch.load does not check it)."""
    if not isinstance(filesystem_async._results_queue, queue.Queue):
        filesystem_async._results_queue = queue.Queue()
    serialization_config.save.compute_crc32 = False


class Staging:
    """Host copies of this rank's share of a checkpoint, kept between saves: after the first save a
    stage is one memcpy, without page faults (the loop's only cost of an async save)."""

    def __init__(self) -> None:
        self._buffers: dict[tuple[int, int], torch.Tensor] = {}

    def stage(self, buckets: list[Bucket]) -> list[Bucket]:
        kept: dict[tuple[int, int], torch.Tensor] = {}
        staged: list[Bucket] = []
        for b, (path, key, (byte_items, tensor_items)) in enumerate(buckets):
            copies = []
            for i, (item, tensor) in enumerate(tensor_items):
                buf = self._buffers.get((b, i))
                if buf is None or buf.shape != tensor.shape or buf.dtype != tensor.dtype:
                    buf = torch.empty(tensor.shape, dtype=tensor.dtype)
                kept[(b, i)] = buf.copy_(tensor)
                copies.append((item, buf))
            staged.append((path, key, (byte_items, copies)))
        self._buffers = kept
        return staged

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self._buffers.values())


class _HashingStream:
    """A file that hashes what goes through it: the checksum costs no second read of the file.
    Append-only on purpose (no seek), so the digest is the file's."""

    def __init__(self, f: Any) -> None:
        self.file, self.digest = f, manifest.new_digest()

    def write(self, data: Any) -> int:
        self.digest.update(data)
        return self.file.write(data)

    def tell(self) -> int:
        return self.file.tell()

    def flush(self) -> None:
        self.file.flush()


def write_share(
    transforms: Any, ckpt_dir: Path, rank: int, _rank: int, buckets: list[Bucket], results_queue: queue.Queue
) -> None:
    """Write this rank's files (one per bucket, fsynced), their checksums for the manifest, and hand
    megatron's finalize the write results (or the exception) as its own writer does."""
    results: dict[int, list[Any]] | Exception = {}
    try:
        sums = {}
        for index, (path, storage_key, (byte_items, tensor_items)) in enumerate(buckets):
            with open(path, "wb") as f:
                stream = _HashingStream(f)
                results[index] = [
                    _write_item(
                        transforms, stream, data, item, storage_key, serialization_format=SerializationFormat.TORCH_SAVE
                    )
                    for item, data in [*byte_items, *tensor_items]
                ]
                f.flush()
                os.fsync(f.fileno())
                sums[Path(path).name] = {"size": f.tell(), manifest.CHECKSUM: stream.digest.hexdigest()}
        manifest.write_rank_sums(ckpt_dir, rank, sums)
    except Exception as err:  # reported by megatron's finalize on every rank
        log.error("checkpoint writer failed: %s", err)
        results = err
    results_queue.put(results)


def writer_fn(request: AsyncRequest, ckpt_dir: Path, rank: int) -> Callable[..., None]:
    """`write_share` in place of megatron's forking writer, with the storage transforms it was given."""
    transform_list = request.async_fn.args[0]  # partial(write_preloaded_data_multiproc, transforms, msc)
    transforms = transform_list[0] if transform_list else _StorageWriterTransforms()
    return lambda *args: write_share(transforms, ckpt_dir, rank, *args)


def _set_idle(tid: int, idle: bool) -> None:
    if not sched.set_idle(tid, idle):  # not fatal: the writer then competes with the loop as before
        log.debug("cannot change the checkpoint writer's priority")


class ThreadCaller(AsyncCaller):
    """megatron's AsyncCaller contract (a collective completion check), run in a thread."""

    def __init__(self, idle: bool) -> None:
        self.idle = idle
        self.thread: threading.Thread | None = None
        self.tid: int | None = None

    def schedule_async_call(self, async_req: AsyncRequest) -> None:
        if async_req.async_fn is None:
            return
        args = list(async_req.async_fn_args)
        if async_req.preload_fn:
            args[1] = async_req.preload_fn()  # staging: on the loop, before it changes the state
        started = threading.Event()

        def run() -> None:
            self.tid = threading.get_native_id()
            if self.idle:
                _set_idle(self.tid, True)
            started.set()
            async_req.async_fn(*args, **async_req.async_fn_kwargs)

        self.thread = threading.Thread(target=run, name="ckpt-writer", daemon=True)
        self.thread.start()
        started.wait()

    def is_current_async_call_done(self, blocking: bool = False, no_dist: bool = False) -> bool:
        alive = int(self.thread is not None and self.thread.is_alive())
        if blocking and alive and self.idle and self.tid is not None:
            _set_idle(self.tid, False)  # the loop waits for it now
        done = not alive if no_dist else self.sync_all_async_calls(alive)
        if done or blocking:
            self.close()
            done = True
        return done

    def close(self, abort: bool = False) -> None:
        if self.thread is not None and not abort:
            self.thread.join()
        self.thread = None

    def __del__(self) -> None:  # megatron's base class raises here
        pass


class WriterQueue(AsyncCallsQueue):
    """megatron's queue of saves in flight, with thread writers; `idle` for the next one scheduled."""

    def __init__(self) -> None:
        super().__init__(persistent=False)
        self.idle = True

    def _get_async_caller(self) -> AsyncCaller:
        return ThreadCaller(self.idle)
