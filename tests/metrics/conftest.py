"""Fixtures: a started NodeMetrics on an ephemeral loopback port, and a feeder driving it like a supervisor."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from resilient.metrics.config import MetricsConfig
from resilient.metrics.exporter import NodeMetrics

from .feed import NODE


@pytest.fixture
def exporter() -> Iterator[tuple[NodeMetrics, int]]:
    metrics = NodeMetrics(MetricsConfig(address="127.0.0.1", port=0), NODE)
    port = metrics.start()
    yield metrics, port
    metrics.stop()
