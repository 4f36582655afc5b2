"""bench/train: tokens/s and step time of the tiny preset on 2 CPU ranks, through the real CLI.

    python bench/train/run.py [--steps 100] [--baseline OLD_TREE] [--layouts default,pp2,distopt] [--repeats 2]

Each layout runs `resilient run examples/tiny.yaml` (2 gloo ranks, supervised) in a fresh run
directory and reports the median over the steps after a warm-up, read from RUN_DIR/train_log.jsonl.
With --baseline (a checkout of an older commit, e.g. a git worktree), that tree's trainer runs the
default layout too, alternating with this tree's runs so both see the same machine load; the best
of the repeats is kept for each (the least disturbed by other processes).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
LAYOUTS = {
    "default": [],
    "pp2": ["parallel.pp=2"],
    "distopt": ["parallel.distributed_optimizer=true"],
    "pp2_distopt": ["parallel.pp=2", "parallel.distributed_optimizer=true"],
}


def run_once(tree: Path, overrides: list[str], steps: int, warmup: int) -> dict:
    run_dir = Path(tempfile.mkdtemp(prefix="bench-train-"))
    sets = [
        a
        for o in [
            f"train.steps={steps}",
            "train.eval_every=0",
            "checkpoint.interval_steps=0",
            "checkpoint.save_on_finish=false",
            *overrides,
        ]
        for a in ("--set", o)
    ]
    env = {**os.environ, "PYTHONPATH": str(tree), "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "resilient.cli",
            "run",
            str(tree / "examples" / "tiny.yaml"),
            "--run-dir",
            str(run_dir),
            *sets,
        ],
        cwd=tree,
        env=env,
        capture_output=True,
        text=True,
    )
    if proc.returncode != 0:
        sys.exit(f"{tree} {overrides}: run failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    steps_log = [json.loads(line) for line in (run_dir / "train_log.jsonl").read_text().splitlines()]
    steps_log = [s for s in steps_log if "loss" in s and s["step"] > warmup]
    return {
        "median_tokens_per_s": statistics.median(s["tokens_per_s"] for s in steps_log),
        "median_step_time_s": statistics.median(s["step_time"] for s in steps_log),
        "first_loss": steps_log[0]["loss"],
        "last_loss": steps_log[-1]["loss"],
        "steps_measured": len(steps_log),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--baseline", type=Path, help="tree of the trainer to compare against (default layout)")
    parser.add_argument("--layouts", default="default,pp2,distopt", help=f"comma list of {', '.join(LAYOUTS)}")
    args = parser.parse_args()
    results: dict[str, dict] = {}
    for _ in range(args.repeats):
        if args.baseline:
            best = results.get("baseline")
            got = run_once(args.baseline.resolve(), [], args.steps, args.warmup)
            if best is None or got["median_tokens_per_s"] > best["median_tokens_per_s"]:
                results["baseline"] = got
        for name in args.layouts.split(","):
            got = run_once(REPO, LAYOUTS[name], args.steps, args.warmup)
            if name not in results or got["median_tokens_per_s"] > results[name]["median_tokens_per_s"]:
                results[name] = got
    for name, r in results.items():
        print(
            f"{name:12s} {r['median_tokens_per_s']:8,.0f} tokens/s  step {r['median_step_time_s'] * 1000:6.1f} ms  "
            f"loss {r['first_loss']:.3f} -> {r['last_loss']:.3f}"
        )
    if "baseline" in results and "default" in results:
        ratio = results["default"]["median_tokens_per_s"] / results["baseline"]["median_tokens_per_s"]
        print(f"new/baseline tokens/s: {ratio:.3f}")
        results["new_over_baseline"] = ratio
    print(json.dumps(results))


if __name__ == "__main__":
    main()
