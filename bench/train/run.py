"""bench/train: tokens/s and step time of the tiny preset on CPU, through the real CLI.

    python bench/train/run.py [--config examples/tiny.yaml] [--steps 200] [--set k=v ...]

Runs `resilient run` (2 gloo ranks, supervised) in a fresh run directory and reports medians over
the steps after a warm-up, read from RUN_DIR/train_log.jsonl.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    parser.add_argument("--config", type=Path, default=REPO / "examples" / "tiny.yaml")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    args = parser.parse_args()
    run_dir = Path(tempfile.mkdtemp(prefix="bench-train-"))
    sets = [a for o in [f"train.steps={args.steps}", "train.eval_every=0", "checkpoint.interval_steps=0",
                        *args.overrides] for a in ("--set", o)]
    proc = subprocess.run([sys.executable, "-m", "resilient.cli", "run", str(args.config), "--run-dir", str(run_dir),
                           *sets], cwd=REPO, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"run failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    steps = [json.loads(line) for line in (run_dir / "train_log.jsonl").read_text().splitlines()]
    steps = [s for s in steps if "loss" in s and s["step"] > args.warmup]
    result = {
        "steps_measured": len(steps),
        "tokens_per_step": int(steps[0]["tokens"] / steps[0]["step"]),
        "median_step_time_s": statistics.median(s["step_time"] for s in steps),
        "median_tokens_per_s": statistics.median(s["tokens_per_s"] for s in steps),
        "median_mfu_vs_configured_peak": statistics.median(s["mfu"] for s in steps),
        "first_loss": steps[0]["loss"], "last_loss": steps[-1]["loss"],
        "run_dir": str(run_dir),
    }
    print(f"tiny preset, 2 CPU ranks: {result['median_tokens_per_s']:,.0f} tokens/s, "
          f"step {result['median_step_time_s'] * 1000:.1f} ms (median of {len(steps)} steps)")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
