"""Checkpoint configuration."""

from resilient.configbase import Section


class CheckpointConfig(Section):
    """When and how checkpoints are saved, kept and verified."""

    interval_steps: int = 0
    """Save every N steps (0: off)."""
