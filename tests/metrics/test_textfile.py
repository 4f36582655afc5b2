"""Node facts: what the supervisor writes for node_exporter's textfile collector, and node_exporter reading it."""

from __future__ import annotations

import stat

import pytest
from prometheus_client.parser import text_string_to_metric_families

from health.actions import decide_health
from health.types import CheckResult, HealthReport, Severity, fatal, ok
from resilient.core.errors import ConfigError
from resilient.core.exit_codes import ExitCode
from resilient.metrics.config import MetricsConfig
from resilient.metrics.exporter import NodeMetrics
from resilient.metrics.textfile import REASON_MAX, NodeFacts, textfile_name

from .prom import NodeExporter, require


def samples(text: str) -> dict[str, dict[tuple, float]]:
    out: dict[str, dict[tuple, float]] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out.setdefault(s.name, {})[tuple(sorted(s.labels.items()))] = s.value
    return out


def gpu_report(node: str, *, xid: int = 0, ecc: int = 0, lost: bool = False, temp: int = 60) -> HealthReport:
    """A report as the monitor makes it: the GPU rule results and the telemetry of two GPUs."""
    gpus = {
        0: {
            "temperature_c": temp,
            "power_w": 300.0,
            "ecc_uncorrectable": ecc,
            "last_xid": xid,
            "remap_pending": False,
            "remap_failed": False,
            "lost": False,
            "throttle_reasons": [],
        },
        1: {
            "temperature_c": temp,
            "power_w": 300.0,
            "ecc_uncorrectable": 0,
            "last_xid": 0,
            "remap_pending": False,
            "remap_failed": False,
            "lost": lost,
            "throttle_reasons": [],
        },
    }
    results = [CheckResult("gpu.telemetry", Severity.OK, "2 GPU(s) read", {"gpus": gpus})]
    results.append(fatal("gpu.xid", f"critical XID {xid} on gpu0") if xid else ok("gpu.xid", "no XID"))
    results.append(fatal("gpu.lost", "gpu1 lost") if lost else ok("gpu.lost", "no GPU lost"))
    return HealthReport(node, results)


def test_the_verdict_and_its_gpu_readings_are_written_once_per_change(tmp_path):
    metrics = NodeMetrics(MetricsConfig(textfile_dir=tmp_path), "n1")
    path = tmp_path / "resilient_n1.prom"
    healthy = gpu_report("n1")
    metrics.on_health(healthy, decide_health(healthy, "preflight"))
    first = samples(path.read_text())
    [(labels, value)] = first["resilient_node_health_verdict"].items()
    assert dict(labels)["verdict"] == "healthy" and dict(labels)["node"] == "n1" and value == 1
    assert first["resilient_gpu_last_xid"] == {(("gpu", "0"), ("node", "n1")): 0, (("gpu", "1"), ("node", "n1")): 0}
    assert stat.S_IMODE(path.stat().st_mode) == 0o644, "node_exporter runs as another user"
    mtime = path.stat().st_mtime_ns

    warmer = gpu_report("n1", temp=70)  # the same verdict and faults: nothing to write
    metrics.on_health(warmer, decide_health(warmer, "training"))
    assert path.stat().st_mtime_ns == mtime

    bad = gpu_report("n1", xid=79, ecc=3, lost=True)
    metrics.on_health(bad, decide_health(bad, "training"))
    facts = samples(path.read_text())
    [(labels, _)] = facts["resilient_node_health_verdict"].items()
    labels = dict(labels)
    assert labels["verdict"] == "unhealthy" and labels["check"] == "gpu.lost,gpu.xid"
    assert labels["reason"].startswith("unhealthy (training) node n1: gpu.xid: critical XID 79 on gpu0")
    assert facts["resilient_node_health_verdict_timestamp_seconds"][(("node", "n1"),)] == bad.ts
    assert facts["resilient_gpu_last_xid"][(("gpu", "0"), ("node", "n1"))] == 79
    assert facts["resilient_gpu_ecc_uncorrectable_errors"][(("gpu", "0"), ("node", "n1"))] == 3
    assert facts["resilient_gpu_lost"][(("gpu", "1"), ("node", "n1"))] == 1
    assert "resilient_gpu_temperature_celsius" not in facts, "only fault readings are node facts"
    assert [p.name for p in tmp_path.iterdir()] == [path.name], "no temp file left behind"


def test_the_exit_reason_joins_the_facts(tmp_path):
    facts = NodeFacts(tmp_path, "node a/7", clock=lambda: 1234.5)
    report = gpu_report("node a/7", xid=79)
    facts.on_health(decide_health(report, "training"), {}, report.ts)
    facts.on_exit(ExitCode.UNHEALTHY_NODE, "x" * 1000)
    assert facts.path == tmp_path / "resilient_node_a_7.prom" == tmp_path / textfile_name("node a/7")
    got = samples(facts.path.read_text())
    [(labels, code)] = got["resilient_supervisor_exit_code"].items()
    assert code == 76 and dict(labels)["outcome"] == "unhealthy_node" and len(dict(labels)["reason"]) == REASON_MAX
    assert got["resilient_supervisor_exit_timestamp_seconds"][(("node", "node a/7"),)] == 1234.5
    assert "resilient_node_health_verdict" in got, "the exit keeps the verdict"


def test_a_new_supervisor_keeps_the_previous_exit_until_its_own(tmp_path):
    before = NodeFacts(tmp_path, "n1", clock=lambda: 100.0)
    before.on_exit(ExitCode.STORAGE_FAULT, "checkpoint storage is full")
    after = NodeFacts(tmp_path, "n1", clock=lambda: 200.0)
    report = gpu_report("n1")
    after.on_health(decide_health(report, "preflight"), {}, report.ts)
    got = samples(after.path.read_text())
    assert got["resilient_supervisor_exit_code"] == {
        (("node", "n1"), ("outcome", "storage_fault"), ("reason", "checkpoint storage is full")): 82
    }
    assert got["resilient_supervisor_exit_timestamp_seconds"][(("node", "n1"),)] == 100.0
    after.on_exit(ExitCode.FINISHED, "the run reached its final step")
    got = samples(after.path.read_text())
    assert [dict(k)["outcome"] for k in got["resilient_supervisor_exit_code"]] == ["finished"]
    (tmp_path / textfile_name("n2")).write_text("not the text format {")
    assert b"resilient_supervisor_exit" not in NodeFacts(tmp_path, "n2").render()


def test_a_bad_directory_is_one_config_error_and_later_failures_never_raise(tmp_path, capsys):
    missing = NodeFacts(tmp_path / "nope", "n1")
    with pytest.raises(ConfigError, match=r"metrics.textfile_dir .*nope: not a directory"):
        missing.check()
    missing.on_exit(ExitCode.CONFIG_ERROR, "bad config")  # nothing more is attempted or said
    assert capsys.readouterr().err == ""

    gone = tmp_path / "gone"
    gone.mkdir()
    facts = NodeFacts(gone, "n1")
    facts.check()
    gone.rmdir()  # the directory vanishes while the supervisor runs
    facts.on_exit(ExitCode.FINISHED, "done")
    facts.on_exit(ExitCode.FINISHED, "done")
    err = capsys.readouterr().err
    assert err.count("cannot write node facts") == 1 and "No such file or directory" in err


def test_no_directory_writes_nothing(tmp_path):
    facts = NodeFacts(None, "n1")
    facts.check()
    report = gpu_report("n1", xid=79)
    assert not facts.on_health(decide_health(report, "training"), {}, report.ts)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.prometheus
def test_node_exporter_serves_the_facts_of_two_nodes_from_one_directory(tmp_path):
    """The real textfile collector parses what we write; the nodes' files share families without conflict."""
    require("prometheus-node-exporter")
    textfiles = tmp_path / "textfiles"
    textfiles.mkdir()
    for node, report in (("n0", gpu_report("n0")), ("n1", gpu_report("n1", xid=79))):
        facts = NodeFacts(textfiles, node)
        facts.on_health(
            decide_health(report, "training"),
            {"0": {"last_xid": report.results[0].values["gpus"][0]["last_xid"]}},
            report.ts,
        )
        facts.on_exit(ExitCode.UNHEALTHY_NODE if node == "n1" else ExitCode.FINISHED, "why")
    exporter = NodeExporter(textfiles, tmp_path).start()
    try:
        got = samples(exporter.scrape())
    finally:
        exporter.stop()
    assert got["node_textfile_scrape_error"][()] == 0
    assert got["resilient_gpu_last_xid"] == {(("gpu", "0"), ("node", "n0")): 0, (("gpu", "0"), ("node", "n1")): 79}
    assert {dict(k)["outcome"] for k in got["resilient_supervisor_exit_code"]} == {"finished", "unhealthy_node"}
