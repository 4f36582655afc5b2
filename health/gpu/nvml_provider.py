"""The real GPU provider: pynvml (nvidia-ml-py), imported lazily so machines without GPUs load this fine.

Without the NVML library or driver every sample says `available=False, reason="no NVML (...)"`.
XIDs arrive through an NVML event set registered for critical-XID events; each `sample()` drains it,
waiting at most `event_timeout_ms` for the first event so a periodic monitor never blocks long.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from health.gpu.state import DeviceState, GpuSample, ThrottleReason

_MAX_EVENTS_PER_SAMPLE = 256


class _Lost(Exception):
    """The device answered NVML_ERROR_GPU_IS_LOST."""


class NvmlProvider:
    """Reads GPU state through NVML."""

    def __init__(self, event_timeout_ms: int = 100) -> None:
        self.event_timeout_ms = event_timeout_ms
        self._nvml: Any = None
        self._events: Any = None
        self.reason = ""
        try:
            import pynvml
        except ImportError:
            self.reason = "no NVML (pynvml is not installed)"
            return
        try:
            pynvml.nvmlInit()
        except pynvml.NVMLError as err:
            self.reason = f"no NVML ({err})"
            return
        self._nvml = pynvml
        self._register_xid_events()

    def _register_xid_events(self) -> None:
        nv = self._nvml
        try:
            self._events = nv.nvmlEventSetCreate()
        except nv.NVMLError:
            return
        for i in range(nv.nvmlDeviceGetCount()):
            try:
                nv.nvmlDeviceRegisterEvents(
                    nv.nvmlDeviceGetHandleByIndex(i), nv.nvmlEventTypeXidCriticalError, self._events
                )
            except nv.NVMLError:
                continue  # not supported or lost: the per-device queries report it

    def sample(self) -> GpuSample:
        nv = self._nvml
        if nv is None:
            return GpuSample(available=False, reason=self.reason)
        try:
            count = nv.nvmlDeviceGetCount()
        except nv.NVMLError as err:
            return GpuSample(available=False, reason=f"NVML device count failed ({err})")
        xids = self._drain_xids()
        devices = [self._device(i, xids.get(i, [])) for i in range(count)]
        return GpuSample(device_count=count, devices=devices)

    def _drain_xids(self) -> dict[int, list[int]]:
        nv, found = self._nvml, {}
        if self._events is None:
            return found
        timeout = self.event_timeout_ms
        for _ in range(_MAX_EVENTS_PER_SAMPLE):
            try:
                data = nv.nvmlEventSetWait_v2(self._events, timeout)
            except nv.NVMLError:
                break  # timeout (no more events) or a lost GPU, which the device queries report
            timeout = 0
            if data.eventType & nv.nvmlEventTypeXidCriticalError:
                try:
                    index = nv.nvmlDeviceGetIndex(data.device)
                except nv.NVMLError:
                    index = -1
                found.setdefault(index, []).append(int(data.eventData))
        # An event from a device whose index NVML could not tell is charged to device 0 rather than lost.
        if -1 in found:
            found.setdefault(0, []).extend(found.pop(-1))
        return found

    def _device(self, index: int, xids: list[int]) -> DeviceState:
        nv = self._nvml
        try:
            h = self._query(nv.nvmlDeviceGetHandleByIndex, index, required=True)
            remap = self._query(nv.nvmlDeviceGetRemappedRows, h)
            retired = self._query(nv.nvmlDeviceGetRetiredPagesPendingStatus, h)
            reasons = self._query(nv.nvmlDeviceGetCurrentClocksEventReasons, h)
            if reasons is None:  # drivers before 535 only know the older name; same bits
                reasons = self._query(nv.nvmlDeviceGetCurrentClocksThrottleReasons, h)
            milliwatts = self._query(nv.nvmlDeviceGetPowerUsage, h)
            return DeviceState(
                index=index,
                xids=xids,
                power_w=None if milliwatts is None else milliwatts / 1000.0,
                ecc_uncorrected=self._query(
                    nv.nvmlDeviceGetTotalEccErrors, h, nv.NVML_MEMORY_ERROR_TYPE_UNCORRECTED, nv.NVML_VOLATILE_ECC
                ),
                remap_pending=None if remap is None else bool(remap[2]),
                remap_failed=None if remap is None else bool(remap[3]),
                retired_pages_pending=None if retired is None else retired == nv.NVML_FEATURE_ENABLED,
                throttle=[] if reasons is None else self._throttle_names(reasons),
                temperature_c=self._query(nv.nvmlDeviceGetTemperature, h, nv.NVML_TEMPERATURE_GPU),
                pcie_replay=self._query(nv.nvmlDeviceGetPcieReplayCounter, h),
                nvlink_errors=self._nvlink_errors(h),
            )
        except _Lost:
            return DeviceState(index=index, lost=True, xids=xids)

    def _query(self, fn: Callable[..., Any], *args: Any, required: bool = False) -> Any:
        """fn(*args); None when unsupported; raises _Lost when the GPU is lost."""
        nv = self._nvml
        try:
            return fn(*args)
        except nv.NVMLError_GpuIsLost:
            raise _Lost() from None
        except nv.NVMLError:
            if required:
                raise
            return None

    def _throttle_names(self, mask: int) -> list[ThrottleReason]:
        nv = self._nvml
        bits: list[tuple[int, ThrottleReason]] = [
            (nv.nvmlClocksEventReasonHwSlowdown, "hw_slowdown"),
            (nv.nvmlClocksEventReasonHwThermalSlowdown, "hw_thermal"),
            (nv.nvmlClocksEventReasonHwPowerBrakeSlowdown, "hw_power_brake"),
        ]
        return [name for bit, name in bits if mask & bit]

    def _nvlink_errors(self, h: Any) -> int | None:
        nv = self._nvml
        counters = (
            nv.NVML_NVLINK_ERROR_DL_REPLAY,
            nv.NVML_NVLINK_ERROR_DL_RECOVERY,
            nv.NVML_NVLINK_ERROR_DL_CRC_FLIT,
            nv.NVML_NVLINK_ERROR_DL_CRC_DATA,
        )
        total, active = 0, False
        for link in range(nv.NVML_NVLINK_MAX_LINKS):
            if not self._query(nv.nvmlDeviceGetNvLinkState, h, link):
                continue
            active = True
            for counter in counters:
                total += self._query(nv.nvmlDeviceGetNvLinkErrorCounter, h, link, counter) or 0
        return total if active else None

    def close(self) -> None:
        nv, self._nvml = self._nvml, None
        if nv is None:
            return
        if self._events is not None:
            try:
                nv.nvmlEventSetFree(self._events)
            except nv.NVMLError:
                pass
        try:
            nv.nvmlShutdown()
        except nv.NVMLError:
            pass
