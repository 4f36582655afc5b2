"""One rank of the checkpoint-stall benchmark (started by run.py through torchrun).

Builds the real trainer state (megatron GPTModel + AdamW moments), trains one step, then times, on
the same bytes: a memcpy of the rank's state, a write+fsync of it, a synchronous checkpoint save,
and the training-loop blocking time of an asynchronous save (plus its background total).
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist

from resilient.config import load_config
from resilient.rank.env import RankEnv
from trainer.loop import Trainer


def state_tensors(trainer: Trainer) -> list[torch.Tensor]:
    tensors = [p.data for p in trainer.model.parameters()]
    for moments in trainer.optimizer.state.values():
        tensors += [moments["exp_avg"], moments["exp_avg_sq"]]
    return tensors


def timed(fn) -> float:
    dist.barrier()
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


def main() -> None:
    run_dir, repeats = Path(sys.argv[1]), int(sys.argv[2])
    cfg = load_config(Path(__file__).parent / "stall.yaml")
    trainer = Trainer(cfg, RankEnv.from_environ(), run_dir)
    trainer._build()
    trainer._train_step()
    trainer.state.step = 1
    tensors = state_tensors(trainer)
    nbytes = sum(t.numel() * t.element_size() for t in tensors)

    def memcpy() -> None:
        for t in tensors:
            t.clone()

    scratch = Path(tempfile.mkdtemp(dir=run_dir))

    def disk() -> None:
        with open(scratch / f"floor{dist.get_rank()}.bin", "wb") as f:
            for t in tensors:
                f.write(t.numpy().tobytes())
            f.flush()
            os.fsync(f.fileno())

    results = {"memcpy": [], "disk": [], "sync_save": [], "async_blocking": [], "async_total": []}
    ckpt = trainer.checkpointer
    for i in range(repeats):
        results["memcpy"].append(timed(memcpy))
        results["disk"].append(timed(disk))
        ckpt.cfg.async_save = False
        trainer.state.step += 1
        results["sync_save"].append(timed(lambda: ckpt.save(trainer.state)))
        ckpt.cfg.async_save = True
        trainer.state.step += 1
        started = time.perf_counter()
        results["async_blocking"].append(timed(lambda: ckpt.save(trainer.state)))
        ckpt.finish()
        results["async_total"].append(time.perf_counter() - started)
    medians = {k: statistics.median(v) for k, v in results.items()}
    gathered: list[dict] = [None] * dist.get_world_size()  # type: ignore[list-item]
    dist.all_gather_object(gathered, {"rank": dist.get_rank(), "state_bytes": nbytes, **medians})
    if dist.get_rank() == 0:
        print("RESULT " + json.dumps(gathered))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
