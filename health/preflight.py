"""Pre-flight: every GPU rule on one sample plus the node checks, before ranks are spawned."""

from __future__ import annotations

from pathlib import Path

from health.config import HealthConfig
from health.gpu.provider import provider_for
from health.gpu.rules import evaluate
from health.node_checks import node_checks
from health.types import HealthReport


def run_preflight(cfg: HealthConfig, *, node: str, ckpt_dir: Path, nproc: int = 1) -> HealthReport:
    """GPU state via the configured provider and the node checks, as one report for `node`; with
    `preflight_collective`, the collective probe over the node's `nproc` ranks too."""
    provider = provider_for(cfg, node)
    try:
        sample = provider.sample()
    finally:
        provider.close()
    results = evaluate(None, sample, cfg) + node_checks(Path(ckpt_dir), cfg)
    if cfg.preflight_collective and nproc >= 2:
        from health.collective_local import check_local_collective

        results.append(check_local_collective(cfg, nproc, node=node))
    return HealthReport(node, results)
