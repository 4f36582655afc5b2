"""`resilient status`: kept light (no torch, no config models), since scripts and operators poll it.

The CLI imports this module alone for `resilient status` (see resilient/cli.py).
"""

from __future__ import annotations

import json
from pathlib import Path

import typer
from rich.console import Console

from resilient.goodput import render as render_goodput
from resilient.slurm.jobs import job_state, last_job_id
from resilient.status import ENDED_STATES, read_status, render_status, run_goodput


def register(app: typer.Typer) -> None:
    @app.command("status")
    def status(run_dir: Path = typer.Argument(..., help="Run directory."),
               as_json: bool = typer.Option(False, "--json", help="Print status.json as JSON.")) -> None:
        """Show a run's state, attempt, step, checkpoint, ranks and last failure (from RUN_DIR/status.json)."""
        data = read_status(run_dir)
        # A run that has ended stops accruing wall time at its last update.
        ended = data.get("state") in ENDED_STATES
        report = run_goodput(run_dir, now=data.get("written_at") if ended else None)
        job_id = last_job_id(run_dir)
        slurm = {"job_id": job_id, "state": job_state(job_id)} if job_id else None
        if as_json:
            typer.echo(json.dumps({**data, "goodput": {"ratio": report.ratio, "wall_seconds": report.wall_seconds,
                                                       "productive_seconds": report.productive_seconds,
                                                       "badput_seconds": report.badput_seconds},
                                   "slurm": slurm}))  # compact: the C encoder (8192 ranks)
            return
        console = Console()
        render_status(data, console)
        if slurm:
            console.print(f"slurm job {slurm['job_id']}: {slurm['state'] or 'not known to Slurm'}")
        console.print(render_goodput(report))
