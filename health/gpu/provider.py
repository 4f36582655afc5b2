"""The narrow interface between GPU rules and whatever reads GPU state, and its selection."""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

from health.gpu.state import GpuSample

if TYPE_CHECKING:
    from health.config import HealthConfig


class GpuProvider(Protocol):
    """Reads the node's GPU state; `sample()` waits at most the configured event timeout."""

    def sample(self) -> GpuSample: ...

    def close(self) -> None: ...


def provider_for(cfg: HealthConfig, node: str) -> GpuProvider:
    """The scripted provider when `fake_nvml_dir` is set, else the real NVML provider."""
    if cfg.fake_nvml_dir is not None:
        from health.gpu.fake_provider import FakeProvider

        return FakeProvider(cfg.fake_nvml_dir / f"{node}.json")
    from health.gpu.nvml_provider import NvmlProvider

    return NvmlProvider(event_timeout_ms=cfg.event_timeout_ms)
