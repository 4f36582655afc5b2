"""A stand-in training process for the exactly-once test: consumes steps from the real loader,
logs a hash of every sample, and "checkpoints" the loader state every K steps (atomically).

    python -m tests.data.consumer DATA_DIR RUN_DIR STATE LOG --steps N --ckpt-every K

Its loader (`open_loader`, and `resume_at` a position) serves the resume-cost test and bench/loader too.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import time
from pathlib import Path

from trainer.data.config import DataConfig
from trainer.data.loader import TrainLoader, build_train_loader

SEQ_LEN, GLOBAL_BATCH, MICRO_BATCH, SEED = 16, 8, 2, 7


def open_loader(cfg: DataConfig, run_dir: Path, *, dp_rank: int = 0, dp_size: int = 1, **shape: int) -> TrainLoader:
    """The training loader over data prepared in `run_dir`, in this consumer's shape (SEQ_LEN, GLOBAL_BATCH,
    MICRO_BATCH, SEED) where `shape` (seq_len, global_batch, micro_batch, seed) does not say otherwise."""
    shape = {"seq_len": SEQ_LEN, "global_batch": GLOBAL_BATCH, "micro_batch": MICRO_BATCH, "seed": SEED, **shape}
    return build_train_loader(cfg, run_dir=run_dir, dp_rank=dp_rank, dp_size=dp_size, **shape)


def resume_at(position: int, cfg: DataConfig, run_dir: Path, **shape: int) -> tuple[TrainLoader, list]:
    """`open_loader(cfg, run_dir, **shape)` restored at global sample `position`, and its first step's
    micro-batches: what a restart does before training on."""
    loader = open_loader(cfg, run_dir, **shape)
    loader.load_state_dict({**loader.state_dict(), "consumed_samples": position})
    return loader, loader.next_step()


def sample_hashes(batches) -> list[str]:
    return [hashlib.sha1(row.numpy().tobytes()).hexdigest()[:16] for mb in batches for row in mb]


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("data", type=Path)
    p.add_argument("run_dir", type=Path)
    p.add_argument("state", type=Path)
    p.add_argument("log", type=Path)
    p.add_argument("--steps", type=int, required=True)
    p.add_argument("--ckpt-every", type=int, required=True)
    p.add_argument("--step-sleep", type=float, default=0.0)
    p.add_argument("--workers", type=int, default=1)
    args = p.parse_args()

    from tests.data.conftest import data_config  # here: importing the helpers above needs no pytest (bench/loader)

    loader = open_loader(data_config(args.data).model_copy(update={"num_workers": args.workers}), args.run_dir)
    step = 0
    if args.state.exists():
        saved = json.loads(args.state.read_text())
        loader.load_state_dict(saved["loader"])
        step = saved["step"]
    with open(args.log, "a") as log:
        while step < args.steps:
            hashes = sample_hashes(loader.next_step())
            log.write(json.dumps({"step": step, "pid": os.getpid(), "hashes": hashes}) + "\n")
            log.flush()
            os.fsync(log.fileno())
            step += 1
            if step % args.ckpt_every == 0:
                tmp = args.state.with_suffix(".tmp")
                tmp.write_text(json.dumps({"step": step, "loader": loader.state_dict()}))
                os.replace(tmp, args.state)
            time.sleep(args.step_sleep)
    loader.close()


if __name__ == "__main__":
    main()
