"""Async distributed checkpoints with an atomic commit, verified loads and retention, on the
checkpointer's own schedule (disk and memory tier, adaptive.py) that `after_step` follows.

Save: stage this rank's share into kept host buffers (the only blocking part), write and hash it in
a background thread at idle priority (trainer/checkpoint/writer.py), and when every rank's write is
done (megatron's collective finalize) rank 0 writes the marker with the manifest, then replaces
`latest`. Called at step boundaries on all ranks in lockstep.
"""

from __future__ import annotations

import logging
import os
import shutil
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing, parallel_state
from megatron.core.dist_checkpointing.serialization import get_default_save_sharded_strategy
from megatron.core.dist_checkpointing.strategies.fully_parallel import FullyParallelSaveStrategyWrapper

from resilient.core import ledger, permissions
from resilient.core.atomic import fsync_dir
from resilient.core.errors import CheckpointError, StorageFault
from resilient.core.events import LedgerEvent
from resilient.core.secret import RunKey
from resilient.rank.env import RankEnv
from trainer import compat
from trainer.checkpoint import manifest, ondisk, policy, writer
from trainer.checkpoint.adaptive import AdaptiveInterval
from trainer.checkpoint.config import CheckpointConfig
from trainer.checkpoint.memory import choice, snapshot
from trainer.checkpoint.memory.ring import Ring
from trainer.checkpoint.memory.snapshot import SnapshotFormat
from trainer.checkpoint.memory.tier import MemoryTier, root_problem
from trainer.checkpoint.state import TrainState, apply_loaded, sharded_state
from trainer.model import params_gathered

log = logging.getLogger(__name__)


def schedule_changes(saved: dict[str, Any], current: dict[str, Any]) -> dict[str, list[Any]]:
    """Scheduler settings that differ between a checkpoint and this run: name -> [saved, now]."""
    return {
        k: [saved[k], current[k]]
        for k in sorted(saved.keys() & current.keys())
        if k != "num_steps" and saved[k] != current[k]
    }


@dataclass(frozen=True)
class StepSave:
    """What `after_step` did at one step boundary."""

    tier: str | None
    """"disk" (a save started), "memory" (a snapshot taken) or None (nothing was due)."""
    reason: str
    """Why: the trigger, or why nothing was due."""
    blocking_s: float
    """Seconds the loop was blocked by it."""


class Checkpointer:
    """One per rank; every public method is called by all ranks at the same step boundary."""

    def __init__(
        self,
        cfg: CheckpointConfig,
        run_dir: Path,
        env: RankEnv,
        *,
        final_step: int,
        device: torch.device,
        on_commit: Callable[[int, float, int], None] | None = None,
        on_save_start: Callable[[int], None] | None = None,
    ) -> None:
        """`env`: this rank's (its attempt; the run's failure history for the adaptive interval's MTBF; ranks
        per node, which place the memory tier's replicas; whether a configured memory directory that others
        own or can write is used anyway); `final_step`: the run's last step (always saved; never snapshot);
        `device`: where the schedule's agreement collective runs; `on_commit(step, total_seconds, bytes)`
        runs on rank 0 once a checkpoint is committed; `on_save_start(step)` runs on every rank before a disk
        save blocks the loop."""
        attempt = env.attempt
        self.cfg = cfg
        """As configured; the current intervals are the schedule's."""
        self.final_step = final_step
        self.on_commit, self.on_save_start = on_commit, on_save_start
        self.run_dir = run_dir
        self.attempt = attempt
        self.root = cfg.root(run_dir)
        self.key = RunKey.of(run_dir)
        """Seals this run's checkpoints and snapshots; another run's are refused."""
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self.queue = writer.WriterQueue()
        self.staging = writer.Staging()
        writer.configure()
        dp_group = parallel_state.get_data_parallel_group(with_context_parallel=True)
        self.strategy = FullyParallelSaveStrategyWrapper(get_default_save_sharded_strategy(), dp_group)
        self.last_save_step: int | None = None
        self.last_save_time = time.monotonic()
        self.failed_saves = 0
        self.last_agreeing_step: int | None = None
        """The last step whose replica check agreed (the trainer sets it): recorded in each checkpoint, and
        retention keeps the newest checkpoint at or before it, where a silent-data-corruption finding resumes."""
        self._pending_blocking = 0.0
        self._retention: threading.Thread | None = None
        if self.rank == 0:
            self.root.mkdir(parents=True, exist_ok=True, mode=0o700)
            self._clean_leftovers()
        self.memory: MemoryTier | None = None
        if cfg.memory_interval_steps:
            memory_root = cfg.memory_root(run_dir, self.key)
            problem = None if env.allow_shared_dir or cfg.memory_dir is None else permissions.path_problem(memory_root)
            problem = self._agree(problem or root_problem(memory_root, self.key.run_id, run_dir))
            if problem is None:
                self.memory = MemoryTier(
                    memory_root,
                    rank=self.rank,
                    ring=Ring(self.world, env.local_world_size),
                    fmt=SnapshotFormat(self.key, self._layout()),
                    keep_last=cfg.memory_keep_last,
                    on_commit=self._on_memory_commit if self.rank == 0 else None,
                )
            elif self.rank == 0:  # never the end of the run: disk checkpoints go on as configured
                log.warning("memory tier off: %s; saving to disk only", problem)
                ledger.append(run_dir, LedgerEvent.MEM_TIER_OFF, attempt=attempt, reason=problem[:500])
        self.schedule = AdaptiveInterval(
            cfg, run_dir, attempt=attempt, is_logger=self.rank == 0, device=device, history=env.history
        )
        dist.barrier()
        try:
            # Held open for the life of the process: while it is, the directory's inode cannot be reused,
            # so a directory removed and re-created at the same path (by a save racing the removal, on a
            # file system that hands the freed inode number straight back) never passes for the original.
            self._root_fd = os.open(self.root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError:
            raise StorageFault(f"checkpoint directory {self.root} vanished at start") from None
        self.root_id = permissions.DirId.of_fd(self._root_fd)
        """The checkpoint directory as this attempt found it: one that vanishes or is replaced is a storage
        fault, never written to or loaded from."""

    def _agree(self, problem: str | None) -> str | None:
        """The first rank's problem, on every rank (a collective)."""
        problems: list[str | None] = [None] * self.world
        dist.all_gather_object(problems, problem)
        return next((f"rank {r}: {p}" for r, p in enumerate(problems) if p), None)

    def root_problem(self) -> str | None:
        """Why the checkpoint directory is no longer the one this attempt started with, or None."""
        return permissions.identity_problem(self.root, self.root_id, permissions.DirId.of(self.root))

    def _layout(self) -> dict[str, int]:
        return {
            "world": self.world,
            "tp": parallel_state.get_tensor_model_parallel_world_size(),
            "pp": parallel_state.get_pipeline_model_parallel_world_size(),
            "dp": parallel_state.get_data_parallel_world_size(),
        }

    # -- the schedule -----------------------------------------------------------------------

    def start(self, step: int) -> None:
        """Before the first step of the attempt (after `resume`): the schedule takes up what earlier
        attempts decided and measured."""
        self.schedule.start(step)

    @property
    def intervals(self) -> dict[str, int]:
        """Each tier's current interval in steps (the tiers that are on)."""
        return self.schedule.intervals

    def after_step(self, state: TrainState, *, stop_requested: bool, excluded_s: float = 0.0) -> StepSave:
        """At every step boundary, after `state.step` was trained: finalize the saves whose write
        finished; save to disk when due (a stop request and the final step always are), else snapshot
        to memory when due; then feed the schedule this iteration. `excluded_s` (evaluation) is not loop
        time a save could have cost."""
        self.poll()
        step, tier, blocking = state.step, None, 0.0
        decision = policy.should_save(
            self.cfg,
            interval_steps=self.schedule.current["disk"],
            step=step,
            final_step=self.final_step,
            last_save_step=self.last_save_step,
            seconds_since_save=time.monotonic() - self.last_save_time,
            stop_requested=stop_requested,
        )
        if decision.yes:
            if self.on_save_start is not None:
                self.on_save_start(step)
            tier, blocking = "disk", self.save(state)
        else:
            decision = self._snapshot_due(step)
            if decision.yes:
                tier, blocking = "memory", self.snapshot(state)
        self.schedule.iteration_done(step, tier, in_flight=self.in_flight, excluded_s=excluded_s, blocking_s=blocking)
        return StepSave(tier, decision.reason, blocking)

    def _snapshot_due(self, step: int) -> policy.SaveDecision:
        last = self.memory.last_step if self.memory and self.cfg.adaptive else None
        return policy.should_snapshot(
            self.schedule.current["memory"] if self.memory else 0,
            step=step,
            final_step=self.final_step,
            disk_saved=self.last_save_step == step,
            last_snapshot=last,
        )

    # -- saving ---------------------------------------------------------------------------

    def _on_memory_commit(self, step: int, size: int, replicated: bool) -> None:
        ledger.append(
            self.run_dir, LedgerEvent.MEM_SNAPSHOT, step=step, attempt=self.attempt, bytes=size, replicated=replicated
        )

    def snapshot(self, state: TrainState) -> float:
        """Copy `state` into the memory tier; returns the seconds the loop was blocked."""
        started = time.monotonic()
        assert self.memory is not None
        with params_gathered(state.chunks):
            self.memory.snapshot(state)
        return time.monotonic() - started

    def save(self, state: TrainState) -> float:
        """Start saving `state.step`; returns the seconds the training loop was blocked."""
        started = time.monotonic()
        self.poll(blocking=True)  # one save in flight at a time: finish the previous first
        step, ckpt_dir = state.step, ondisk.step_dir(self.root, state.step)
        gone = self._agree(self.root_problem())
        if gone:  # every rank stops alike (STORAGE_FAULT): nothing is saved into, or loaded from, what took its place
            raise StorageFault(gone)
        if (ckpt_dir / ondisk.MARKER).exists():
            self.last_save_step = step
            return time.monotonic() - started
        problem = self._space_problem(state)
        if self.rank == 0 and problem is None:
            problem = ondisk.latest_problem(self.root)  # rank 0 alone would fail it, after the collectives
        if self.rank == 0 and problem is None:
            try:
                if ckpt_dir.exists():
                    shutil.rmtree(ckpt_dir)  # an uncommitted leftover of the same step
                ckpt_dir.mkdir(mode=0o700)
            except OSError as err:
                problem = f"cannot create {ckpt_dir}: {err}"
        # Agree before megatron's save: its rank-0 writes sit between collectives, so a rank that
        # failed inside it would leave the others waiting. A skipped save is reported, training goes on.
        refused = self._agree(problem)
        if refused:
            self._report_failure(step, refused)
            self.last_save_time = time.monotonic()  # the next trigger tries again
            return time.monotonic() - started
        with params_gathered(state.chunks):  # the weights as the next forward sees them, not stale shards
            request = compat.save_async(sharded_state(state, include_rng=True), str(ckpt_dir), self.strategy)
            if request.async_fn is not None:  # None: nothing to write on this rank
                # Async: staged on the loop, written by an idle-priority thread. Sync: written from the
                # live tensors while the loop waits, so nothing is copied.
                request = request._replace(
                    async_fn=writer.writer_fn(request, ckpt_dir, self.rank),
                    preload_fn=partial(self.staging.stage, request.async_fn_args[1]) if self.cfg.async_save else None,
                )
            request = request._replace(
                finalize_fns=[
                    *request.finalize_fns,
                    partial(
                        self._commit,
                        step,
                        ckpt_dir,
                        started,
                        state.consumed_samples,
                        state.consumed_tokens,
                        state.identity,
                        self.last_agreeing_step,
                    ),
                ],
            )
            self.queue.idle = self.cfg.async_save
            self.queue.schedule_async_request(request)
        blocking = time.monotonic() - started
        self.last_save_step, self.last_save_time = step, time.monotonic()
        self._pending_blocking = blocking
        if not self.cfg.async_save:
            self.poll(blocking=True)
            blocking = time.monotonic() - started
        return blocking

    @property
    def in_flight(self) -> bool:
        """A save's background write is not finalized yet (the same on every rank after `poll`)."""
        return bool(self.queue.get_num_unfinalized_calls())

    def poll(self, blocking: bool = False) -> None:
        """Finalize saves whose background write finished (a collective: call on every rank)."""
        if not self.queue.get_num_unfinalized_calls():
            return
        try:
            self.queue.maybe_finalize_async_calls(blocking=blocking)
        except Exception as err:  # a failed write (ENOSPC, I/O error) never stops training
            self._report_failure(self.last_save_step, str(err))
            self.last_save_step = None
            self.queue = writer.WriterQueue()

    def _report_failure(self, step: int | None, error: str) -> None:
        self.failed_saves += 1
        log.error("checkpoint save of step %s failed: %s", step, error)
        if self.rank == 0:
            ledger.append(self.run_dir, LedgerEvent.CKPT_SAVE_FAILED, step=step, error=error.splitlines()[0][:500])

    def _space_problem(self, state: TrainState) -> str | None:
        """Refuse a save that cannot fit: the last checkpoint's size (or, before the first one, this
        rank's state times the model-parallel ranks) plus 10%, against the free space of the filesystem."""
        committed = ondisk.committed_steps(self.root)
        try:
            need = (
                manifest.read_manifest(ondisk.step_dir(self.root, committed[-1])).get("bytes", 0) if committed else None
            )
        except ValueError:
            need = None  # an unreadable marker: size the save as the first one
        if need is None:
            # parameters plus an fp32 main copy and two Adam moments each (14-16 B per parameter)
            local = sum(p.numel() * (p.element_size() + 12) for c in state.chunks for p in c.parameters())
            need = local * self.world // parallel_state.get_data_parallel_world_size()
        need = int(need * 1.1)
        try:
            free = shutil.disk_usage(self.root).free
        except OSError as err:
            return f"cannot stat the checkpoint filesystem: {err.strerror or err}"
        if free < need:
            return f"No space left on the checkpoint filesystem: {free:,} bytes free, a checkpoint needs ~{need:,}"
        return None

    def finish(self) -> None:
        """Wait for the save in flight and for retention (end of run or stop)."""
        self.poll(blocking=True)
        if self._retention is not None:
            self._retention.join()
        if self.memory is not None:
            self.memory.wait()

    def distrust_after(self, step: int | None) -> dict[str, list[int]]:
        """A silent-data-corruption finding: nothing saved after `step` (None: nothing at all) may be
        resumed. Rank 0 moves those disk checkpoints aside (`step_N.sdc-<time>`, kept for forensics, never
        loaded) and points `latest` at the newest left; each node withdraws its memory snapshots after it.
        All ranks call it after `finish`. Returns what was withdrawn (disk steps on rank 0; memory steps of
        every node)."""
        out: dict[str, list[int]] = {"disk": [], "memory": []}
        if self.rank == 0:
            stamp = int(time.time())
            for found in ondisk.committed_steps(self.root):
                if step is None or found > step:
                    path = ondisk.step_dir(self.root, found)
                    path.rename(path.with_name(f"{path.name}.sdc-{stamp}"))
                    out["disk"].append(found)
            if out["disk"]:
                fsync_dir(self.root)
                left = ondisk.committed_steps(self.root)
                if left:
                    ondisk.write_latest(self.root, left[-1])
                else:
                    (self.root / ondisk.LATEST).unlink(missing_ok=True)
        withdrawn = self.memory.distrust_after(step) if self.memory is not None else []
        if self.last_save_step is not None and (step is None or self.last_save_step > step):
            self.last_save_step = None
        every: list[list[int]] = [None] * self.world  # type: ignore[list-item]
        dist.all_gather_object(every, withdrawn)  # also the barrier: done everywhere before anyone goes on
        out["memory"] = sorted({s for steps in every for s in steps})
        return out

    def discard_memory(self) -> None:
        """The run finished and its final step is on disk: drop this node's memory tier (all ranks call)."""
        if self.memory is None:
            return
        self.memory.wait()
        dist.barrier()
        if self.memory.node_leader:
            self.memory.remove_node_dir()

    def _commit(
        self,
        step: int,
        ckpt_dir: Path,
        started: float,
        consumed_samples: int,
        consumed_tokens: int,
        identity: dict[str, Any],
        last_agreeing_step: int | None,
    ) -> None:
        if self.rank != 0:
            return
        meta = {
            "step": step,
            "consumed_samples": consumed_samples,
            "consumed_tokens": consumed_tokens,
            "world_size": self.world,
            "identity": identity,
            "last_agreeing_step": last_agreeing_step,
            "parallel": {
                "tp": parallel_state.get_tensor_model_parallel_world_size(),
                "pp": parallel_state.get_pipeline_model_parallel_world_size(),
                "dp": parallel_state.get_data_parallel_world_size(),
            },
        }
        written = manifest.commit(ckpt_dir, meta, self.key)
        ondisk.write_latest(self.root, step)
        total = time.monotonic() - started
        ledger.append(
            self.run_dir,
            LedgerEvent.CKPT_SAVE,
            step=step,
            blocking_seconds=round(self._pending_blocking, 6),
            total_seconds=round(total, 6),
            bytes=written["bytes"],
        )
        if self.on_commit is not None:
            self.on_commit(step, total, written["bytes"])
        self._start_retention(step)

    def _start_retention(self, newest: int) -> None:
        committed = ondisk.committed_steps(self.root)
        trusted = policy.newest_at_most(committed, self.last_agreeing_step)
        doomed = policy.to_delete(
            committed,
            keep_last=self.cfg.keep_last,
            keep_every=self.cfg.keep_every,
            protected={newest} | ({trusted} if trusted is not None else set()),
        )
        if not doomed:
            return
        if self._retention is not None:
            self._retention.join()
        self._retention = threading.Thread(target=self._delete, args=(doomed,), name="ckpt-retention", daemon=True)
        self._retention.start()

    def _delete(self, steps: list[int]) -> None:
        for step in steps:
            path = ondisk.step_dir(self.root, step)
            (path / ondisk.MARKER).unlink(missing_ok=True)  # uncommit first: never half a "complete" one
            shutil.rmtree(path, ignore_errors=True)

    def _quarantine(self, ckpt_dir: Path) -> None:
        """Move a damaged checkpoint out of the way (kept for forensics, never loaded or overwritten)."""
        target = ckpt_dir.with_name(f"{ckpt_dir.name}.damaged-{int(time.time())}")
        ckpt_dir.rename(target)
        fsync_dir(self.root)
        log.warning("moved damaged checkpoint %s to %s", ckpt_dir.name, target.name)

    def _clean_leftovers(self) -> None:
        """Directories a crash left without a marker, and stray temp files, are removed at start."""
        for path in ondisk.step_dirs(self.root).values():
            if not (path / ondisk.MARKER).exists():
                log.info("removing incomplete checkpoint %s", path.name)
                shutil.rmtree(path, ignore_errors=True)
        for tmp in self.root.glob(".latest.tmp.*"):
            tmp.unlink(missing_ok=True)

    # -- loading --------------------------------------------------------------------------

    def resume(self, state: TrainState, *, memory: bool = True, at_most: int | None = None) -> int | None:
        """Load the newest intact checkpoint into `state`: from the memory tier when every rank has a
        valid copy of a step newer than the newest committed disk checkpoint, else from disk (falling
        back past damaged ones); None when there is none (`state` untouched). `at_most`: nothing saved
        after that step (a re-execution starts from trusted state; `checkpoint.load_step` does not
        apply). Raises CheckpointError when one was asked for and cannot be used."""
        why = None
        gone = self._agree(self.root_problem())
        if gone:
            raise StorageFault(gone)
        load_step = self.cfg.load_step if at_most is None else None
        if memory and self.memory is not None and load_step is None:
            step, why = self._resume_memory(state, at_most)
            if step is not None:
                return step
        committed = [s for s in ondisk.committed_steps(self.root) if at_most is None or s <= at_most]
        candidates = policy.load_candidates(committed, load_step=load_step)
        skipped: list[tuple[int, str]] = []
        for step in candidates:
            ckpt_dir = ondisk.step_dir(self.root, step)
            problems: list[str | None] = [None] * self.world
            # Another run's checkpoint (or one sealed by none) raises CheckpointError on every rank alike.
            local = manifest.verify(
                ckpt_dir, checksums=self.cfg.verify_checksums, share=(self.rank, self.world), key=self.key
            )
            dist.all_gather_object(problems, local)
            problem = next((p for p in problems if p), None)
            if problem:
                if load_step is not None:
                    raise CheckpointError(f"checkpoint step {step} is damaged: {problem}")
                skipped.append((step, problem))
                if self.rank == 0:
                    self._quarantine(ckpt_dir)
                continue
            started = time.monotonic()
            common = compat.load_common(ckpt_dir)["common"]
            mismatch = manifest.identity_mismatch(common["identity"], state.identity)
            if mismatch:
                raise CheckpointError(f"checkpoint {ckpt_dir.name} is incompatible with this run's model: {mismatch}")
            tree = sharded_state(state, include_rng=common["world_size"] == self.world, is_loading=True)
            # The schedule follows this run's config (an extended run decays over its new length); the
            # checkpoint contributes only the step count. Differences go to the ledger below.
            state.scheduler.override_opt_param_scheduler = True
            apply_loaded(state, dist_checkpointing.load(tree, str(ckpt_dir)))
            changed = schedule_changes(common["scheduler"], state.scheduler.state_dict())
            if self.rank == 0:
                for bad, why in skipped:
                    log.warning("checkpoint step %d is damaged (%s); using step %d", bad, why, step)
                    ledger.append(self.run_dir, LedgerEvent.CKPT_FALLBACK, from_step=bad, to_step=step, reason=why)
                if changed:
                    ledger.append(self.run_dir, LedgerEvent.LR_SCHEDULE_CHANGED, step=step, changes=changed)
                ledger.append(
                    self.run_dir,
                    LedgerEvent.CKPT_LOAD,
                    rank=0,
                    step=step,
                    seconds=round(time.monotonic() - started, 6),
                    attempt=self.attempt,
                    tier="disk",
                    **({"reason": why} if why else {}),
                )
            self.last_save_step = step
            return step
        if load_step is not None:
            raise CheckpointError(f"no checkpoint for step {load_step} in {self.root}")
        if skipped:
            raise CheckpointError(
                f"every checkpoint in {self.root} is damaged (newest: {skipped[0][1]}); refusing to start over"
            )
        return None

    def _resume_memory(self, state: TrainState, at_most: int | None = None) -> tuple[int | None, str]:
        """Try the memory tier (all ranks), nothing after `at_most`: (step loaded or None, why)."""
        assert self.memory is not None
        started = time.monotonic()
        inventories: list[choice.Inventory] = [None] * self.world  # type: ignore[list-item]
        dist.all_gather_object(inventories, self.memory.inventory())
        disk_step = policy.newest_at_most(ondisk.committed_steps(self.root), at_most)
        while True:  # verify only the copies chosen; a bad one is passed over and the choice taken again
            chosen = choice.choose_tier(inventories, disk_step=disk_step, at_most=at_most)
            if chosen.step is None:
                if self.rank == 0:
                    log.info("memory tier not used: %s", chosen.reason)
                return None, chosen.reason
            problem = None
            try:
                meta, data = self.memory.fetch(chosen.step, chosen.sources)
            except (ValueError, OSError) as err:
                problem = str(err)
            problems: list[str | None] = [None] * self.world
            dist.all_gather_object(problems, problem)
            if not any(problems):
                break
            inventories = choice.mark_failed(inventories, chosen, problems)
        try:
            state.scheduler.override_opt_param_scheduler = True
            snapshot.load(state, meta, data)
        except (ValueError, KeyError, TypeError, RuntimeError, OSError) as err:
            problem = f"rank {self.rank}: {type(err).__name__}: {err}"
        dist.all_gather_object(problems, problem)
        problem = next((p for p in problems if p), None)
        if problem:
            why = f"memory step {chosen.step} did not load ({problem}); {chosen.reason}"
            if self.rank == 0:
                log.warning("%s; falling back to disk", why)
                ledger.append(
                    self.run_dir,
                    LedgerEvent.CKPT_FALLBACK,
                    from_step=chosen.step,
                    to_step=None,
                    from_tier=chosen.tier,
                    reason=why[:500],
                )
            return None, why
        if self.rank == 0:
            ledger.append(
                self.run_dir,
                LedgerEvent.CKPT_LOAD,
                rank=0,
                step=chosen.step,
                seconds=round(time.monotonic() - started, 6),
                attempt=self.attempt,
                tier=chosen.tier,
                sources=list(chosen.sources),
                reason=chosen.reason[:500],
            )
        log.info("resumed from memory tier (%s) step %d: %s", chosen.tier, chosen.step, chosen.reason)
        return chosen.step, chosen.reason
