"""Against a real job: `resilient run` (2 gloo ranks) serves /metrics, scraped over
real HTTP and by a real Prometheus, which accepts every dashboard and alert expression and returns
data for every panel whose metrics the job emits."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from resilient.core.exit_codes import ExitCode
from resilient.status import read_status
from tests.ranks import REPO, TINY

from .feed import DcgmExporter
from .prom import NodeExporter, PrometheusServer, alert_rules, panel_queries, require

pytestmark = [pytest.mark.slow, pytest.mark.prometheus]


@pytest.fixture(autouse=True)
def _tool_installed():
    require("prometheus")


NODE = "metricsnode"
# Every reading a real NVML gives, so every GPU panel has data.
HEALTHY_GPUS = {
    "available": True,
    "device_count": 2,
    "devices": [
        {
            "index": i,
            "temperature_c": t,
            "power_w": w,
            "xids": [],
            "ecc_uncorrected": 0,
            "remap_pending": False,
            "remap_failed": False,
        }
        for i, t, w in ((0, 55, 310.0), (1, 61, 295.5))
    ],
}


def scrape(port: int) -> dict[str, dict[tuple, float]]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    out: dict[str, dict[tuple, float]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out.setdefault(sample.name, {})[tuple(sorted(sample.labels.items()))] = sample.value
    return out


@pytest.fixture(scope="module")
def running_job(tmp_path_factory) -> Iterator[tuple[Path, int, Path]]:
    """The job, its metrics port, and node_exporter's textfile directory where it writes its node facts."""
    work = tmp_path_factory.mktemp("job")
    fake = work / "nvml"
    fake.mkdir()
    (fake / f"{NODE}.json").write_text(json.dumps(HEALTHY_GPUS))
    textfiles = work / "textfiles"
    textfiles.mkdir()
    run_dir = work / "run"
    sets = [
        "train.steps=100000",
        "train.eval_every=10",
        "checkpoint.interval_steps=10",
        "metrics.port=0",
        "metrics.goodput_interval_s=1",
        f"health.fake_nvml_dir={fake}",
        "health.monitor_interval_s=1",
        "health.preflight_collective=true",
        "health.collective_nbytes=65536",
        f"metrics.textfile_dir={textfiles}",
    ]

    def command(run: Path, *more: str) -> list[str]:
        cmd = [sys.executable, "-m", "resilient.cli", "run", str(TINY), "--run-dir", str(run)]
        return cmd + [a for s in (*sets, *more) for a in ("--set", s)]

    env = {**os.environ, "RESILIENT_NODE_NAME": NODE, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    # An earlier supervisor on the node stopped at once (its checkpoint filesystem too small): the node's
    # facts keep why, beside the running job's verdict.
    earlier = subprocess.run(
        command(work / "earlier", "health.ckpt_min_free_gib=1000000", "supervisor.warm_spares=false"),
        cwd=REPO,
        env=env,
        capture_output=True,
        timeout=300,
    )
    assert earlier.returncode == ExitCode.STORAGE_FAULT, earlier.stderr.decode()[-2000:]
    proc = subprocess.Popen(
        command(run_dir), cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=open(work / "sup.log", "wb")
    )
    try:
        deadline, port = time.monotonic() + 120, None
        while time.monotonic() < deadline and port is None:
            time.sleep(0.5)
            assert proc.poll() is None, (work / "sup.log").read_text()[-3000:]
            try:
                status = read_status(run_dir)
            except Exception:
                continue
            if status.get("state") == "running" and (status.get("step") or 0) >= 2:
                port = next(iter((status.get("metrics_ports") or {}).values()), None)
        assert port, "the job never reported a metrics port"
        yield run_dir, port, textfiles
    finally:
        proc.terminate()  # preemption: saves and exits
        proc.wait(timeout=120)


def test_metrics_endpoint_of_a_running_job(running_job):
    _, port, _ = running_job
    first = scrape(port)
    time.sleep(3)
    second = scrape(port)
    step = lambda m: max(m["resilient_step"].values())  # noqa: E731
    assert step(second) > step(first) >= 2
    assert max(second["resilient_tokens_per_second"].values()) > 0
    assert 0 < max(second["resilient_loss"].values()) < 20
    for family in (
        "resilient_run_state",
        "resilient_attempt",
        "resilient_consumed_tokens",
        "resilient_mfu_ratio",
        "resilient_step_time_seconds_count",
        "resilient_heartbeat_age_seconds",
        "resilient_gpu_temperature_celsius",
    ):
        assert any(name.startswith(family) for name in second), family


def test_real_prometheus_scrapes_the_job(running_job, tmp_path):
    _, port, textfiles = running_job
    require("prometheus-node-exporter")
    # GPU panels read NVML (the run's own exporter) or dcgm-exporter, as the operator chooses; clusters
    # run NVIDIA's dcgm-exporter beside the job, so a stand-in for it is scraped too (no GPU here);
    # and node_exporter, which serves the node facts.
    dcgm = DcgmExporter()
    node_exporter = NodeExporter(textfiles, tmp_path).start()
    server = PrometheusServer(
        tmp_path / "prometheus",
        [f"127.0.0.1:{port}", f"127.0.0.1:{dcgm.start()}"],
        jobs={"node": [node_exporter.address]},
    ).start()
    try:
        server.wait_for('up{job="resilient"} == 1')
        server.wait_for("count_over_time(resilient_step[1m]) >= 4")
        server.wait_for("resilient_checkpoint_last_complete_timestamp_seconds > 0")
        errors, empty = [], []
        for dashboard, title, expr in panel_queries():
            answer = server.query(expr)
            if answer["status"] != "success":
                errors.append(f"{dashboard}/{title}: {answer.get('error')}")
            elif not answer["data"]["result"]:
                empty.append(f"{dashboard}/{title}: {expr}")
        for rule in alert_rules():
            answer = server.query(rule["expr"])
            if answer["status"] != "success":
                errors.append(f"alert {rule['alert']}: {answer.get('error')}")
        assert not errors, "\n".join(errors)
        # Every panel, no exceptions: a metric the real run never emits is an empty panel in production.
        assert not empty, "dashboard panels a real run leaves empty:\n" + "\n".join(empty)
    finally:
        server.stop()
        node_exporter.stop()
        dcgm.stop()
