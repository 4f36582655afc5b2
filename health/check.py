"""`resilient health check`: everything that applies on this machine, as one report."""

from __future__ import annotations

from pathlib import Path

from health.gpu.provider import node_name
from health.preflight import run_preflight
from health.types import HealthReport, skipped
from resilient.config import load_config


def check_node(config: Path | None, overrides: list[str], *, run_dir: Path | None, collective: bool,
               nproc: int | None) -> HealthReport:
    cfg = load_config(config, overrides)
    node = node_name()
    report = run_preflight(cfg, node=node, run_dir=run_dir or cfg.run_dir)
    if not collective:
        probe = skipped("collective.allreduce", "not requested (pass --collective)")
    else:
        import torch

        from health.collective import judge
        from health.collective_local import run_local_probe

        n = nproc or cfg.supervisor.nproc_per_node
        backend = "nccl" if torch.cuda.is_available() and torch.cuda.device_count() >= n else "gloo"
        probe = judge(run_local_probe(cfg.health, n, node=node, backend=backend), cfg.health)
    return HealthReport(node, [*report.results, probe])
