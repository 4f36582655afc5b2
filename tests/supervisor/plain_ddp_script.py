"""A training script that knows nothing of resilient: what an operator's own script looks like.

torchrun's environment contract (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT), gloo DDP on a tiny
model, torch.save every --save-interval iterations in Megatron-LM's legacy layout
(SAVE/iter_NNNNNNN/mp_rank_00/model_optim_rng.pt, then SAVE/latest_checkpointed_iteration.txt),
and on SIGTERM: the ranks agree on the stop at the next iteration (one all-reduce), save, exit 0.
Rank 0 appends {"iteration", "resumed_from"} to --log for every completed iteration.
"""

import argparse
import json
import os
import signal
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

TRACKER = "latest_checkpointed_iteration.txt"
stop_requested = False


def _on_sigterm(_signum, _frame) -> None:
    global stop_requested
    stop_requested = True


def _replace(path: Path, write) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    write(tmp)
    os.replace(tmp, path)


def save(root: Path, iteration: int, model, optimizer) -> None:
    if dist.get_rank() == 0:
        ckpt = root / f"iter_{iteration:07d}" / "mp_rank_00" / "model_optim_rng.pt"
        ckpt.parent.mkdir(parents=True, exist_ok=True)
        state = {"iteration": iteration, "model": model.module.state_dict(), "optimizer": optimizer.state_dict()}
        _replace(ckpt, lambda tmp: torch.save(state, tmp))
        _replace(root / TRACKER, lambda tmp: tmp.write_text(str(iteration)))
    dist.barrier()


def load(root: Path, model, optimizer) -> int:
    try:
        iteration = int((root / TRACKER).read_text())
    except FileNotFoundError:
        return 0
    state = torch.load(root / f"iter_{iteration:07d}" / "mp_rank_00" / "model_optim_rng.pt", weights_only=True)
    model.module.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    return state["iteration"]


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--save", type=Path, required=True)
    parser.add_argument("--train-iters", type=int, required=True)
    parser.add_argument("--save-interval", type=int, default=5)
    parser.add_argument("--iteration-seconds", type=float, default=0.05)
    parser.add_argument("--log", type=Path, required=True)
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, _on_sigterm)

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    model = DistributedDataParallel(torch.nn.Linear(16, 1))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    iteration = resumed_from = load(args.save, model, optimizer)
    while iteration < args.train_iters:
        stop = torch.tensor([float(stop_requested)])
        dist.all_reduce(stop)  # every rank stops after the same iteration
        if stop.item() > 0:
            save(args.save, iteration, model, optimizer)
            break
        inputs = torch.randn(8, 16, generator=torch.Generator().manual_seed(iteration * world + rank))
        loss = model(inputs).pow(2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        iteration += 1
        time.sleep(args.iteration_seconds)
        if rank == 0:
            with open(args.log, "a") as f:
                f.write(json.dumps({"iteration": iteration, "resumed_from": resumed_from}) + "\n")
        if iteration % args.save_interval == 0 or iteration == args.train_iters:
            save(args.save, iteration, model, optimizer)
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
