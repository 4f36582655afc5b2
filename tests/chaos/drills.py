"""The chaos tests' shared config: short runs, quick detection, small waits."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from resilient.chaos.runner import DrillOptions, run_drill
from resilient.chaos.schedule import build_schedule

REPO = Path(__file__).resolve().parents[2]
CONFIG = REPO / "examples" / "tiny.yaml"
STEPS = 32
COMMON = [
    f"train.steps={STEPS}",
    "train.warmup_steps=4",
    "train.eval_every=0",
    "train.log_every=100",
    "checkpoint.interval_steps=4",
    "metrics.port=0",
    "supervisor.termination_grace_s=2",
    "supervisor.backoff_initial_s=0.1",
    "supervisor.backoff_max_s=0.5",
    "supervisor.step_timeout_floor_s=4",
    "supervisor.step_timeout_factor=3",
    "supervisor.step_timeout_min_samples=3",
    "supervisor.checkpoint_timeout_s=20",
    "supervisor.status_interval_s=0.25",
    # a rank stuck before its first step is a hang the supervisor recovers well inside a drill's timeout
    "supervisor.init_timeout_s=90",
    "supervisor.build_timeout_s=90",
    "supervisor.restore_timeout_s=90",
    "supervisor.step_timeout_initial_s=90",
    "health.monitor_interval_s=1",
    "health.straggler_window=3",
    "health.straggler_windows=2",
]


def drill(
    run_dir: Path,
    schedule: str,
    faults: list[str],
    *,
    steps: int = STEPS,
    seed: int = 7,
    reference: str | None = None,
    overrides: tuple[str, ...] = (),
    python: str = sys.executable,
    bitflip_target: str = "weights",
) -> dict:
    """A drill in this process, or with `python` (another megatron-core line) through `resilient chaos`."""
    sets = [*COMMON, f"train.steps={steps}", *overrides]
    if python != sys.executable:
        args = [
            python,
            "-m",
            "resilient.cli",
            "chaos",
            str(CONFIG),
            "--run-dir",
            str(run_dir),
            "--schedule",
            schedule,
            "--faults",
            ",".join(faults),
            "--seed",
            str(seed),
            "--timeout",
            "300",
            "--detect-timeout",
            "60",
            "--bitflip-target",
            bitflip_target,
            *(["--reference-digest", reference] if reference else []),
            *(a for s in sets for a in ("--set", s)),
        ]
        out = subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=400)
        assert out.stdout.strip(), out.stderr[-3000:]
        return json.loads(out.stdout)
    opts = DrillOptions(
        config=CONFIG,
        run_dir=run_dir,
        overrides=sets,
        timeout_s=300,
        detect_timeout_s=60,
        orphan_wait_s=10,
        bitflip_target=bitflip_target,
    )
    return run_drill(opts, build_schedule(schedule, faults, seed), faults, seed=seed, reference_digest=reference)


def why_failed(report: dict) -> str:
    """A drill's failed checks in full, one per line (pytest shortens a dict shown as a message)."""
    return "\n".join(f"{check}: {reason}" for check, reason in report["failed_checks"].items()) or "(no check failed)"
