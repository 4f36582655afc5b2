"""`resilient chaos CONFIG --run-dir DIR --schedule SPEC --faults a,b --seed N`: a chaos drill, JSON report."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import typer

from resilient.chaos.faults import FAULTS
from resilient.chaos.runner import DrillOptions, run_drill
from resilient.chaos.schedule import build_schedule
from resilient.core.exit_codes import ExitCode


def register(app: typer.Typer) -> None:
    """Add `resilient chaos`."""

    @app.command("chaos")
    def chaos(
        config: Path = typer.Argument(..., help="Run config (YAML)."),
        run_dir: Path = typer.Option(..., "--run-dir", help="Run directory of the drill (fresh or resumed)."),
        schedule: str = typer.Option("none", help="none | mtbf:SECONDS | steps:S1,S2,... | times:T1,T2,..."),
        faults: str = typer.Option("kill_rank", help=f"Comma-separated fault kinds: {', '.join(FAULTS)}."),
        seed: int = typer.Option(0, help="Seed of the schedule and of the victim choice."),
        reference_digest: str | None = typer.Option(
            None, help="Digest of a fault-free run of the same config (`resilient ckpt digest`) to compare."
        ),
        timeout: float = typer.Option(900.0, help="Stop the drill after this many seconds."),
        detect_timeout: float = typer.Option(120.0, help="Seconds a fault may go unseen before it counts as missed."),
        bitflip_target: str = typer.Option("weights", help="What `bitflip` flips: weights, gradients or activation."),
        bitflip_bit: int | None = typer.Option(
            None,
            help="The bit `bitflip` flips (default: the highest mantissa bit; an activation's highest exponent bit).",
        ),
        set_: list[str] = typer.Option([], "--set", help="Override a config key (repeatable)."),
    ) -> None:
        """Run CONFIG under a seeded fault schedule, relaunching after preemption, supervisor death and
        unhealthy-node exits like a requeue; print a JSON report; exit 1 when a check failed."""
        kinds = [f.strip() for f in faults.split(",") if f.strip()]
        triggers = build_schedule(schedule, kinds, seed)
        report = run_drill(
            DrillOptions(
                config=config,
                run_dir=run_dir,
                overrides=list(set_),
                timeout_s=timeout,
                detect_timeout_s=detect_timeout,
                bitflip_target=bitflip_target,
                bitflip_bit=bitflip_bit,
            ),
            triggers,
            kinds,
            seed=seed,
            reference_digest=reference_digest,
        )
        typer.echo(json.dumps(report, indent=1))
        if not report["passed"]:
            print(f"resilient chaos: failed checks: {', '.join(report['failed_checks'])}", file=sys.stderr)
            raise typer.Exit(int(ExitCode.INTERNAL_ERROR))
