"""Helpers for the Prometheus tests: a real Prometheus server and a real node_exporter on loopback, and the
PromQL of our dashboards and alerts.

`PrometheusServer` is reusable for any targets (an exporter fed by a test, a real running job, node_exporter).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import yaml

from resilient.supervisor.ranks import free_port

REPO = Path(__file__).resolve().parents[2]
GRAFANA = REPO / "grafana"
RULES = GRAFANA / "alerts" / "resilient.yml"


PROMETHEUS = shutil.which("prometheus") or "prometheus"
PROMTOOL = shutil.which("promtool") or "promtool"
NODE_EXPORTER = shutil.which("prometheus-node-exporter") or "prometheus-node-exporter"  # Debian's name


def require(*tools: str) -> None:
    """Fail with the fix when a tool is missing: the suites that need one never skip."""
    import pytest

    for tool in tools:
        if shutil.which(tool) is None:
            pytest.fail(f"{tool} is not installed: run scripts/setup.sh --test", pytrace=False)


# What Grafana substitutes before sending a panel query: "All" for every template variable.
GRAFANA_MACROS = {"$__rate_interval": "15s", "$__interval": "5s", "$__range": "2m"}
LABEL_VALUES = re.compile(r"^label_values\((?P<selector>.+),\s*(?P<label>\w+)\)$")


def get_json(url: str, timeout: float = 5.0) -> dict[str, Any]:
    with urllib.request.urlopen(url, timeout=timeout) as resp:
        return json.load(resp)


def substitute(expr: str) -> str:
    """A panel expression as Grafana would send it with every variable at "All", and the GPU source
    variable at the source the target is gated on (`and on() (vector($gpu_source) == N)`)."""
    for macro, value in GRAFANA_MACROS.items():
        expr = expr.replace(macro, value)
    if gate := re.search(r"vector\(\$gpu_source\) == (\d+)", expr):
        expr = expr.replace("$gpu_source", gate[1])
    return re.sub(r"\$\{?(job|facts_job|node|rank|gpu)\b\}?", ".*", expr)


def dashboards() -> dict[str, dict]:
    return {p.name: json.loads(p.read_text()) for p in sorted((GRAFANA / "dashboards").glob("*.json"))}


def _panels(panels: list[dict]) -> Iterator[dict]:
    for panel in panels:
        yield panel
        yield from _panels(panel.get("panels", []))


def panel_queries() -> list[tuple[str, str, str]]:
    """(dashboard file, panel title, expression with variables substituted) for every panel target."""
    return [
        (name, panel["title"], substitute(target["expr"]))
        for name, dash in dashboards().items()
        for panel in _panels(dash["panels"])
        for target in panel.get("targets", [])
    ]


def variable_queries() -> list[tuple[str, str, str]]:
    """(dashboard, variable, PromQL) for every `label_values(selector, label)` template variable."""
    out = []
    for name, dash in dashboards().items():
        for var in dash["templating"]["list"]:
            if var["type"] != "query":
                continue
            m = LABEL_VALUES.match(var["query"])
            assert m, f"{name}: variable {var['name']} is not label_values(selector, label)"
            out.append((name, var["name"], f"group by ({m['label']}) ({substitute(m['selector'])})"))
    return out


def alert_rules() -> list[dict]:
    return [rule for group in yaml.safe_load(RULES.read_text())["groups"] for rule in group["rules"]]


class PrometheusServer:
    """/usr/bin/prometheus on 127.0.0.1 with a temp config and data dir, scraping `targets` (job `job`) every
    `scrape_interval`, plus static `jobs` ({job: [target, ...]}) and, with `file_sd`, the targets written by
    `add_targets` (job `job`)."""

    def __init__(
        self,
        workdir: Path,
        targets: list[str],
        job: str = "resilient",
        *,
        scrape_interval: str = "1s",
        evaluation_interval: str = "1s",
        jobs: dict[str, list[str]] | None = None,
        file_sd: bool = False,
    ) -> None:
        self.workdir, self.port, self.job = workdir, free_port(), job
        self.url = f"http://127.0.0.1:{self.port}"
        workdir.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.sd_dir = workdir / "targets"
        main: dict[str, Any] = {"job_name": job, "static_configs": [{"targets": targets}]}
        if file_sd:
            self.sd_dir.mkdir(exist_ok=True)
            main["file_sd_configs"] = [{"files": [str(self.sd_dir / "*.json")], "refresh_interval": "1s"}]
        config = {
            "global": {"scrape_interval": scrape_interval, "evaluation_interval": evaluation_interval},
            "rule_files": [str(RULES)],
            "scrape_configs": [
                main,
                *({"job_name": name, "static_configs": [{"targets": t}]} for name, t in (jobs or {}).items()),
            ],
        }
        self.config_path = workdir / "prometheus.yml"
        fd = os.open(self.config_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            yaml.safe_dump(config, f)
        self.log_path = workdir / "prometheus.log"
        self.proc: subprocess.Popen | None = None

    def add_targets(self, name: str, targets: list[str]) -> None:
        """Scrape `targets` (job `job`) from now on (file service discovery: no restart, no reload)."""
        tmp = self.sd_dir / f".{name}.tmp"
        tmp.write_text(json.dumps([{"targets": targets}]))
        tmp.rename(self.sd_dir / f"{name}.json")

    def start(self, timeout: float = 60.0) -> PrometheusServer:
        def ready() -> None:
            with urllib.request.urlopen(f"{self.url}/-/ready", timeout=1) as resp:
                if resp.status != 200:
                    raise OSError(f"HTTP {resp.status}")

        self.proc = start_server(
            "prometheus",
            [
                PROMETHEUS,
                f"--config.file={self.config_path}",
                f"--storage.tsdb.path={self.workdir / 'data'}",
                f"--web.listen-address=127.0.0.1:{self.port}",
                "--log.level=warn",
            ],
            self.log_path,
            ready,
            timeout,
        )
        return self

    def stop(self) -> None:
        stop_server(self.proc)

    def query(self, expr: str) -> dict[str, Any]:
        """The /api/v1/query answer; a PromQL error comes back as {"status": "error", ...} (HTTP 400/422)."""
        url = f"{self.url}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
        try:
            return get_json(url)
        except urllib.error.HTTPError as err:
            return json.load(err)

    def wait_for(self, expr: str, timeout: float = 60.0) -> list[dict]:
        """Poll until `expr` returns a non-empty vector."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            answer = self.query(expr)
            if answer.get("status") == "success" and answer["data"]["result"]:
                return answer["data"]["result"]
            time.sleep(0.5)
        raise AssertionError(f"{expr!r} returned no data within {timeout}s")

    def rules(self) -> list[dict]:
        groups = get_json(f"{self.url}/api/v1/rules")["data"]["groups"]
        return [rule for group in groups for rule in group["rules"]]

    def alerts(self) -> list[dict]:
        """/api/v1/alerts: every pending and firing alert with its labels, annotations and state."""
        return get_json(f"{self.url}/api/v1/alerts")["data"]["alerts"]


class NodeExporter:
    """Debian's prometheus-node-exporter on 127.0.0.1 with only its textfile collector, serving `textfile_dir`
    (what runs on every cluster node, there with all its collectors)."""

    def __init__(self, textfile_dir: Path, log_dir: Path) -> None:
        self.textfile_dir, self.port = textfile_dir, free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.log_path = log_dir / "node_exporter.log"
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 30.0) -> NodeExporter:
        self.proc = start_server(
            "node_exporter",
            [
                NODE_EXPORTER,
                "--collector.disable-defaults",
                "--collector.textfile",
                f"--collector.textfile.directory={self.textfile_dir}",
                f"--web.listen-address={self.address}",
                "--log.level=warn",
            ],
            self.log_path,
            self.scrape,
            timeout,
        )
        return self

    def scrape(self) -> str:
        with urllib.request.urlopen(f"http://{self.address}/metrics", timeout=5) as resp:
            return resp.read().decode()

    def stop(self) -> None:
        stop_server(self.proc)


def start_server(
    name: str, argv: list[str], log_path: Path, ready: Callable[[], Any], timeout: float
) -> subprocess.Popen:
    """Start a server process (output to `log_path`) and return once `ready()` stops raising OSError."""
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{name} exited {proc.returncode}: {log_path.read_text()[-2000:]}")
        try:
            ready()
            return proc
        except OSError:
            time.sleep(0.2)
    stop_server(proc)
    raise RuntimeError(f"{name} not ready after {timeout}s: {log_path.read_text()[-2000:]}")


def stop_server(proc: subprocess.Popen | None) -> None:
    if proc is not None and proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
