"""Supervisor configuration (owned by the supervisor package)."""

from resilient.configbase import Section


class SupervisorConfig(Section):
    """How the per-node supervisor spawns, watches and restarts ranks."""

    nproc_per_node: int = 2
    """Ranks spawned on each node (GPUs per node on GPU clusters)."""
