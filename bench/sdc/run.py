"""bench/sdc: what replica checks cost the training loop, how soon a flipped bit is found, and the planner's
estimate at 405B on GPU.

    python bench/sdc/run.py [--steps 150] [--rounds 3] [--intervals 1,10,100] [--flips 12,17] [--run-dir DIR]

1. Overhead (tiny preset, 2 CPU ranks, no supervisor, no checkpoint but the final one): in one bench run,
   `--rounds` rounds of one training per setting, checks off and every 1, 10, 100 steps, the settings
   taking turns so that they share the machine's load. Per setting: the loop's wall time per step (train
   log timestamps, warm-up steps dropped), its overhead over "off" (median over rounds), and the checks'
   own measured time (`replica_check_s`) over the loop's time in the same runs: the direct figure, which
   the machine's load does not blur.
2. Detection latency in steps: three replicas, checks every 10 (the default), a weight bit flipped at each
   of `--flips`: steps from the flip to the `sdc_confirmed` record; and two replicas (re-execution): the
   steps re-executed and the seconds from the mismatch to the finding.
3. The planner's estimate at 405B on H100s (examples/llama31-405b.yaml): one check's time against the
   planned step time, at each interval.
Goal: <= 1% step-time overhead at the default interval. Results JSON goes to bench/results/.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
from resilient.config import load_config  # noqa: E402
from resilient.core import ledger  # noqa: E402
from resilient.planner import Layout, make_plan, replica_check_overhead  # noqa: E402
from tests.ranks import run_ranks  # noqa: E402

WARMUP = 5
TINY = [
    "train.warmup_steps=10",
    "train.eval_every=0",
    "train.log_every=100000",
    "train.seq_len=64",
    "checkpoint.interval_steps=0",
    "data.num_workers=0",
]


def load_average() -> float:
    return os.getloadavg()[0]


def records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "train_log.jsonl").read_text().splitlines() if '"loss"' in line]


def train(run_dir: Path, sets: list[str], world: int) -> None:
    codes = run_ranks(run_dir, sets, world=world, timeout=1800)
    if any(codes) and not run_dir.joinpath("ledger.jsonl").exists():
        sys.exit(f"training failed (exits {codes}):\n{(run_dir / 'rank0.log').read_text()[-4000:]}")


def overhead(base: Path, args: argparse.Namespace) -> dict:
    settings = [0, *args.intervals]
    per_step: dict[int, list[float]] = {k: [] for k in settings}
    check_share: dict[int, list[float]] = {k: [] for k in settings}
    for rnd in range(args.rounds):
        for every in settings:
            run_dir = base / f"overhead-r{rnd}-every{every}"
            train(
                run_dir,
                [
                    *TINY,
                    f"train.steps={args.steps}",
                    "train.global_batch=8",
                    "train.micro_batch=2",
                    f"numerics.replica_check_interval_steps={every}",
                ],
                world=2,
            )
            recs = records(run_dir)[WARMUP:]
            loop_s = (recs[-1]["ts"] - recs[0]["ts"]) / (len(recs) - 1)
            per_step[every].append(loop_s)
            check_s = sum(r.get("replica_check_s", 0.0) for r in recs[1:])
            check_share[every].append(check_s / (recs[-1]["ts"] - recs[0]["ts"]))
            print(
                f"round {rnd} every {every or 'off'}: {loop_s * 1e3:.2f} ms/step, checks "
                f"{100 * check_share[every][-1]:.3f}% of the loop (load {load_average():.1f})",
                flush=True,
            )
    off = statistics.median(per_step[0])
    return {
        str(k or "off"): {
            "ms_per_step": [round(v * 1e3, 3) for v in per_step[k]],
            "overhead_vs_off": round(statistics.median(per_step[k]) / off - 1, 5),
            "check_share_of_loop": round(statistics.median(check_share[k]), 6),
        }
        for k in settings
    }


def detection(base: Path, args: argparse.Namespace) -> dict:
    out: dict = {"dp3_majority": [], "dp2_reexecution": None}
    common = [
        *TINY,
        "train.steps=30",
        "train.micro_batch=2",
        "checkpoint.interval_steps=4",
        "numerics.replica_check_interval_steps=10",
    ]
    for flip in args.flips:
        run_dir = base / f"flip-dp3-{flip}"
        run_dir.mkdir(parents=True)
        (run_dir / "faults.json").write_text(json.dumps({"bitflip": [{"step": flip, "rank": 1, "attempt": 0}]}))
        train(run_dir, [*common, "train.global_batch=6"], world=3)
        [found] = [e for e in ledger.read(run_dir) if e["event"] == "sdc_confirmed"]
        out["dp3_majority"].append(
            {
                "flip_step": flip,
                "found_at_step": found["step"],
                "latency_steps": found["step"] - flip,
                "ranks": found["ranks"],
            }
        )
        print(
            f"DP3 flip at step {flip}: found at step {found['step']} ({found['how']}), ranks {found['ranks']}",
            flush=True,
        )
    flip = args.flips[0]
    run_dir = base / f"flip-dp2-{flip}"
    run_dir.mkdir(parents=True)
    (run_dir / "faults.json").write_text(json.dumps({"bitflip": [{"step": flip, "rank": 1, "attempt": 0}]}))
    train(run_dir, [*common, "train.global_batch=4"], world=2)
    events = list(ledger.read(run_dir))
    [suspected] = [e for e in events if e["event"] == "sdc_suspected"]
    [found] = [e for e in events if e["event"] == "sdc_confirmed"]
    out["dp2_reexecution"] = {
        "flip_step": flip,
        "found_at_step": found["step"],
        "latency_steps": found["step"] - flip,
        "reexecuted_steps": found["step"] - suspected["reexecute_from"],
        "mismatch_to_finding_s": round(found["ts"] - suspected["ts"], 3),
        "ranks": found["ranks"],
    }
    print(f"DP2 flip at step {flip}: {out['dp2_reexecution']}", flush=True)
    return out


def planner_estimate(intervals: list[int]) -> dict:
    cfg = load_config(REPO / "examples" / "llama31-405b.yaml")
    p = cfg.parallel
    layout = Layout(tp=p.tp, pp=p.pp, cp=p.cp, dp=cfg.dp(cfg.world_size), distributed_optimizer=p.distributed_optimizer)
    plan = make_plan(
        cfg.model.architecture(),
        layout,
        seq_len=cfg.seq_len,
        micro_batch=cfg.train.micro_batch,
        global_batch=cfg.train.global_batch,
    )
    out = {}
    for every in intervals:
        share, why = replica_check_overhead(plan, every)
        out[str(every)] = {"share": share, "reason": why}
        print(f"405B planner, every {every}: {why}", flush=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--intervals", type=lambda s: [int(x) for x in s.split(",")], default=[1, 10, 100])
    parser.add_argument("--flips", type=lambda s: [int(x) for x in s.split(",")], default=[12, 17])
    parser.add_argument("--run-dir", type=Path, default=None)
    args = parser.parse_args()
    os.environ["OMP_NUM_THREADS"] = "1"
    base = args.run_dir or Path(tempfile.mkdtemp(prefix="bench-sdc-"))
    started, load = time.time(), load_average()
    result = {
        "overhead": overhead(base, args),
        "detection": detection(base, args),
        "planner_405b": planner_estimate(args.intervals),
        "load_average": {"start": load, "end": load_average()},
        "seconds": round(time.time() - started, 1),
    }
    default = str(load_config(REPO / "examples" / "tiny.yaml").numerics.replica_check_interval_steps)
    result["goal"] = {
        "default_interval": default,
        "direct_check_share": result["overhead"][default]["check_share_of_loop"],
        "met": result["overhead"][default]["check_share_of_loop"] <= 0.01,
    }
    print(json.dumps(result, indent=1))
    results = REPO / "bench" / "results"
    results.mkdir(exist_ok=True)
    (results / f"sdc-{int(started)}.json").write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
