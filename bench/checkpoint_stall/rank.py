"""One rank of the checkpoint-stall benchmark (started by run.py, two ranks, gloo).

Builds the real trainer state (megatron GPTModel + distributed-optimizer fp32 state), then trains in
blocks of `interval` steps, one mode per block, the modes rotating so that they share the machine's
load: `none` trains only; the others save at the start of the block and poll like the loop does, and
the block ends once that save is committed. A block's cost is its wall time minus `interval` times the
median step of the `none` blocks: what the save cost the loop in all, blocking call, copy-on-write
faults and CPU stolen by the writer included. Also reported: the memcpy floor (copy this rank's state
once, into a fresh buffer and into a reused one), the blocking call, minor page faults per block and
the CPU seconds the process and its children spent.

New modes go in MODES: a name -> function(trainer) returning the callable that starts one save.
"""

from __future__ import annotations

import json
import resource
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist

from resilient.config import load_config
from resilient.rank.env import RankEnv
from trainer.loop import Trainer


def state_tensors(trainer: Trainer) -> list[torch.Tensor]:
    """The rank's training state: model parameters and the optimizer's moments."""
    tensors = [p.data for chunk in trainer.chunks for p in chunk.parameters()]
    for opt in getattr(trainer.optimizer, "chained_optimizers", [trainer.optimizer]):
        for moments in opt.optimizer.state.values():
            tensors += [t for t in moments.values() if isinstance(t, torch.Tensor) and t.numel() > 1]
    return tensors


def disk_save(async_save: bool) -> Callable[[Trainer], Callable[[], None]]:
    def setup(trainer: Trainer) -> Callable[[], None]:
        ckpt = trainer.checkpointer

        def save() -> None:
            ckpt.cfg.async_save = async_save
            ckpt.save(trainer.state)

        return save

    return setup


def memory_snapshot(trainer: Trainer) -> Callable[[], None]:
    ckpt = trainer.checkpointer
    assert ckpt.memory is not None, "memory mode needs checkpoint.memory_interval_steps > 0 (run.py sets it)"
    return lambda: ckpt.snapshot(trainer.state)


MODES: dict[str, Callable[[Trainer], Callable[[], None]] | None] = {
    "none": None,
    "async": disk_save(True),
    "sync": disk_save(False),
    "memory": memory_snapshot,  # the in-memory tier (single node: no replica); the block waits for its commit
}


def usage() -> tuple[float, float, float, int]:
    """CPU seconds of the loop's thread, of this process (all threads), of its reaped children, and
    the process's minor faults. The loop thread's CPU time holds what a save puts on the loop's own
    path (staging, copy-on-write faults) whatever the machine's load."""
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.thread_time(), own.ru_utime + own.ru_stime, kids.ru_utime + kids.ru_stime, own.ru_minflt


def warm_saves(trainer: Trainer, mode: str) -> int:
    """Saves before the steady state: the memory tier creates its files for its first keep_last + 1
    snapshots, then reuses the pruned one; a disk save allocates its staging buffers once."""
    return trainer.checkpointer.cfg.memory_keep_last + 1 if mode == "memory" else 1


def step(trainer: Trainer) -> None:
    trainer._train_step()
    trainer.state.step += 1
    trainer.checkpointer.poll()


def block(trainer: Trainer, interval: int, save: Callable[[], None] | None) -> dict:
    dist.barrier()
    loop0, cpu0, kids0, faults0 = usage()
    started = time.perf_counter()
    blocking = 0.0
    if save is not None:
        save()
        blocking = time.perf_counter() - started
    steps = []
    for _ in range(interval):
        t0 = time.perf_counter()
        step(trainer)
        steps.append(time.perf_counter() - t0)
    t0 = time.perf_counter()
    trainer.checkpointer.finish()
    tail = time.perf_counter() - t0
    loop1, cpu1, kids1, faults1 = usage()
    return {
        "wall": time.perf_counter() - started,
        "blocking": blocking,
        "steps": steps,
        "finish_wait": tail,
        "loop_cpu": loop1 - loop0,
        "cpu": cpu1 - cpu0,
        "children_cpu": kids1 - kids0,
        "minor_faults": faults1 - faults0,
    }


def floors(tensors: list[torch.Tensor]) -> dict[str, float]:
    started = time.perf_counter()
    copies = [t.clone() for t in tensors]
    fresh = time.perf_counter() - started
    started = time.perf_counter()
    for c, t in zip(copies, tensors, strict=True):
        c.copy_(t)
    return {"memcpy_fresh": fresh, "memcpy_reused": time.perf_counter() - started}


def main() -> None:
    run_dir, interval, repeats, modes = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4].split(",")
    # the tier exists; the bench triggers it
    overrides = ["checkpoint.memory_interval_steps=1000000"] if "memory" in modes else []
    cfg = load_config(Path(__file__).parent / "stall.yaml", overrides)
    trainer = Trainer(cfg, RankEnv.from_environ(), run_dir)
    trainer._build()
    trainer.checkpointer.on_commit = None  # the trainer's hook reports to a supervisor: none here
    for _ in range(2):  # warm-up: optimizer state allocated, caches warm
        step(trainer)
    tensors = state_tensors(trainer)
    result = {
        "rank": dist.get_rank(),
        "state_bytes": sum(t.numel() * t.element_size() for t in tensors),
        **floors(tensors),
        "blocks": {m: [] for m in modes},
    }
    del tensors
    saves = {m: (MODES[m](trainer) if MODES[m] else None) for m in modes}
    for m in modes:  # the first saves of each mode, reported apart (the first): the rest is the steady state
        if saves[m] is not None:
            for _ in range(warm_saves(trainer, m)):
                first = block(trainer, 1, saves[m])
                result.setdefault(f"first_{m}", first)
    for r in range(repeats):
        for m in modes[r % len(modes) :] + modes[: r % len(modes)]:  # rotate the order
            result["blocks"][m].append(block(trainer, interval, saves[m]))
    gathered: list[dict] = [None] * dist.get_world_size()  # type: ignore[list-item]
    dist.all_gather_object(gathered, result)
    if dist.get_rank() == 0:
        print("RESULT " + json.dumps(gathered), flush=True)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
