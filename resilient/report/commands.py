"""`resilient report RUN_DIR [--out FILE.html]`."""

from __future__ import annotations

from pathlib import Path

import typer


def register(app: typer.Typer) -> None:
    @app.command("report")
    def report(
        run_dir: Path = typer.Argument(..., help="Run directory."),
        out: Path | None = typer.Option(None, "--out", help="HTML file (default: RUN_DIR/report.html)."),
    ) -> None:
        """Write one self-contained HTML report: loss, throughput/MFU, step time per rank, timeline, goodput."""
        from resilient.core.atomic import atomic_write
        from resilient.report.data import load
        from resilient.report.page import render

        data = load(run_dir)
        target = out or run_dir / "report.html"
        atomic_write(target, render(data, target), mode=0o644, durable=False)
        typer.echo(str(target))
