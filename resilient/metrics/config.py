"""Metrics endpoint configuration."""

from resilient.configbase import Section


class MetricsConfig(Section):
    """Where each supervisor serves /metrics."""

    enabled: bool = True
    """Serve Prometheus metrics from the supervisor."""
    address: str = "127.0.0.1"
    """Address to bind; loopback by default so a single-machine run exposes nothing."""
    port: int = 9464
    """TCP port; 0 picks a free one (written to status.json)."""
