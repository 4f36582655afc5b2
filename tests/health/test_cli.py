"""`resilient health check` as an operator runs it: a real subprocess, its JSON and exit codes."""

import json
import os
import subprocess
import sys
from pathlib import Path

from resilient.core.exit_codes import ExitCode
from tests.health.conftest import healthy_device

REPO = Path(__file__).resolve().parents[2]
LAX = [
    "--set",
    "health.shm_min_gib=0.01",
    "--set",
    "health.mem_min_available_gib=0.01",
    "--set",
    "health.ckpt_min_free_gib=0",
]


def health_check(tmp_path: Path, *args: str, node: str = "n1") -> subprocess.CompletedProcess:
    env = {**os.environ, "RESILIENT_NODE_NAME": node}
    return subprocess.run(
        [sys.executable, "-m", "resilient.cli", "health", "check", "--run-dir", str(tmp_path / "run"), *LAX, *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO,
        timeout=120,
    )


def test_healthy_json_says_what_it_could_not_check(tmp_path):
    proc = health_check(tmp_path, "--json")
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["node"] == "n1" and report["severity"] == "ok"
    by_name = {r["name"]: r for r in report["results"]}
    assert by_name["gpu"]["skipped"] and "skipped: no NVML" in by_name["gpu"]["reason"]
    assert by_name["collective.allreduce"]["skipped"]
    assert by_name["node.ckpt_dir"]["severity"] == "ok" and not by_name["node.ckpt_dir"]["skipped"]


def test_fatal_gpu_exits_unhealthy_node(tmp_path):
    fake = tmp_path / "fake"
    fake.mkdir()
    (fake / "n1.json").write_text(json.dumps({"devices": [healthy_device(0), healthy_device(1, xids=[79])]}))
    proc = health_check(tmp_path, "--json", "--set", f"health.fake_nvml_dir={fake}")
    assert proc.returncode == ExitCode.UNHEALTHY_NODE, proc.stderr
    report = json.loads(proc.stdout)
    assert report["severity"] == "fatal"
    assert report["reason"] == "node n1: gpu.xid: critical XID 79 on gpu1"
    textfiles = tmp_path / "textfiles"
    textfiles.mkdir()
    text = health_check(tmp_path, "--set", f"health.fake_nvml_dir={fake}", "--set", f"metrics.textfile_dir={textfiles}")
    assert text.returncode == ExitCode.UNHEALTHY_NODE
    assert "fatal  gpu.xid" in text.stdout
    assert text.stderr.strip() == "resilient: unhealthy node: node n1: gpu.xid: critical XID 79 on gpu1"
    # The verdict is the node's new fact for node_exporter (as after a repair, or from Slurm's HealthCheckProgram).
    facts = (textfiles / "resilient_n1.prom").read_text()
    assert (
        'resilient_node_health_verdict{check="gpu.xid",node="n1",reason="unhealthy (check) node n1: gpu.xid: '
        'critical XID 79 on gpu1",verdict="unhealthy"} 1.0' in facts
    )
    assert 'resilient_gpu_last_xid{gpu="1",node="n1"} 79.0' in facts


def test_collective_probe_from_the_cli(tmp_path):
    proc = health_check(
        tmp_path,
        "--json",
        "--collective",
        "--nproc",
        "2",
        "--set",
        "health.collective_nbytes=65536",
        "--set",
        "health.collective_iters=2",
    )
    assert proc.returncode == 0, proc.stderr
    probe = {r["name"]: r for r in json.loads(proc.stdout)["results"]}["collective.allreduce"]
    assert probe["severity"] == "ok" and probe["values"]["busbw_gbps"] > 0 and probe["values"]["world_size"] == 2


def test_bad_config_is_a_config_error(tmp_path):
    proc = health_check(tmp_path, "--set", "health.temp_fatal_c=hot")
    assert proc.returncode == ExitCode.CONFIG_ERROR
    assert "health.temp_fatal_c" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
