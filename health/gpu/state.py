"""What a GPU provider reports: one GpuSample per poll, one DeviceState per device.

A field left at None means the device does not support that query; rules skip it.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

ThrottleReason = Literal["hw_slowdown", "hw_thermal", "hw_power_brake"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True)


class DeviceState(_Strict):
    """One GPU at one poll."""

    index: int = Field(ge=0)
    """NVML device index."""
    lost: bool = False
    """NVML answered NVML_ERROR_GPU_IS_LOST: the GPU fell off the bus."""
    xids: list[int] = Field(default_factory=list)
    """XID codes of critical-error events seen since the previous poll."""
    ecc_uncorrected: int | None = None
    """Volatile (since driver load) uncorrectable ECC error count."""
    remap_pending: bool | None = None
    """A row remapping waits for a GPU reset."""
    remap_failed: bool | None = None
    """A row remapping failed: the memory has an unrepairable error."""
    retired_pages_pending: bool | None = None
    """A page retirement waits for a reboot (GPUs before Ampere, which retire pages instead of remapping rows)."""
    throttle: list[ThrottleReason] = Field(default_factory=list)
    """Hardware clock-throttle reasons active now."""
    temperature_c: int | None = None
    """GPU core temperature in Celsius."""
    power_w: float | None = None
    """Board power draw in watts."""
    pcie_replay: int | None = None
    """PCIe replay counter (monotonic)."""
    nvlink_errors: int | None = None
    """Sum of NVLink replay, recovery and CRC error counters over all active links (monotonic)."""


class GpuSample(_Strict):
    """All GPUs of a node at one poll."""

    available: bool = True
    """False when GPU state cannot be read at all (no NVML library or driver)."""
    reason: str = ""
    """Why the state could not be read (when not available)."""
    device_count: int | None = Field(None, ge=0)
    """Devices NVML counts (None: the number of `devices`)."""
    devices: list[DeviceState] = Field(default_factory=list)
    """Per-device state."""

    @property
    def count(self) -> int:
        return len(self.devices) if self.device_count is None else self.device_count
