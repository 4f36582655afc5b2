"""The narrow interface between GPU rules and whatever reads GPU state, and its selection."""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping
from typing import TYPE_CHECKING, Protocol

from health.gpu.state import GpuSample

if TYPE_CHECKING:
    from health.config import HealthConfig


class GpuProvider(Protocol):
    """Reads the node's GPU state; `sample()` waits at most the configured event timeout."""

    def sample(self) -> GpuSample: ...

    def close(self) -> None: ...


def node_name(env: Mapping[str, str] = os.environ) -> str:
    """This node's name as the health checks, metrics and ledger label it."""
    return env.get("RESILIENT_NODE_NAME") or env.get("SLURMD_NODENAME") or socket.gethostname()


def provider_for(cfg: HealthConfig, node: str) -> GpuProvider:
    """The scripted provider when `fake_nvml_dir` is set, else the real NVML provider."""
    if cfg.fake_nvml_dir is not None:
        from health.gpu.fake_provider import FakeProvider

        return FakeProvider(cfg.fake_nvml_dir / f"{node}.json")
    from health.gpu.nvml_provider import NvmlProvider

    return NvmlProvider(event_timeout_ms=cfg.event_timeout_ms)
