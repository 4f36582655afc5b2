"""A real Prometheus scrapes a fed exporter and a dcgm-exporter stand-in: every dashboard and alert expression
parses, every panel target returns data (GPU targets under the source they are gated on)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from resilient.core.exit_codes import ExitCode
from resilient.metrics.config import MetricsConfig
from resilient.metrics.exporter import NodeMetrics
from resilient.metrics.textfile import NodeFacts

from .feed import NODE, DcgmExporter, Feeder
from .prom import (
    NodeExporter,
    PrometheusServer,
    alert_rules,
    panel_queries,
    require,
    variable_queries,
)

pytestmark = [
    pytest.mark.prometheus,
]


@pytest.fixture(autouse=True)
def _tool_installed():
    require("prometheus")


@pytest.fixture(scope="module")
def prometheus(tmp_path_factory) -> Iterator[PrometheusServer]:
    require("prometheus-node-exporter")
    textfiles = tmp_path_factory.mktemp("textfiles")
    metrics = NodeMetrics(MetricsConfig(address="127.0.0.1", port=0, textfile_dir=textfiles), NODE)
    port = metrics.start()
    feeder = Feeder(metrics).start()
    # Another node's supervisor exited earlier: its node facts remain.
    NodeFacts(textfiles, "node1").on_exit(ExitCode.UNHEALTHY_NODE, "unhealthy (training) node node1: gpu.lost")
    node_exporter = NodeExporter(textfiles, tmp_path_factory.mktemp("node_exporter")).start()
    dcgm = DcgmExporter()
    dcgm_port = dcgm.start()
    server = PrometheusServer(
        tmp_path_factory.mktemp("prometheus"),
        [f"127.0.0.1:{port}", f"127.0.0.1:{dcgm_port}"],
        jobs={"node": [node_exporter.address]},
    )
    try:
        server.start()
        # Enough scrapes for rate() and increase() windows, with checkpoints saved in between.
        server.wait_for("count_over_time(resilient_step[1m]) >= 6")
        server.wait_for("increase(resilient_checkpoint_save_blocking_seconds_count[2m]) > 0")
        yield server
    finally:
        server.stop()
        feeder.stop()
        metrics.stop()
        node_exporter.stop()
        dcgm.stop()


def test_dashboards_and_alerts_against_a_real_prometheus(prometheus):
    # The scrape itself worked and our exporter is the target.
    assert prometheus.wait_for('up{job="resilient"} == 1')

    errors, empty = [], []
    for dashboard, title, expr in panel_queries():
        answer = prometheus.query(expr)
        if answer["status"] != "success":
            errors.append(f"{dashboard} / {title}: {answer.get('error')} in {expr}")
        elif not answer["data"]["result"]:
            empty.append(f"{dashboard} / {title}: {expr}")
    assert not errors, "\n".join(errors)
    assert not empty, "panels without data:\n" + "\n".join(empty)

    for dashboard, variable, expr in variable_queries():
        answer = prometheus.query(expr)
        assert answer["status"] == "success", (dashboard, variable, answer)
        assert answer["data"]["result"], f"{dashboard}: variable {variable} has no values ({expr})"

    for rule in alert_rules():
        answer = prometheus.query(rule["expr"])
        assert answer["status"] == "success", (rule["alert"], answer)

    # Prometheus loaded the same rule file and evaluates every rule without error.
    rules = {r["name"]: r for r in prometheus.rules()}
    assert {r["alert"] for r in alert_rules()} <= set(rules)
    for name, rule in rules.items():
        assert rule["health"] == "ok" and not rule.get("lastError"), (name, rule.get("lastError"))


def test_fed_faults_raise_the_matching_alerts(prometheus):
    """The feeder reports XID 79 on GPU 1: Prometheus itself fires ResilientGpuXidCritical for it, once, though
    both the exporter and the node facts say so."""
    firing = prometheus.wait_for('ALERTS{alertname="ResilientGpuXidCritical", alertstate="firing"}')
    assert {(a["metric"]["node"], a["metric"]["gpu"]) for a in firing} == {("node0", "1")} and len(firing) == 1
    assert prometheus.wait_for('resilient_gpu_last_xid{job="node", node="node0", gpu="1"} == 79')
    quiet = prometheus.query(
        'ALERTS{alertname=~"ResilientRankHeartbeatStale|ResilientLossNaN|ResilientScrapeTargetDown"}'
    )
    assert quiet["status"] == "success" and quiet["data"]["result"] == []
