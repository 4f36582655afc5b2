"""A GPU provider that replays scripted device states from a JSON file (tests, chaos drills, Slurm tests).

The file (`<fake_nvml_dir>/<node>.json`) holds either one sample or a sequence of them:

    {"samples": [SAMPLE, SAMPLE, ...]}      or      SAMPLE

    SAMPLE  = {"available": true, "reason": "", "device_count": 2, "devices": [DEVICE, ...]}
    DEVICE  = {"index": 0, "lost": false, "xids": [79], "ecc_uncorrected": 0,
               "remap_pending": false, "remap_failed": false, "retired_pages_pending": false,
               "throttle": ["hw_slowdown" | "hw_thermal" | "hw_power_brake", ...],
               "temperature_c": 60, "pcie_replay": 0, "nvlink_errors": 0}

Every key except DEVICE.index is optional (see health.gpu.state for meanings); unknown keys are errors.
The n-th call of `sample()` returns the n-th sample and the last one forever after, so growth rules
(PCIe replays, NVLink errors) can be exercised. The file is re-read at each call so a drill can make a
node unhealthy during training by writing it. A missing file means "no NVML" on that node.
"""

from __future__ import annotations

import json
from pathlib import Path

from pydantic import ValidationError

from health.gpu.state import GpuSample
from resilient.core.errors import ConfigError


class FakeProvider:
    """Scripted GPU state read from one JSON file."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._calls = 0

    def sample(self) -> GpuSample:
        if not self.path.exists():
            return GpuSample(available=False, reason=f"no NVML (fake: no scripted state at {self.path})")
        try:
            doc = json.loads(self.path.read_text())
            samples = doc["samples"] if isinstance(doc, dict) and "samples" in doc else [doc]
            if not samples:
                raise ValueError("'samples' is empty")
            chosen = samples[min(self._calls, len(samples) - 1)]
            parsed = GpuSample.model_validate(chosen)
        except (ValueError, ValidationError, TypeError) as err:
            first = str(err).splitlines()[0] if not isinstance(err, ValidationError) else _first(err)
            raise ConfigError(f"{self.path}: bad fake NVML state ({first})") from None
        self._calls += 1
        return parsed

    def close(self) -> None:
        pass


def _first(err: ValidationError) -> str:
    e = err.errors()[0]
    return f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}"
