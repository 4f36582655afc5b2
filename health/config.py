"""Health-check configuration (owned by the health package)."""

from resilient.configbase import Section


class HealthConfig(Section):
    """What the health checks expect and how strict they are."""

    enabled: bool = True
    """Run pre-flight checks before each attempt and periodic checks during training."""
