"""CLI commands of this component: `resilient launch` and `resilient slurm on-exit`."""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

import typer

from resilient.config import load_config


def launch(
    config: Path = typer.Argument(..., help="Run config (YAML)."),
    run_dir: Path | None = typer.Option(None, "--run-dir", help="Run directory (default: the config's run_dir)."),
    overrides: list[str] = typer.Option([], "--set", help="Override a config key: --set train.steps=50."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print the batch script; submit nothing."),
) -> None:
    """Validate the config, render the sbatch script into RUN_DIR and submit it."""
    from resilient.slurm.launch import submit_run
    from resilient.slurm.render import render_batch_script

    cfg = load_config(config, overrides)
    cfg.run_dir = (run_dir or cfg.run_dir).resolve()
    script = render_batch_script(cfg, cfg.run_dir, python=sys.executable)
    if dry_run:
        typer.echo(script, nl=False)
        return
    job_id = submit_run(cfg, cfg.run_dir, script)
    typer.echo(f"submitted job {job_id}")
    typer.echo(f"run dir {cfg.run_dir}")


def on_exit(
    run_dir: Path = typer.Argument(..., help="Run directory."),
    exit_code: int = typer.Argument(..., help="Exit code of the supervisors' srun step."),
    since: float = typer.Option(
        0.0, "--since", help="Unix time the allocation started (ledger records before it are ignored)."
    ),
) -> None:
    """Called by the batch script when its supervisors have exited: requeue (without bad nodes) or stop;
    exits with the run's code."""
    # Requeueing terminates this job: finish the bookkeeping regardless.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    from resilient.slurm.on_exit import handle_job_end

    decision, reason, code = handle_job_end(run_dir.resolve(), exit_code, since=since, env=os.environ)
    typer.echo(f"resilient: {decision.action}: {reason}")
    sys.exit(code)  # the batch job ends with the run's code, not with that of a fenced node's supervisor


def register(app: typer.Typer) -> None:
    """Add this component's commands to the `resilient` app."""
    app.command("launch")(launch)
    slurm = typer.Typer(help="Slurm helpers used by the batch script.", no_args_is_help=True)
    slurm.command("on-exit")(on_exit)
    app.add_typer(slurm, name="slurm")
