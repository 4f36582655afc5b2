"""Dashboards and provisioning files: datasource variable, template variables, no hard-coded hosts."""

from __future__ import annotations

import re

import yaml

from .prom import GRAFANA, dashboards

DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}


def test_three_dashboards_with_datasource_and_node_variables():
    dash = dashboards()
    assert set(dash) == {"run-overview.json", "gpu-node-health.json", "checkpoints-goodput.json"}
    uids = {d["uid"] for d in dash.values()}
    assert len(uids) == 3
    for name, d in dash.items():
        variables = {v["name"]: v for v in d["templating"]["list"]}
        assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
        assert {"job", "node"} <= set(variables), name
    assert "rank" in {v["name"] for v in dash["run-overview.json"]["templating"]["list"]}


def test_every_query_uses_the_datasource_variable_and_the_template_variables():
    for name, d in dashboards().items():
        for panel in d["panels"]:
            if panel["type"] == "row":
                continue
            assert panel["datasource"] == DATASOURCE, (name, panel["title"])
            for target in panel["targets"]:
                expr = target["expr"]
                assert target["datasource"] == DATASOURCE
                assert "instance=" not in expr and not re.search(r"\d+\.\d+\.\d+\.\d+|:\d{4,5}", expr), expr
                for selector in re.findall(r"resilient_\w+\{([^}]*)\}", expr):
                    assert 'job=~"$job"' in selector and 'node=~"$node"' in selector, (name, expr)


def test_provisioning_files():
    providers = yaml.safe_load((GRAFANA / "provisioning" / "dashboards" / "resilient.yml").read_text())
    assert providers["apiVersion"] == 1 and providers["providers"][0]["type"] == "file"
    sources = yaml.safe_load((GRAFANA / "provisioning" / "datasources" / "prometheus.yml").read_text())
    assert sources["datasources"][0]["type"] == "prometheus"
    assert sources["datasources"][0]["url"] == "${PROMETHEUS_URL}"
