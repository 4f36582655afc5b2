"""A stand-in rank for supervisor tests: a real process with real heartbeats and signals.

Its "checkpoint" is RUN_DIR/fake_ckpt.json (the last saved step, written by rank 0); every
completed step is appended to RUN_DIR/fake_steps.jsonl. Behaviour comes from the environment:
FAKE_STEP_S (seconds per step), FAKE_CKPT_EVERY (save interval), FAKE_CRASH ("init": exit 3
before the first step of every attempt; "every:N": exit 3 after N steps of every attempt),
FAKE_ERROR_AT (report phase=error at that step in attempt 0, then stall), FAKE_IGNORE_STOP=1
(ignore the stop signals). It speaks the rank protocol only through the public `resilient.rank` API.
"""

from resilient.rank import die_with_parent

die_with_parent()

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import signal  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import yaml  # noqa: E402

from resilient.rank import ExitCode, Phase, RankEnv, StopFlag, connect  # noqa: E402


def main() -> int:
    env = RankEnv.from_environ()
    stop = StopFlag()
    if os.environ.get("FAKE_IGNORE_STOP") == "1":
        for name in env.stop_signals:
            signal.signal(signal.Signals[name], signal.SIG_IGN)
    else:
        stop.install(env)
    args = argparse.ArgumentParser()
    args.add_argument("--config", required=True)
    cfg = yaml.safe_load(Path(args.parse_args().config).read_text())
    run_dir, rank, attempt = env.run_dir, env.rank, env.attempt
    steps = cfg["train"]["steps"]
    step_s = float(os.environ.get("FAKE_STEP_S", "0.1"))
    every = int(os.environ.get("FAKE_CKPT_EVERY", "1"))
    crash = os.environ.get("FAKE_CRASH", "")
    error_at = int(os.environ.get("FAKE_ERROR_AT", "-1"))
    ckpt = run_dir / "fake_ckpt.json"
    hb = connect(env)

    def save(step: int) -> None:
        hb.send(Phase.CHECKPOINT, step)
        if rank == 0:
            tmp = ckpt.with_suffix(".tmp")
            tmp.write_text(json.dumps({"step": step}))
            os.replace(tmp, ckpt)
        hb.send(Phase.STEP, step, ckpt_step=step)  # back to stepping, as the trainer reports after a save

    step = json.loads(ckpt.read_text())["step"] if ckpt.exists() else 0
    hb.send(Phase.INIT, step)
    if crash == "init":
        return 3
    done_here = 0
    while step < steps:
        if stop.requested:
            save(step)
            return ExitCode.PREEMPTED
        t0 = time.monotonic()
        time.sleep(step_s)
        step += 1
        done_here += 1
        if rank == 0:
            with open(run_dir / "fake_steps.jsonl", "a") as f:
                f.write(json.dumps({"attempt": attempt, "step": step}) + "\n")
        hb.send(Phase.STEP, step, step_time=time.monotonic() - t0, loss=1.0 / step)
        if attempt == 0 and step == error_at:
            hb.send(Phase.ERROR, step, message="injected error")
            time.sleep(3600)
        if step % every == 0:
            save(step)
        if crash.startswith("every:") and done_here >= int(crash.split(":")[1]):
            return 3
    save(step)
    hb.send(Phase.DONE, step)
    return 0


if __name__ == "__main__":
    sys.exit(main())
