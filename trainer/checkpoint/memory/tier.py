"""The memory tier as a rank uses it: snapshot at a step boundary, finish in the background, offer and
fetch copies at a restart.

The loop pays only the copy into a mapped file (slots.py); sealing, the replica (replication.py) and
the commit run on a background thread, one snapshot at a time, in the same order on every rank. A
step's COMMITTED marker is written by each node's local rank 0 once every rank of the job voted its
copy written, sealed and replicated (one vote on the tier's transport): the disk tier's commit rule.
A restart verifies the copy it picks (snapshot.py) before anything is unpickled, and works for the
same run and layout only (another layout falls back to disk). A root that is not this user's own or
holds another run's snapshots is not used at all (`root_problem`: the checkpointer then saves to disk
only).
"""

from __future__ import annotations

import json
import logging
import queue
import shutil
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch.distributed as dist

from trainer.checkpoint.memory import files, listing, naming, replication, retention
from trainer.checkpoint.memory.choice import Inventory, holder_in
from trainer.checkpoint.memory.ring import Ring
from trainer.checkpoint.memory.slots import Slots
from trainer.checkpoint.memory.snapshot import SnapshotFormat, Staged
from trainer.checkpoint.memory.transport import GlooTransport, Transport
from trainer.checkpoint.state import TrainState

log = logging.getLogger(__name__)


def root_problem(root: Path, run_id: str, run_dir: Path) -> str | None:
    """Why `root` cannot hold this run's tier (not an owner-only directory of this user, unusable, or
    another run's), or None; claims it for the run otherwise."""
    return files.root_problem(root) or files.claim_root(root / naming.OWNER, run_id, run_dir)


class MemoryTier:
    """One per rank. `snapshot` is called by all ranks at the same step boundary."""

    def __init__(
        self,
        root: Path,
        *,
        rank: int,
        ring: Ring,
        fmt: SnapshotFormat,
        keep_last: int,
        on_commit: Callable[[int, int, bool], None] | None = None,
        transport: Transport | None = None,
    ) -> None:
        """`root` passed `root_problem` on every rank; `transport` defaults to a gloo group of the tier's own
        (its collectives run off the loop)."""
        self.root, self.rank, self.ring, self.fmt, self.keep_last = root, rank, ring, fmt, keep_last
        self.node = ring.node_of(rank)
        self.on_commit = on_commit
        """Called on the background thread after each commit with (step, bytes, replicated)."""
        self.transport = transport if transport is not None else GlooTransport(dist.new_group(backend="gloo"))
        self.last_step: int | None = None
        self.last_committed: int | None = None
        self.failures = 0
        self._jobs: queue.Queue[Staged | int] = queue.Queue()
        self._worker = threading.Thread(target=self._work, name="memory-tier", daemon=True)
        self._worker.start()
        files.make_dir(naming.own_dir(root, self.node))
        self.own = Slots(naming.own_dir(root, self.node), rank)
        src = ring.replica_of(rank)
        self.held = Slots(naming.replica_dir(root, self.node, ring.node_of(src)), src) if src is not None else None
        """The replica files this rank receives (None: one node)."""

    @property
    def node_leader(self) -> bool:
        """The node's local rank 0: it commits, and at the end removes, for the node."""
        return self.rank % self.ring.local_world == 0

    @property
    def bases(self) -> list[Path]:
        """This node's own snapshots, and the replicas it keeps."""
        return [s.base for s in (self.own, self.held) if s is not None]

    def snapshot(self, state: TrainState) -> None:
        """Copy `state` into shared memory (the loop's only cost); the rest happens in the background."""
        self._jobs.join()  # one snapshot in flight at a time
        for slots in (self.own, self.held):
            if slots is not None:
                slots.forget_gone()
        try:
            staged: Staged | int = self.fmt.stage(
                state, naming.step_dir(self.own.base, state.step), self.rank, self.own.take
            )
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
            self.transport.all_ok(False)
            self.failures += 1
            return
        ok = True
        try:
            meta = self.fmt.seal(staged)
            if self.held is not None:
                data = memoryview(staged.buffer)[: staged.nbytes]
                replication.exchange(self.transport, self.ring, self.root, self.rank, data, meta, self.held.take)
                data.release()  # on an error it goes with the frame
        except Exception:
            log.exception("memory snapshot of step %d not written", staged.step)
            ok = False
        if not self.transport.all_ok(ok):
            self.failures += 1
            return
        self.last_committed = staged.step
        if self.node_leader:
            for base in self.bases:
                files.write_private(
                    naming.step_dir(base, staged.step) / naming.COMMITTED, json.dumps({"step": staged.step}).encode()
                )
                retention.prune(base, self.keep_last)
        if self.on_commit is not None:
            self.on_commit(staged.step, staged.nbytes, self.held is not None)

    def inventory(self) -> Inventory:
        """What this rank offers at a restart, checksums not yet verified: `fetch` verifies the one
        chosen, so a restart hashes one copy per rank, not every one kept."""
        return listing.inventory(self.root, self.ring, self.rank, self.fmt, checksums=False)

    def fetch(self, step: int, sources: tuple[str, ...]) -> tuple[dict[str, Any], bytearray]:
        """This rank's verified copy of `step`: its own, or received from the rank holding its replica
        (every rank calls this: holders send in one global order). Raises ValueError with the problem."""
        received = replication.transfer(self.transport, self.ring, self.root, self.rank, step, sources)
        if holder_in(sources[self.rank]) is None:
            return self.fmt.read(naming.step_dir(self.own.base, step), self.rank)
        assert received is not None
        meta, data = received
        if replication.UNAVAILABLE in meta:
            raise ValueError(f"replica unavailable ({meta[replication.UNAVAILABLE]})")
        return meta, self.fmt.verify(meta, data, self.rank)

    def distrust_after(self, step: int | None) -> list[int]:
        """Withdraw this node's snapshots (own and replicas held) after `step`: a silent-data-corruption
        finding does not trust them (the node leader acts; after `wait`). Returns the steps withdrawn."""
        if not self.node_leader:
            return []
        return sorted({s for base in self.bases for s in retention.uncommit_after(base, step)})

    def remove_node_dir(self) -> None:
        """The run finished: its snapshots are no longer needed (the node leader calls it)."""
        shutil.rmtree(naming.node_dir(self.root, self.node), ignore_errors=True)
        try:
            if {p.name for p in self.root.iterdir()} <= {naming.OWNER}:  # another node's directory may remain
                (self.root / naming.OWNER).unlink(missing_ok=True)
                self.root.rmdir()
        except OSError:
            pass  # another node's directory appeared meanwhile
