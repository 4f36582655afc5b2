"""`resilient health check`: every health check that applies on this machine, as one report.

Composition: reads the run config, hands health its own section and the run's checkpoint directory.
"""

from __future__ import annotations

import json
from pathlib import Path

import typer


def register(app: typer.Typer) -> None:
    """Add `resilient health` to the app."""
    health = typer.Typer(
        help="Node health: GPUs (NVML), checkpoint disk, memory, /dev/shm, collectives.", no_args_is_help=True
    )

    @health.command("check")
    def check(
        as_json: bool = typer.Option(False, "--json", help="Print the report as JSON."),
        collective: bool = typer.Option(False, "--collective", help="Also run the local all-reduce probe."),
        config: Path | None = typer.Option(None, "--config", help="Run config YAML (default: built-in defaults)."),
        overrides: list[str] | None = typer.Option(None, "--set", help="Config override key.sub=value (repeatable)."),
        run_dir: Path | None = typer.Option(
            None, "--run-dir", help="Run directory whose checkpoint directory is checked."
        ),
        nproc: int | None = typer.Option(
            None, "--nproc", min=2, help="Probe ranks (default: supervisor.nproc_per_node)."
        ),
    ) -> None:
        """Run every health check that applies here; a fatal result exits with UNHEALTHY_NODE (76). With
        metrics.textfile_dir set, the verdict replaces the node's last one there (e.g. after a repair)."""
        from health.actions import decide_health
        from health.errors import UnhealthyNodeError
        from health.preflight import run_preflight
        from health.types import HealthReport, Severity, skipped
        from resilient.config import load_config
        from resilient.rank.env import node_name

        cfg = load_config(config, overrides or [])
        node = node_name()
        metrics = None
        if cfg.metrics.textfile_dir is not None:
            from resilient.metrics.exporter import NodeMetrics

            metrics = NodeMetrics(cfg.metrics, node)  # not served: only the node's durable facts are written
            metrics.facts.check()
        report = run_preflight(cfg.health, node=node, ckpt_dir=cfg.checkpoint.root(run_dir or cfg.run_dir))
        if collective:
            from health.collective_local import check_local_collective

            probe = check_local_collective(cfg.health, nproc or cfg.supervisor.nproc_per_node, node=node)
        else:
            probe = skipped("collective.allreduce", "not requested (pass --collective)")
        report = HealthReport(node, [*report.results, probe])
        if metrics is not None:
            metrics.on_health(report, decide_health(report, "check"))
        if as_json:
            typer.echo(json.dumps(report.to_json(), default=str))
        else:
            for r in report.results:
                label = "skip" if r.skipped else str(r.severity)
                typer.echo(f"{label:<6} {r.name:<22} {r.reason}")
            typer.echo(report.verdict()[1])
        severity, reason = report.verdict()
        if severity is Severity.FATAL:
            raise UnhealthyNodeError(reason)

    app.add_typer(health, name="health")
