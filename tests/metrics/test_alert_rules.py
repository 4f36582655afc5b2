"""promtool: the alert rules are valid, their unit tests pass, and every alert's tests notice when it never fires."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest
import yaml

from .prom import GRAFANA, PROMTOOL, RULES, alert_rules, require

pytestmark = [
    pytest.mark.prometheus,
]


@pytest.fixture(autouse=True)
def _tool_installed():
    require("promtool")


TESTS = sorted((GRAFANA / "alerts" / "tests").glob("*.yml"))
REQUIRED = {
    "ResilientGpuXidCritical",
    "ResilientGpuEccUncorrectable",
    "ResilientGpuRowRemapPending",
    "ResilientGpuRowRemapFailed",
    "ResilientGpuLost",
    "ResilientGpuThermalThrottling",
    "ResilientRankHeartbeatStale",
    "ResilientRestartLoop",
    "ResilientNoProgress",
    "ResilientThroughputDrop",
    "ResilientCheckpointTooOld",
    "ResilientLossNaN",
    "ResilientLossSpike",
    "ResilientScrapeTargetDown",
    "ResilientStorageFault",
    "ResilientNodeUnhealthy",
    "ResilientSilentDataCorruption",
}


def promtool(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([PROMTOOL, *args], capture_output=True, text=True, timeout=120, cwd=cwd)


def test_rules_pass_promtool_check():
    proc = promtool("check", "rules", str(RULES))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"SUCCESS: {len(alert_rules())} rules found" in proc.stdout


def test_every_required_alert_exists_with_severity_and_runbook():
    rules = {r["alert"]: r for r in alert_rules()}
    assert REQUIRED <= set(rules)
    for name, rule in rules.items():
        assert rule["labels"]["severity"] in {"warning", "critical"}, name
        assert rule["annotations"]["runbook_url"].startswith("docs/operations.md#"), name


def test_promtool_unit_tests_pass():
    proc = promtool("test", "rules", *map(str, TESTS))
    assert proc.returncode == 0, proc.stdout + proc.stderr


def tests_by_alert() -> dict[str, list[Path]]:
    """Alert name -> the unit-test files with a case for it."""
    out: dict[str, list[Path]] = {}
    for test_file in TESTS:
        names = {
            case["alertname"]
            for t in yaml.safe_load(test_file.read_text())["tests"]
            for case in t.get("alert_rule_test", [])
        }
        for name in names:
            out.setdefault(name, []).append(test_file)
    return out


def firing_cases() -> set[str]:
    return {
        case["alertname"]
        for f in TESTS
        for t in yaml.safe_load(f.read_text())["tests"]
        for case in t.get("alert_rule_test", [])
        if case.get("exp_alerts")
    }


def run_mutated(tmp_path: Path, alert: str, mutate) -> subprocess.CompletedProcess:
    """Run the alert's unit tests against a copy of the rules with that alert's expression rewritten."""
    rules = yaml.safe_load(RULES.read_text())
    for group in rules["groups"]:
        for rule in group["rules"]:
            if rule["alert"] == alert:
                rule["expr"] = mutate(rule["expr"])
    (tmp_path / "tests").mkdir(exist_ok=True)
    (tmp_path / RULES.name).write_text(yaml.safe_dump(rules))
    copies = []
    for test_file in tests_by_alert()[alert]:
        copy = tmp_path / "tests" / test_file.name
        copy.write_text(test_file.read_text())
        copies.append(str(copy))
    return promtool("test", "rules", *copies)


@pytest.mark.parametrize("alert", sorted(REQUIRED))
def test_unit_tests_notice_an_alert_that_never_fires(tmp_path, alert):
    assert alert in firing_cases()
    proc = run_mutated(tmp_path, alert, lambda expr: "vector(1) == 2")
    assert proc.returncode != 0, f"no unit test notices that {alert} never fires"
    assert f"alertname: {alert}" in proc.stdout + proc.stderr


@pytest.mark.parametrize("alert", sorted(REQUIRED))
def test_unit_tests_notice_an_alert_that_fires_on_healthy_series(tmp_path, alert):
    """Reduce the expression to its first selector, so it fires for every series: a quiet case must fail."""

    def first_selector(expr: str) -> str:
        match = re.search(r"(resilient_\w+|up)(\{[^}]*\})?", expr)
        assert match, expr
        return match.group(0)

    proc = run_mutated(tmp_path, alert, first_selector)
    assert proc.returncode != 0, f"no unit test notices that {alert} fires on healthy series"
    assert f"alertname: {alert}" in proc.stdout + proc.stderr


DCGM_ALERTS = sorted(r["alert"] for r in alert_rules() if "DCGM_FI_" in r["expr"])


def test_gpu_alerts_read_dcgm_exporter_too():
    assert set(DCGM_ALERTS) == {a for a in REQUIRED if a.startswith("ResilientGpu")} - {"ResilientGpuLost"}


@pytest.mark.parametrize("alert", DCGM_ALERTS)
def test_unit_tests_notice_a_missing_dcgm_source(tmp_path, alert):
    """Keep only the NVML half of the expression: the dcgm-exporter cases must fail."""
    proc = run_mutated(tmp_path, alert, lambda expr: re.split(r"\s+or\s+label_replace\(", expr)[0])
    assert proc.returncode != 0, f"no unit test notices that {alert} ignores dcgm-exporter"
    assert f"alertname: {alert}" in proc.stdout + proc.stderr
