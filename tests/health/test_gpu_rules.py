"""GPU rules against scripted device states read through the fake provider."""

import json

import pytest

from health.config import HealthConfig
from health.gpu.fake_provider import FakeProvider
from health.gpu.nvml_provider import NvmlProvider
from health.gpu.provider import provider_for
from health.gpu.rules import evaluate
from health.types import Severity
from resilient.core.errors import ConfigError
from tests.health.conftest import healthy_device


def run_rules(cfg: HealthConfig, node: str = "n1", polls: int = 1) -> dict:
    """Poll the provider `polls` times and judge the last sample against the one before it."""
    provider = provider_for(cfg, node)
    prev = None
    for _ in range(polls):
        cur = provider.sample()
        results = evaluate(prev, cur, cfg)
        prev = cur
    return {r.name: r for r in results}


def sample(*devices) -> dict:
    return {"devices": list(devices)}


def test_healthy_node_passes_every_rule(script):
    results = run_rules(script("n1", sample(healthy_device(0), healthy_device(1)), gpus_per_node=2))
    assert set(results) == {
        "gpu.count",
        "gpu.lost",
        "gpu.xid",
        "gpu.ecc",
        "gpu.row_remap",
        "gpu.throttle",
        "gpu.temperature",
        "gpu.pcie_replay",
        "gpu.nvlink",
        "gpu.telemetry",
    }
    assert all(r.severity is Severity.OK for r in results.values()), results
    readings = results["gpu.telemetry"].values["gpus"]
    assert sorted(readings) == [0, 1] and readings[1]["lost"] is False and readings[1]["last_xid"] == 0


def test_xid_79_is_fatal(script):
    r = run_rules(script("n1", sample(healthy_device(0), healthy_device(1, xids=[79]))))["gpu.xid"]
    assert r.severity is Severity.FATAL
    assert "XID 79 on gpu1" in r.reason


@pytest.mark.parametrize("code", [13, 31, 43, 45, 68, 109])
def test_application_xids_are_ignored(script, code):
    r = run_rules(script("n1", sample(healthy_device(0, xids=[code]))))["gpu.xid"]
    assert r.severity is Severity.OK
    assert f"XID {code} on gpu0" in r.reason and "ignored" in r.reason


def test_ignored_xid_next_to_critical_one_is_fatal(script):
    r = run_rules(script("n1", sample(healthy_device(0, xids=[13, 48]))))["gpu.xid"]
    assert r.severity is Severity.FATAL and "XID 48" in r.reason and "13" not in r.reason


def test_uncorrectable_ecc_is_fatal(script):
    r = run_rules(script("n1", sample(healthy_device(0), healthy_device(1, ecc_uncorrected=2))))["gpu.ecc"]
    assert r.severity is Severity.FATAL
    assert "2 on gpu1" in r.reason


def test_row_remap_pending_and_failed_are_fatal(script):
    r = run_rules(script("n1", sample(healthy_device(0, remap_pending=True), healthy_device(1, remap_failed=True))))
    assert r["gpu.row_remap"].severity is Severity.FATAL
    assert "pending on gpu0" in r["gpu.row_remap"].reason and "failed on gpu1" in r["gpu.row_remap"].reason


def test_retired_pages_pending_is_fatal_on_older_gpus(script):
    dev = {"index": 0, "retired_pages_pending": True}  # pre-Ampere: no row-remapping fields at all
    r = run_rules(script("n1", sample(dev)))["gpu.row_remap"]
    assert r.severity is Severity.FATAL and "page retirement pending on gpu0" in r.reason


def test_gpu_lost_is_fatal(script):
    r = run_rules(script("n1", sample(healthy_device(0), {"index": 1, "lost": True})))["gpu.lost"]
    assert r.severity is Severity.FATAL
    assert "gpu1 lost" in r.reason and "GPU_IS_LOST" in r.reason


def test_thermal_throttle_warns_by_default_and_can_be_fatal(script):
    s = sample(healthy_device(0, throttle=["hw_thermal"]))
    r = run_rules(script("n1", s))["gpu.throttle"]
    assert r.severity is Severity.WARN and "gpu0: hw_thermal" in r.reason
    assert run_rules(script("n1", s, throttle_severity="fatal"))["gpu.throttle"].severity is Severity.FATAL


def test_temperature_thresholds(script):
    hot = run_rules(script("n1", sample(healthy_device(0, temperature_c=88))))["gpu.temperature"]
    assert hot.severity is Severity.WARN and "gpu0 at 88 C" in hot.reason
    burning = run_rules(script("n1", sample(healthy_device(0), healthy_device(1, temperature_c=97))))["gpu.temperature"]
    assert burning.severity is Severity.FATAL and "gpu1 at 97 C" in burning.reason


def test_pcie_replay_growth_between_samples(script):
    cfg = script("n1", sample(healthy_device(0, pcie_replay=100)), sample(healthy_device(0, pcie_replay=150)))
    first = run_rules(cfg, polls=1)["gpu.pcie_replay"]
    assert first.severity is Severity.OK and "baseline" in first.reason
    grown = run_rules(cfg, polls=2)["gpu.pcie_replay"]
    assert grown.severity is Severity.WARN
    assert "grew by 50 on gpu0" in grown.reason
    assert grown.values["growth"] == {0: 50}


def test_pcie_replay_storm_is_fatal(script):
    cfg = script("n1", sample(healthy_device(0, pcie_replay=0)), sample(healthy_device(0, pcie_replay=5000)))
    assert run_rules(cfg, polls=2)["gpu.pcie_replay"].severity is Severity.FATAL


def test_nvlink_error_growth(script):
    cfg = script(
        "n1",
        sample(healthy_device(0), healthy_device(1, nvlink_errors=3)),
        sample(healthy_device(0), healthy_device(1, nvlink_errors=7)),
    )
    r = run_rules(cfg, polls=2)["gpu.nvlink"]
    assert r.severity is Severity.WARN and "grew by 4 on gpu1" in r.reason
    steady = script("n1", sample(healthy_device(0, nvlink_errors=3)), sample(healthy_device(0, nvlink_errors=3)))
    assert run_rules(steady, polls=2)["gpu.nvlink"].severity is Severity.OK


def test_device_count(script):
    devices = sample(*(healthy_device(i) for i in range(7)))
    missing = run_rules(script("n1", devices, gpus_per_node=8))["gpu.count"]
    assert missing.severity is Severity.FATAL and "7 GPUs visible, expected 8" in missing.reason
    assert run_rules(script("n1", devices, gpus_per_node=7))["gpu.count"].severity is Severity.OK


def test_sequence_stays_on_last_sample(script):
    cfg = script("n1", sample(healthy_device(0)), sample(healthy_device(0, xids=[79])))
    p = provider_for(cfg, "n1")
    assert [bool(p.sample().devices[0].xids) for _ in range(4)] == [False, True, True, True]


def test_node_without_scripted_state_has_no_nvml(script):
    cfg = script("other", sample(healthy_device(0)))
    results = run_rules(cfg, node="n1")
    assert list(results) == ["gpu"] and results["gpu"].skipped and "no NVML" in results["gpu"].reason
    expected = run_rules(cfg.model_copy(update={"gpus_per_node": 8}), node="n1")["gpu.count"]
    assert expected.severity is Severity.FATAL and "expected 8 GPUs" in expected.reason


def test_bad_scripted_state_is_a_config_error(tmp_path):
    (tmp_path / "n1.json").write_text(json.dumps({"devices": [{"index": 0, "temprature_c": 3}]}))
    with pytest.raises(ConfigError, match="temprature_c"):
        FakeProvider(tmp_path / "n1.json").sample()
    (tmp_path / "n1.json").write_text("{not json")
    with pytest.raises(ConfigError, match="bad fake NVML state"):
        FakeProvider(tmp_path / "n1.json").sample()


def _nvml_present() -> bool:
    import pynvml

    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError:
        return False
    pynvml.nvmlShutdown()
    return True


def test_real_provider_reads_gpus_or_reports_no_nvml_cleanly():
    """One test for both kinds of machine, so that neither is skipped: CPU CI checks the no-NVML path,
    scripts/gpu_smoke.sh the real one."""
    provider = provider_for(HealthConfig(event_timeout_ms=10), "n1")
    assert isinstance(provider, NvmlProvider)
    try:
        first, second = provider.sample(), provider.sample()
    finally:
        provider.close()
    if _nvml_present():
        assert first.available and first.count >= 1
        results = {r.name: r for r in evaluate(first, second, HealthConfig())}
        assert "gpu.xid" in results and results["gpu.lost"].severity is Severity.OK
        return
    assert not first.available and first.reason.startswith("no NVML")
    results = evaluate(None, first, HealthConfig())
    assert len(results) == 1 and results[0].skipped and results[0].severity is Severity.OK
    assert "skipped: no NVML" in results[0].reason
