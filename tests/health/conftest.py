import json
from pathlib import Path

import pytest

from health.config import HealthConfig


def healthy_device(index: int, **over) -> dict:
    return {
        "index": index,
        "xids": [],
        "ecc_uncorrected": 0,
        "remap_pending": False,
        "remap_failed": False,
        "retired_pages_pending": False,
        "throttle": [],
        "temperature_c": 50,
        "pcie_replay": 10,
        "nvlink_errors": 0,
        **over,
    }


@pytest.fixture
def script(tmp_path: Path):
    """Write scripted GPU samples for a node; returns a HealthConfig pointing at them."""

    def write(node: str, *samples: dict, **cfg) -> HealthConfig:
        d = tmp_path / "fake_nvml"
        d.mkdir(exist_ok=True)
        (d / f"{node}.json").write_text(json.dumps({"samples": list(samples)}))
        return HealthConfig(fake_nvml_dir=d, **cfg)

    return write
