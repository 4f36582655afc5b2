"""A two-rank gloo job that hangs the way real jobs do, for incident tests.

Every step all-reduces a tensor. At step 3 rank 1 misbehaves (STUCK_MODE):
  sleep - it sleeps inside its forward pass, before the step's all_reduce;
  skip  - it skips the step's all_reduce and stalls waiting for data that never comes.
Either way rank 0 blocks inside all_reduce. Each rank touches <READY_DIR>/rank<N> once it is stuck.
"""

import os
import queue
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

RANK = int(os.environ["RANK"])
READY = Path(os.environ["READY_DIR"])
MODE = os.environ["STUCK_MODE"]
BATCHES: queue.Queue = queue.Queue()


def forward(step: int) -> torch.Tensor:
    if RANK == 1 and step == 3 and MODE == "sleep":
        (READY / "rank1").touch()
        time.sleep(3600)
    return torch.ones(4) * step


def next_batch() -> int:
    (READY / "rank1").touch()
    return BATCHES.get()  # nothing is ever put: a data stall


def main() -> int:
    dist.init_process_group("gloo")
    for step in range(1, 100):
        out = forward(step)
        if RANK == 1 and step == 3 and MODE == "skip":
            next_batch()
            continue
        if RANK == 0 and step == 3:
            (READY / "rank0").touch()
        dist.all_reduce(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
