"""Dashboards and provisioning files: Grafana's published schema, datasource variable, template variables,
no hard-coded hosts."""

from __future__ import annotations

import copy
import json
import re
import sys
from pathlib import Path

import jsonschema
import pytest
import yaml

from resilient.metrics.textfile import GPU_FACTS

from .prom import GRAFANA, dashboards

DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}
SCHEMAS = Path(__file__).with_name("grafana_schema")  # see its README.md: no Grafana server installs here
NODE_FACTS = {
    "resilient_node_health_verdict",
    "resilient_supervisor_exit_code",
    *(metric for metric, _ in GPU_FACTS.values()),
}


def validator(kind: str, definition: str) -> jsonschema.Draft7Validator:
    """Grafana's published schema of `kind` (dashboard, a panel plugin, prometheus), at one definition."""
    schema = json.loads((SCHEMAS / f"{kind}.jsonschema.json").read_text())
    return jsonschema.Draft7Validator({**schema, "$ref": f"#/definitions/{definition}"})


def schema_errors(dash: dict) -> list[str]:
    """The dashboard, each panel's options and custom field config, and each query, each against its schema."""
    errors = [f"{list(e.absolute_path)}: {e.message}" for e in validator("dashboard", "Dashboard").iter_errors(dash)]
    for panel in dash["panels"]:
        if panel["type"] == "row":
            continue
        checks = [("Options", panel["options"])]
        if panel["type"] == "timeseries":
            checks.append(("FieldConfig", panel["fieldConfig"]["defaults"].get("custom", {})))
        for definition, value in checks:
            errors += [
                f"{panel['title']} {definition} {list(e.absolute_path)}: {e.message}"
                for e in validator(panel["type"], definition).iter_errors(value)
            ]
        for target in panel["targets"]:
            errors += [
                f"{panel['title']} query {list(e.absolute_path)}: {e.message}"
                for e in validator("prometheus", "dataquery").iter_errors(target)
            ]
    return errors


@pytest.mark.parametrize("name", sorted(dashboards()))
def test_every_dashboard_matches_grafanas_published_schema(name):
    dash = dashboards()[name]
    assert {p["type"] for p in dash["panels"]} <= {"row", "stat", "timeseries", "table"}, "a kind without its schema"
    assert schema_errors(dash) == []


def test_the_schema_check_notices_a_broken_dashboard():
    dash = copy.deepcopy(dashboards()["gpu-node-health.json"])
    dash["templating"]["list"][1]["refresh"] = 7  # not a VariableRefresh
    panel = next(p for p in dash["panels"] if p["type"] == "stat")
    panel["options"]["graphMode"] = "sparkle"
    panel["targets"][0]["format"] = "csv"
    errors = schema_errors(dash)
    assert any("refresh" in e for e in errors) and any("graphMode" in e for e in errors), errors
    assert any("query" in e and "csv" in e for e in errors), errors


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
                for metric, selector in re.findall(r"(resilient_\w+)\{([^}]*)\}", expr):
                    # node facts come from node_exporter's scrape job; they stay under `facts_job` only
                    job = 'job=~"$facts_job"' if 'job=~"$facts_job"' in selector else 'job=~"$job"'
                    assert job in selector and 'node=~"$node"' in selector, (name, expr)
                    assert (job == 'job=~"$facts_job"') <= (metric in NODE_FACTS), (name, expr)


def test_provisioning_files():
    providers = yaml.safe_load((GRAFANA / "provisioning" / "dashboards" / "resilient.yml").read_text())
    assert providers["apiVersion"] == 1 and providers["providers"][0]["type"] == "file"
    sources = yaml.safe_load((GRAFANA / "provisioning" / "datasources" / "prometheus.yml").read_text())
    assert sources["datasources"][0]["type"] == "prometheus"
    assert sources["datasources"][0]["url"] == "${PROMETHEUS_URL}"


def _generator():
    import importlib.util

    spec = importlib.util.spec_from_file_location("grafana_generate", GRAFANA / "generate.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up while being defined
    spec.loader.exec_module(module)
    return module


def test_committed_dashboards_are_the_generators_output():
    gen = _generator()
    assert set(gen.DASHBOARDS) == set(dashboards())
    for name in gen.DASHBOARDS:
        assert (GRAFANA / "dashboards" / name).read_text() == gen.render(name), (
            f"{name} differs from grafana/generate.py's output: run python grafana/generate.py"
        )


def test_gpu_panels_read_nvml_or_dcgm_exporter_by_variable():
    dash = dashboards()["gpu-node-health.json"]
    source = {v["name"]: v for v in dash["templating"]["list"]}["gpu_source"]
    assert source["type"] == "custom" and source["query"] == "nvml : 1, dcgm-exporter : 2"
    gpu_panels = [
        p for p in dash["panels"] if p["type"] != "row" and any('gpu=~"$gpu"' in t["expr"] for t in p["targets"])
    ]
    both = 0
    for panel in gpu_panels:
        gates = {re.search(r"vector\(\$gpu_source\) == (\d)", t["expr"])[1] for t in panel["targets"]}
        both += gates == {"1", "2"}
        for t in panel["targets"]:
            if "DCGM_FI_" in t["expr"]:
                assert '"node", "$1", "Hostname"' in t["expr"] and 'Hostname=~"$node"' in t["expr"], t["expr"]
    assert both == 6  # temperature, power, throttling, ECC, XID, row remap: either source
