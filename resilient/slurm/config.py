"""Slurm submission configuration (owned by the slurm package)."""

from resilient.configbase import Section


class SlurmConfig(Section):
    """How `resilient launch` renders and submits the batch job."""

    partition: str | None = None
    """Slurm partition to submit to (None: the cluster default)."""
