"""Pre-flight: every GPU rule on one sample plus the node checks, before ranks are spawned."""

from __future__ import annotations

from pathlib import Path

from health.config import HealthConfig
from health.gpu.provider import provider_for
from health.gpu.rules import evaluate
from health.node_checks import node_checks
from health.types import HealthReport


def run_preflight(cfg: HealthConfig, *, node: str, ckpt_dir: Path) -> HealthReport:
    """GPU state via the configured provider and the node checks, as one report for `node`."""
    provider = provider_for(cfg, node)
    try:
        sample = provider.sample()
    finally:
        provider.close()
    return HealthReport(node, evaluate(None, sample, cfg) + node_checks(Path(ckpt_dir), cfg))
