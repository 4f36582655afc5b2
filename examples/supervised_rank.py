"""A complete rank that speaks the rank protocol (docs/rank-protocol.md): heartbeats, stop request, exit codes.

    python examples/supervised_rank.py --steps 100 --save DIR
Each rank counts steps and saves its step to DIR/rank{RANK}.json; a real script would train and save
with torch.distributed. Unsupervised, the same script runs with a null heartbeat client.
"""

import argparse
import json
import os
import sys
import time
from pathlib import Path

from resilient.rank import ExitCode, Phase, RankEnv, StopFlag, connect, die_with_parent


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, required=True)
    parser.add_argument("--save", type=Path, required=True)
    parser.add_argument("--step-seconds", type=float, default=0.05)
    args = parser.parse_args()

    env = RankEnv.from_environ()
    die_with_parent(env)  # never outlive the supervisor
    stop = StopFlag().install(env)  # the supervisor's (and the scheduler's) stop signals
    beat = connect(env)  # a null client when not supervised
    beat.send(Phase.INIT, 0)

    ckpt = args.save / f"rank{env.rank}.json"
    step = json.loads(ckpt.read_text())["step"] if ckpt.exists() else 0
    beat.send(Phase.RESTORE, step)  # the step this attempt resumes from

    def save() -> None:
        beat.send(Phase.CHECKPOINT, step, ckpt_step=step)
        started = time.monotonic()
        args.save.mkdir(parents=True, exist_ok=True)
        tmp = ckpt.with_suffix(".tmp")
        tmp.write_text(json.dumps({"step": step}))
        os.replace(tmp, ckpt)
        beat.send(Phase.STEP, step, ckpt_step=step, ckpt_blocking_s=time.monotonic() - started)

    beat.send(Phase.STEP, step)  # training starts: the first step, with its one-off costs, gets a longer timeout
    while step < args.steps:
        # With torch.distributed, all-reduce the flag here so every rank stops after the same step.
        if stop.requested:
            save()
            return ExitCode.PREEMPTED
        started = time.monotonic()
        time.sleep(args.step_seconds)  # the training step
        step += 1
        beat.send(Phase.STEP, step, step_time=time.monotonic() - started, loss=1.0 / step)
        if step % 10 == 0:
            save()
    save()
    beat.send(Phase.DONE, step)
    return ExitCode.FINISHED


if __name__ == "__main__":
    sys.exit(main())
