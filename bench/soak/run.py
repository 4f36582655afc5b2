"""Soak benchmark: a long tiny run under a fault every ~45 s on average; measured vs Daly-predicted goodput.

    python bench/soak/run.py [--duration 600] [--mtbf 45] [--seed 1] [--ckpt-every 40] [--fixed] [--out bench/results]

One `resilient chaos` drill (a mean time between faults schedule over restart-causing faults) on the tiny
config with enough steps to outlast --duration; when the time is up the drill's supervisor is preempted
(SIGTERM) so the run ends cleanly, and the goodput is read at that moment. The run uses the adaptive
checkpoint interval (`checkpoint.adaptive`, starting at --ckpt-every, prior MTBF --mtbf) unless --fixed.
The Daly prediction uses what this very run measured:
  delta  a save's true cost to the loop: the extra wall time of the iterations from the save on (the
         blocking call, then the steps slowed by the background write: at least --cost-window, and all
         until the commit) over the median iteration, read from the train log's timestamps
         (`ckpt_save.blocking_seconds` alone is reported beside it)
  tau    compute between checkpoints: the mean spacing of consecutive saves of an attempt x the median step
  R      restart cost: mean time from an injected fault to the start of the first step of the next attempt
         (the steps recomputed after it are lost work in Daly's model, not restart time)
  M      mean time between faults: wall time / injected faults
and resilient.planner.predicted_goodput(tau, delta, R, M). The goal is measured >= 97% of predicted.
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

from resilient.chaos.runner import DrillOptions, run_drill  # noqa: E402
from resilient.chaos.schedule import build_schedule  # noqa: E402
from resilient.core import ledger  # noqa: E402
from resilient.planner import predicted_goodput  # noqa: E402
from trainer.checkpoint.interval import daly_interval, save_cost  # noqa: E402

FAULTS = ["kill_rank", "hang_rank", "preempt", "kill_supervisor", "ckpt_write_kill", "corrupt_ckpt", "gpu_health"]


def _overrides(steps: int, ckpt_every: int, *, adaptive: bool, mtbf_s: float) -> list[str]:
    interval = (
        [
            f"checkpoint.adaptive={str(adaptive).lower()}",
            f"checkpoint.prior_mtbf_hours={mtbf_s / 3600:.6g}",
            "checkpoint.min_interval_steps=2",
            "checkpoint.max_interval_steps=1000",
        ]
        if adaptive
        else []
    )
    return [
        f"train.steps={steps}",
        "train.warmup_steps=20",
        "train.eval_every=0",
        "train.log_every=500",
        f"checkpoint.interval_steps={ckpt_every}",
        "checkpoint.keep_last=3",
        "metrics.port=0",
        *interval,
        "supervisor.termination_grace_s=2",
        "supervisor.backoff_initial_s=0.5",
        "supervisor.backoff_max_s=2",
        "supervisor.max_restarts=1000",
        "supervisor.step_timeout_floor_s=4",
        "supervisor.step_timeout_factor=3",
        "supervisor.status_interval_s=0.25",
        "supervisor.checkpoint_timeout_s=30",
        "health.monitor_interval_s=1",
    ]


def restart_costs(train_log: list[dict], faults: list[dict]) -> list[float]:
    """Per fault: fault -> start of the first step of a later attempt (the steps recomputed after that are
    lost work in Daly's model, not restart time)."""
    costs = []
    for f in faults:
        later = [r for r in train_log if r["ts"] > f["ts"] and r["attempt"] != f["attempt"]]
        if later:
            costs.append(later[0]["ts"] - later[0]["step_time"] - f["ts"])
    return costs


def iteration_gaps(train_log: list[dict]) -> dict[tuple[int, int], float]:
    """(attempt, step) -> wall seconds since the previous step's record of the same attempt: the step plus
    whatever the loop did between (a save's blocking call lands in the gap after the saved step)."""
    gaps, last = {}, {}
    for r in train_log:
        a = r["attempt"]
        if a in last and r["step"] == last[a]["step"] + 1:
            gaps[(a, r["step"])] = r["ts"] - last[a]["ts"]
        last[a] = r
    return gaps


def with_attempts(saves: list[dict], train_log: list[dict]) -> list[dict]:
    """`ckpt_save` records with the attempt that trained their step (the last to record it before the commit)."""
    out = []
    for s in saves:
        trained = [r for r in train_log if r["step"] == s["step"] and r["ts"] <= s["ts"]]
        if trained:
            out.append({**s, "attempt": trained[-1]["attempt"]})
    return out


def true_save_costs(train_log: list[dict], saves: list[dict], window: int) -> tuple[list[float], float]:
    """Each save's extra wall time over the iterations after the saved step (at least `window`, and every
    one that ended before the save was committed: the background write slows them), against the median
    gap of the iterations no save touched; returns (costs, median gap)."""
    gaps = iteration_gaps(train_log)
    ends = {(r["attempt"], r["step"]): r["ts"] for r in train_log}
    spans = {}
    for s in saves:
        a, k = s["attempt"], 1
        while k <= window or ends.get((a, s["step"] + k), float("inf")) <= s["ts"]:
            k += 1
        spans[(a, s["step"])] = range(1, k)
    touched = {(a, step + k) for (a, step), span in spans.items() for k in span}
    plain = [g for key, g in gaps.items() if key not in touched]
    baseline = statistics.median(plain) if plain else 0.0
    costs = []
    for (a, step), span in spans.items():
        after = [gaps.get((a, step + k)) for k in span]
        if all(g is not None for g in after):  # a save a fault or the end cut short tells nothing
            costs.append(save_cost(after, baseline))
    return costs, baseline


def save_spacing(saves: list[dict]) -> float:
    """Mean steps between consecutive saves of the same attempt."""
    spans, last = [], {}
    for s in sorted(saves, key=lambda s: s["ts"]):
        if s["attempt"] in last and s["step"] > last[s["attempt"]]:
            spans.append(s["step"] - last[s["attempt"]])
        last[s["attempt"]] = s["step"]
    return statistics.mean(spans) if spans else 0.0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", type=Path, default=REPO / "examples" / "tiny.yaml")
    ap.add_argument("--duration", type=float, default=600.0, help="seconds of soak before the final preemption")
    ap.add_argument("--mtbf", type=float, default=45.0, help="mean seconds between faults")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--ckpt-every", type=int, default=40, help="checkpoint interval in steps (adaptive: the start)")
    ap.add_argument("--fixed", action="store_true", help="keep --ckpt-every instead of the adaptive interval")
    ap.add_argument("--cost-window", type=int, default=5, help="iterations after a save that count as its cost")
    ap.add_argument("--steps", type=int, default=100_000, help="more than the run can reach in --duration")
    ap.add_argument("--run-dir", type=Path, default=None)
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    args = ap.parse_args()

    run_dir = args.run_dir or Path(f"/tmp/bench-soak-{int(time.time())}")
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    overrides = [
        *_overrides(args.steps, args.ckpt_every, adaptive=not args.fixed, mtbf_s=args.mtbf),
        f"checkpoint.cost_window_steps={args.cost_window}",
    ]
    opts = DrillOptions(
        config=args.config,
        run_dir=run_dir,
        overrides=overrides,
        timeout_s=args.duration,
        detect_timeout_s=90,
        max_launches=1000,
    )
    report = run_drill(opts, build_schedule(f"mtbf:{args.mtbf}", FAULTS, args.seed), FAULTS, seed=args.seed)

    records = list(ledger.read(run_dir))
    train_log = [r for r in ledger.read_jsonl(run_dir / "train_log.jsonl") if "step_time" in r]
    saves = with_attempts([r for r in records if r["event"] == "ckpt_save"], train_log)
    injected = [f for f in report["faults"] if f["detection_latency_s"] is not None]
    gp = report["goodput"]
    step_s = statistics.median(r["step_time"] for r in train_log)
    costs, gap_s = true_save_costs(train_log, saves, args.cost_window)
    delta = statistics.mean(costs) if costs else 0.0
    blocking = statistics.mean(r["blocking_seconds"] for r in saves) if saves else 0.0
    spacing = save_spacing(saves)
    tau = spacing * step_s
    restarts = restart_costs(train_log, injected)
    if not restarts or not tau:
        print(
            "bench/soak: no fault was followed by a step of a later attempt, or no two saves in one attempt, "
            "within --duration: Daly's inputs are not measured; run longer",
            file=sys.stderr,
        )
    restart = statistics.mean(restarts) if restarts else 0.0
    mtbf = gp["wall_s"] / max(1, len(injected))
    predicted = predicted_goodput(tau, delta, restart, mtbf) if restarts and tau else None
    best_tau = daly_interval(delta, mtbf)
    # Daly's model is a run in steady state: it has no first start. The same measurement from the start
    # of the first step on (the first cold start taken out of the wall time):
    first_start = train_log[0]["ts"] - train_log[0]["step_time"] - min(r["ts"] for r in records)
    steady = gp["productive_s"] / (gp["wall_s"] - first_start)
    at_optimum = predicted_goodput(best_tau, delta, restart, mtbf) if predicted and delta > 0 else None
    changes = [r for r in records if r["event"] == "ckpt_interval"]
    result = {
        "config": str(args.config),
        "duration_s": args.duration,
        "mtbf_target_s": args.mtbf,
        "seed": args.seed,
        "cpus": os.cpu_count(),
        "run_dir": str(run_dir),
        "adaptive": not args.fixed,
        "faults_injected": len(report["faults"]),
        "faults_detected": len(injected),
        "faults_by_kind": {k: sum(f["kind"] == k for f in report["faults"]) for k in FAULTS},
        "detection_latency_s": {k: [f["detection_latency_s"] for f in injected if f["kind"] == k] for k in FAULTS},
        "not_injected": report["not_injected"],
        "false_alarms": report["false_alarms"],
        "orphans": report["orphans"],
        "goodput_measured": gp["ratio"],
        "badput_s": gp["badput_s"],
        "wall_s": gp["wall_s"],
        "productive_steps": gp["productive_steps"],
        "recomputed_steps": gp["recomputed_steps"],
        "daly": {
            "tau_s": tau,
            "delta_s": delta,
            "restart_s": restart,
            "mtbf_s": mtbf,
            "step_s": step_s,
            "iteration_s": gap_s,
            "save_spacing_steps": spacing,
            "saves_measured": len(costs),
            "blocking_s": blocking,
            "optimal_tau_s": best_tau,
            "optimal_interval_steps": best_tau / step_s if step_s else None,
        },
        "interval_changes": [
            {k: c.get(k) for k in ("attempt", "step", "previous", "steps", "save_cost_s", "mtbf_s", "failures")}
            for c in changes
        ],
        "goodput_predicted": predicted,
        "goodput_predicted_at_optimum": at_optimum,
        "goodput_predicted_with_blocking_cost": predicted_goodput(tau, blocking, restart, mtbf) if predicted else None,
        "measured_over_predicted": gp["ratio"] / predicted if predicted else None,
        "first_start_s": first_start,
        "goodput_measured_from_first_step": steady,
        "measured_from_first_step_over_predicted": steady / predicted if predicted and steady else None,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    out = args.out / f"soak-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))
    print(f"written to {out}", file=sys.stderr)


if __name__ == "__main__":
    main()
