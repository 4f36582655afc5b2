"""A synthetic run directory: two allocations, a hang with its incident, checkpoints, a straggler, a silent data
corruption finding with its incident."""

from __future__ import annotations

import json
import math
from pathlib import Path

from resilient.core.ledger import append_jsonl

T0 = 1_790_000_000.0


def make_run(run_dir: Path, ranks: int = 4) -> Path:
    run_dir.mkdir(parents=True, exist_ok=True)
    led, train, rs = run_dir / "ledger.jsonl", run_dir / "train_log.jsonl", run_dir / "rank_steps.jsonl"
    t = T0

    def ev(event: str, **f) -> None:
        append_jsonl(led, {"ts": t, "event": event, **f})

    ev("run_start", attempt=0, node=0, slurm_job_id="11", slurm_restart_count=0)
    step = 0
    for attempt, (first, last) in enumerate(((1, 60), (41, 100), (101, 140))):
        if attempt == 2:
            t += 300
            ev("run_start", attempt=2, node=0, slurm_job_id="11", slurm_restart_count=1)
        ev("attempt_start", attempt=attempt, node=0)
        t += 20
        ev("rank_init", attempt=attempt, rank=0, seconds=18.0)
        for step in range(first, last + 1):
            t += 2.0
            append_jsonl(
                train,
                {
                    "ts": t,
                    "attempt": attempt,
                    "step": step,
                    "loss": 8 * math.exp(-step / 60) + 2,
                    "step_time": 2.0,
                    "tokens_per_s": 4000 + 10 * (step % 7),
                    "mfu": 0.41,
                },
            )
            if step % 20 == 0:
                append_jsonl(
                    train, {"ts": t, "attempt": attempt, "step": step, "val_loss": 8 * math.exp(-step / 60) + 2.3}
                )
                ev("ckpt_save", step=step, blocking_seconds=0.4)
            if step % 5 == 0:
                append_jsonl(
                    rs,
                    {
                        "ts": t,
                        "attempt": attempt,
                        "node": 0,
                        "ranks": {
                            str(r): {
                                "step": step,
                                "step_time": 2.0 + (0.9 if r == ranks - 1 and attempt == 1 else 0.02 * r),
                            }
                            for r in range(ranks)
                        },
                    },
                )
        if attempt == 0:
            t += 30
            incident = run_dir / "incidents" / "0-hang"
            incident.mkdir(parents=True)
            (incident / "summary.json").write_text(
                json.dumps({"culprit": {"rank": 1, "frame": "forward (m.py:3)", "reason": "stopped"}})
            )
            (incident / "summary.txt").write_text("culprit: rank 1\n")
            ev(
                "failure",
                kind="hang",
                rank=1,
                node=0,
                step=60,
                reason="rank 1: no heartbeat progress",
                incident="incidents/0-hang",
            )
            ev("restart", attempt=1, backoff_seconds=5.0, reason="hang")
            t += 5
        elif attempt == 1:
            incident = run_dir / "incidents" / "1-sdc"
            incident.mkdir(parents=True)
            (incident / "summary.txt").write_text("silent data corruption (mismatch) found at step 95: rank 2\n")
            ev("sdc_suspected", step=95, kind="mismatch", reason="2 different digests", reexecute_from=80)
            ev(
                "sdc_confirmed",
                step=95,
                kind="mismatch",
                how="re-execution",
                ranks=[2],
                nodes=["n0"],
                trusted_until=90,
                action="restart",
                incident="incidents/1-sdc",
            )
            ev("preempted", step=100, node=0)
            ev("requeue", reason="preempted")
    ev("finished", step=step)
    (run_dir / "status.json").write_text(
        json.dumps({"state": "finished", "attempt": 2, "step": step, "written_at": t, "ranks": []})
    )
    return run_dir
