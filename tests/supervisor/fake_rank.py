"""A stand-in rank for supervisor tests: a real process with real heartbeats and signals.

Its "checkpoint" is RUN_DIR/fake_ckpt.json (the last saved step, written by rank 0), mirrored as an
empty committed step directory in the checkpoint dir (what the supervisor checks at the end); a save
that hits a full filesystem is skipped, as the trainer does. Every completed step is appended to
RUN_DIR/fake_steps.jsonl (skipped when the run dir is full). Behaviour comes from the environment:
FAKE_STEP_S (seconds per step), FAKE_CKPT_EVERY (save interval), FAKE_CRASH ("init": exit 3
before the first step of every attempt; "every:N": exit 3 after N steps of every attempt),
FAKE_CRASH_CODE (the code of those exits instead of 3), FAKE_ERROR_AT (report phase=error at that
step in attempt 0, then stall), FAKE_ERROR_CODE (the exit code that error announces), FAKE_IGNORE_STOP=1
(ignore the stop signals), FAKE_LINGER_S (stay alive that long after reporting done). It speaks the
rank protocol only through the public `resilient.rank` API.
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
    crash_code = int(os.environ.get("FAKE_CRASH_CODE", "3"))
    error_at = int(os.environ.get("FAKE_ERROR_AT", "-1"))
    error_code = {"exit_code": int(os.environ["FAKE_ERROR_CODE"])} if "FAKE_ERROR_CODE" in os.environ else {}
    ckpt = run_dir / "fake_ckpt.json"
    hb = connect(env)

    ckpt_root = Path((cfg.get("checkpoint") or {}).get("dir") or run_dir / "checkpoints")

    def save(step: int) -> None:
        hb.send(Phase.CHECKPOINT, step)
        if rank == 0:
            try:
                marker = ckpt_root / f"step_{step:07d}" / "COMMITTED.json"
                marker.parent.mkdir(parents=True, exist_ok=True)
                marker.with_suffix(".tmp").write_text(json.dumps({"files": {}, "meta": {"step": step}}))
                os.replace(marker.with_suffix(".tmp"), marker)  # a full disk never leaves an empty marker
                tmp = ckpt.with_suffix(".tmp")
                tmp.write_text(json.dumps({"step": step}))
                os.replace(tmp, ckpt)
            except OSError as err:
                print(f"fake rank: save of step {step} skipped: {err}", file=sys.stderr, flush=True)
        hb.send(Phase.STEP, step, ckpt_step=step)  # back to stepping, as the trainer reports after a save

    step = json.loads(ckpt.read_text())["step"] if ckpt.exists() else 0
    hb.send(Phase.INIT, step)
    if crash == "init":
        return crash_code
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
            try:
                with open(run_dir / "fake_steps.jsonl", "a") as f:
                    f.write(json.dumps({"attempt": attempt, "step": step}) + "\n")
            except OSError:
                pass
        hb.send(Phase.STEP, step, step_time=time.monotonic() - t0, loss=1.0 / step)
        if attempt == 0 and step == error_at:
            hb.send(Phase.ERROR, step, message="injected error", **error_code)
            time.sleep(3600)
        if step % every == 0:
            save(step)
        if crash.startswith("every:") and done_here >= int(crash.split(":")[1]):
            return crash_code
    save(step)
    hb.send(Phase.DONE, step)
    time.sleep(float(os.environ.get("FAKE_LINGER_S", "0")))  # a teardown that hangs after `done`
    return 0


if __name__ == "__main__":
    sys.exit(main())
