"""Soak benchmark: a long tiny run under a fault every ~45 s on average; measured vs Daly-predicted goodput.

    python bench/soak/run.py [--duration 600] [--mtbf 45] [--seed 1] [--ckpt-every 40] [--out bench/results]

One `resilient chaos` drill (a mean time between faults schedule over restart-causing faults) on the tiny
config with enough steps to outlast --duration; when the time is up the drill's supervisor is preempted
(SIGTERM) so the run ends cleanly, and the goodput is read at that moment. The Daly prediction uses what
this very run measured:
  delta  checkpoint cost: mean `ckpt_save.blocking_seconds` (what the loop pays per save)
  tau    compute between checkpoints: --ckpt-every x the median step time
  R      restart cost: mean time from an injected fault to the start of the first step of the next attempt
         (the steps recomputed after it are lost work in Daly's model, not restart time)
  M      mean time between faults: wall time / injected faults
and resilient.planner.predicted_goodput(tau, delta, R, M). The goal is measured >= 95% of predicted.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from resilient.core import ledger  # noqa: E402
from resilient.chaos.runner import DrillOptions, run_drill  # noqa: E402
from resilient.chaos.schedule import build_schedule  # noqa: E402
from resilient.planner import predicted_goodput  # noqa: E402

FAULTS = ["kill_rank", "hang_rank", "preempt", "kill_supervisor", "ckpt_write_kill", "corrupt_ckpt", "gpu_health"]


def _overrides(steps: int, ckpt_every: int) -> list[str]:
    return [f"train.steps={steps}", "train.warmup_steps=20", "train.eval_every=0", "train.log_every=500",
            f"checkpoint.interval_steps={ckpt_every}", "checkpoint.keep_last=3", "metrics.port=0",
            "supervisor.termination_grace_s=2", "supervisor.backoff_initial_s=0.5", "supervisor.backoff_max_s=2",
            "supervisor.max_restarts=1000", "supervisor.step_timeout_floor_s=4", "supervisor.step_timeout_factor=3",
            "supervisor.status_interval_s=0.25", "supervisor.checkpoint_timeout_s=30", "health.monitor_interval_s=1"]


def restart_costs(train_log: list[dict], faults: list[dict]) -> list[float]:
    """Per fault: fault -> start of the first step of a later attempt (the steps recomputed after that are
    lost work in Daly's model, not restart time)."""
    costs = []
    for f in faults:
        later = [r for r in train_log if r["ts"] > f["ts"] and r["attempt"] != f["attempt"]]
        if later:
            costs.append(later[0]["ts"] - later[0]["step_time"] - f["ts"])
    return costs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", type=Path, default=REPO / "examples" / "tiny.yaml")
    ap.add_argument("--duration", type=float, default=600.0, help="seconds of soak before the final preemption")
    ap.add_argument("--mtbf", type=float, default=45.0, help="mean seconds between faults")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--ckpt-every", type=int, default=40, help="checkpoint interval in steps")
    ap.add_argument("--steps", type=int, default=100_000, help="more than the run can reach in --duration")
    ap.add_argument("--run-dir", type=Path, default=None)
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    args = ap.parse_args()

    run_dir = args.run_dir or Path(f"/tmp/bench-soak-{int(time.time())}")
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    opts = DrillOptions(config=args.config, run_dir=run_dir, overrides=_overrides(args.steps, args.ckpt_every),
                        timeout_s=args.duration, detect_timeout_s=90, max_launches=1000)
    report = run_drill(opts, build_schedule(f"mtbf:{args.mtbf}", FAULTS, args.seed), FAULTS, seed=args.seed)

    records = list(ledger.read(run_dir))
    train_log = [r for r in ledger.read_jsonl(run_dir / "train_log.jsonl") if "step_time" in r]
    saves = [r["blocking_seconds"] for r in records if r["event"] == "ckpt_save"]
    injected = [f for f in report["faults"] if f["detection_latency_s"] is not None]
    gp = report["goodput"]
    step_s = statistics.median(r["step_time"] for r in train_log)
    delta = statistics.mean(saves)
    tau = args.ckpt_every * step_s
    restart = statistics.mean(restart_costs(train_log, injected))
    mtbf = gp["wall_s"] / max(1, len(injected))
    predicted = predicted_goodput(tau, delta, restart, mtbf)
    result = {
        "config": str(args.config), "duration_s": args.duration, "mtbf_target_s": args.mtbf, "seed": args.seed,
        "cpus": os.cpu_count(), "run_dir": str(run_dir),
        "faults_injected": len(report["faults"]), "faults_detected": len(injected),
        "faults_by_kind": {k: sum(f["kind"] == k for f in report["faults"]) for k in FAULTS},
        "detection_latency_s": {k: [f["detection_latency_s"] for f in injected if f["kind"] == k] for k in FAULTS},
        "not_injected": report["not_injected"], "orphans": report["orphans"],
        "goodput_measured": gp["ratio"], "badput_s": gp["badput_s"], "wall_s": gp["wall_s"],
        "productive_steps": gp["productive_steps"], "recomputed_steps": gp["recomputed_steps"],
        "daly": {"tau_s": tau, "delta_s": delta, "restart_s": restart, "mtbf_s": mtbf, "step_s": step_s},
        "goodput_predicted": predicted,
        "measured_over_predicted": gp["ratio"] / predicted,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    out = args.out / f"soak-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))
    print(f"written to {out}", file=sys.stderr)


if __name__ == "__main__":
    main()
