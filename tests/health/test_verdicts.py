"""Types, pre-flight, the monitor thread and the verdict -> action mapping."""

import time

from health.actions import Verdict, decide_health, record
from health.config import HealthConfig
from health.monitor import HealthMonitor
from health.preflight import run_preflight
from health.types import CheckResult, HealthReport, Severity, fatal, ok, warn
from resilient.core import ledger
from resilient.core.exit_codes import ExitCode
from tests.health.conftest import healthy_device

LAX = dict(shm_min_gib=0.01, mem_min_available_gib=0.01, ckpt_min_free_gib=0.0)


def test_severity_is_ordered_and_verdict_names_node_and_check():
    assert Severity.OK < Severity.WARN < Severity.FATAL
    report = HealthReport("n7", [ok("a", "fine"), warn("b", "meh"), fatal("gpu.xid", "critical XID 79 on gpu3")])
    assert report.worst() is Severity.FATAL
    severity, reason = report.verdict()
    assert severity is Severity.FATAL and reason == "node n7: gpu.xid: critical XID 79 on gpu3"
    assert HealthReport("n7", []).verdict()[0] is Severity.OK
    assert report.to_json()["results"][2]["severity"] == "fatal"


def test_decide_judges_reports_into_typed_verdicts():
    bad = HealthReport("n2", [ok("x", "fine"), fatal("gpu.lost", "gpu1 lost"), fatal("gpu.xid", "critical XID 79")])
    d = decide_health(bad, "preflight")
    assert d.verdict is Verdict.UNHEALTHY and d.exit_code is ExitCode.UNHEALTHY_NODE and d.ends_attempt
    assert d.checks == ("gpu.lost", "gpu.xid")
    assert "n2" in d.reason and "gpu.lost" in d.reason and "preflight" in d.reason
    assert decide_health(bad, "training").exit_code is ExitCode.UNHEALTHY_NODE
    # A full checkpoint filesystem is storage trouble, never the node's fault.
    full = decide_health(HealthReport("n2", [fatal("node.ckpt_dir", "0.1 GiB free")]), "training")
    assert full.verdict is Verdict.STORAGE and full.exit_code is ExitCode.STORAGE_FAULT
    assert full.checks == ("node.ckpt_dir",)
    both = decide_health(HealthReport("n2", [fatal("node.ckpt_dir", "full"), fatal("gpu.lost", "gpu1")]), "training")
    assert both.verdict is Verdict.UNHEALTHY
    w = decide_health(HealthReport("n2", [warn("gpu.throttle", "hw_thermal")]), "training")
    assert w.verdict is Verdict.WARNING and w.exit_code is None and not w.ends_attempt and w.checks == ("gpu.throttle",)
    healthy = decide_health(HealthReport("n2", [ok("x", "fine")]), "training")
    assert healthy.verdict is Verdict.HEALTHY and healthy.checks == () and not healthy.ends_attempt


def test_record_writes_health_ledger_events(tmp_path):
    report = HealthReport("n2", [ok("x", "fine"), warn("gpu.throttle", "hw_thermal on gpu0")])
    assert record(tmp_path, report) == 1
    [event] = list(ledger.read(tmp_path))
    assert event["event"] == "health" and event["node"] == "n2" and event["severity"] == "warn"
    assert event["check"] == "gpu.throttle" and event["reason"] == "hw_thermal on gpu0"


def test_preflight_combines_gpu_and_node_checks(script, tmp_path):
    cfg = script("n3", {"devices": [healthy_device(0, xids=[79])]}, **LAX)
    report = run_preflight(cfg, node="n3", ckpt_dir=tmp_path / "run" / "checkpoints")
    names = [r.name for r in report.results]
    assert "gpu.xid" in names and "node.ckpt_dir" in names
    severity, reason = report.verdict()
    assert severity is Severity.FATAL and reason.startswith("node n3: gpu.xid: critical XID 79 on gpu0")
    healthy = run_preflight(cfg, node="n4", ckpt_dir=tmp_path / "run" / "checkpoints")  # no script: no NVML
    assert healthy.worst() is Severity.OK


def test_monitor_sees_a_gpu_going_bad_during_training(script, tmp_path):
    cfg = script(
        "n5",
        {"devices": [healthy_device(0)]},
        {"devices": [healthy_device(0)]},
        {"devices": [healthy_device(0, xids=[94])]},
        **LAX,
    )
    monitor = HealthMonitor(cfg, "n5", tmp_path, interval_s=0.05).start()
    try:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            latest = monitor.latest()
            if latest is not None and latest.worst() is Severity.FATAL:
                break
            time.sleep(0.02)
    finally:
        monitor.stop()
    assert latest.worst() is Severity.FATAL and "XID 94 on gpu0" in latest.verdict()[1]
    assert not monitor._thread.is_alive()


def test_monitor_survives_a_broken_provider(tmp_path):
    (tmp_path / "n6.json").write_text("{broken")
    cfg = HealthConfig(fake_nvml_dir=tmp_path, **LAX)
    report = HealthMonitor(cfg, "n6", tmp_path).check_once()
    gpu = [r for r in report.results if r.name == "gpu.sample"]
    assert gpu and gpu[0].severity is Severity.WARN and "bad fake NVML state" in gpu[0].reason
    assert isinstance(report.results[-1], CheckResult) and report.results[-1].name == "node.shm"


def test_preflight_runs_the_collective_probe_when_asked(tmp_path):
    cfg = HealthConfig(preflight_collective=True, collective_nbytes=4096, collective_iters=1, **LAX)
    report = run_preflight(cfg, node="n8", ckpt_dir=tmp_path / "ckpt", nproc=2)
    [probe] = [r for r in report.results if r.name == "collective.allreduce"]
    assert probe.severity is Severity.OK and probe.values["busbw_gbps"] > 0 and probe.values["world_size"] == 2
    alone = run_preflight(cfg, node="n8", ckpt_dir=tmp_path / "ckpt", nproc=1)  # nothing to probe with one rank
    assert "collective.allreduce" not in [r.name for r in alone.results]
