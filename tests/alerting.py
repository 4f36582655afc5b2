"""Live alerting for tests and benches: one real Prometheus scraping at its usual 15 s, a real node_exporter
serving the supervisors' node facts, and real `resilient run` processes whose GPUs are scripted.

`alert_watch` (session-scoped, registered in tests/conftest.py) is shared by every suite that drives the
system into an alert: starting Prometheus once, and remembering every alert it has seen firing, lets a
test ask after an alert whose condition has since passed (a loss that was NaN for one step).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from resilient.core import ledger
from resilient.status import read_status
from tests.metrics.prom import NodeExporter, PrometheusServer, require
from tests.ranks import REPO, TINY

SCRAPE_INTERVAL = "15s"
"""What operators run (Prometheus's example config; the issue's acceptance): never shortened for tests."""
EVALUATION_INTERVAL = "1s"
"""Rule evaluation is cheap; evaluating every second adds no delay of its own to what the scrapes show.
Rule `for:` durations are as they ship."""


def gpus(*devices: dict[str, Any]) -> dict[str, Any]:
    """A scripted NVML sample (health.gpu.fake_provider) of `devices`."""
    return {"available": True, "device_count": len(devices), "devices": list(devices)}


HEALTHY_GPUS = gpus(
    {"index": 0, "temperature_c": 55, "power_w": 300.0}, {"index": 1, "temperature_c": 58, "power_w": 290.0}
)


class AlertWatch:
    """Prometheus + node_exporter; a thread notes every alert the moment Prometheus first reports it firing."""

    def __init__(self, workdir: Path) -> None:
        self.textfile_dir = workdir / "textfiles"
        self.textfile_dir.mkdir(parents=True)
        self.node_exporter = NodeExporter(self.textfile_dir, workdir)
        self.prometheus = PrometheusServer(
            workdir / "prometheus",
            [],
            scrape_interval=SCRAPE_INTERVAL,
            evaluation_interval=EVALUATION_INTERVAL,
            file_sd=True,
            jobs={"node": [self.node_exporter.address]},
        )
        self._seen: list[tuple[float, dict[str, Any]]] = []
        self._keys: set[tuple] = set()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, name="alert-watch", daemon=True)

    def start(self) -> AlertWatch:
        self.node_exporter.start()
        self.prometheus.start()
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self.prometheus.stop()
        self.node_exporter.stop()

    def add_supervisor(self, node: str, port: int) -> None:
        """Scrape a supervisor's /metrics from now on (job `resilient`)."""
        self.prometheus.add_targets(node, [f"127.0.0.1:{port}"])

    def _poll(self) -> None:
        while not self._stop.wait(1.0):
            try:
                alerts = self.prometheus.alerts()
            except OSError:
                continue
            with self._lock:
                for alert in alerts:
                    key = tuple(sorted(alert["labels"].items()))
                    if alert["state"] == "firing" and key not in self._keys:
                        self._keys.add(key)
                        self._seen.append((time.time(), alert))

    def seen(self, alertname: str, **labels: str) -> list[dict[str, Any]]:
        """Every alert `alertname` with these labels that has been firing at some point."""
        want = {"alertname": alertname, **labels}
        with self._lock:
            return [a for _, a in self._seen if want.items() <= a["labels"].items()]

    def first_seen(self, alertname: str, **labels: str) -> float | None:
        """When an alert `alertname` with these labels was first seen firing (unix time), if ever."""
        want = {"alertname": alertname, **labels}
        with self._lock:
            return min((t for t, a in self._seen if want.items() <= a["labels"].items()), default=None)

    def firing_now(self, alertname: str, **labels: str) -> list[dict[str, Any]]:
        want = {"alertname": alertname, **labels}
        return [a for a in self.prometheus.alerts() if a["state"] == "firing" and want.items() <= a["labels"].items()]

    def wait_firing(
        self,
        alertname: str,
        timeout: float,
        *,
        now: bool = False,
        abort: Callable[[], str | None] = lambda: None,
        **labels: str,
    ) -> dict[str, Any]:
        """The first alert `alertname` with `labels` seen firing (with `now`: firing at this moment); fails
        after `timeout` seconds, or at once when `abort` names a reason (the run driving it failed)."""
        deadline = time.monotonic() + timeout
        while True:
            found = self.firing_now(alertname, **labels) if now else self.seen(alertname, **labels)
            if found:
                return found[0]
            if (why := abort()) is not None:
                raise AssertionError(f"{alertname} {labels}: the run that should raise it failed: {why}")
            if time.monotonic() > deadline:
                seen = sorted(
                    {
                        a["labels"]["alertname"]
                        + str({k: v for k, v in a["labels"].items() if k in ("node", "gpu", "rank")})
                        for _, a in self._seen
                    }
                )
                raise AssertionError(f"{alertname} {labels} not firing within {timeout:.0f}s; fired so far: {seen}")
            time.sleep(0.5)


@pytest.fixture(scope="session")
def alert_watch(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AlertWatch]:
    require("prometheus", "prometheus-node-exporter")
    watch = AlertWatch(tmp_path_factory.mktemp("alerting")).start()
    try:
        yield watch
    finally:
        watch.stop()


class LiveRun:
    """`resilient run examples/tiny.yaml` as node `node` with one rank, its GPUs scripted through
    `health.fake_nvml_dir`, its node facts written to `textfile_dir` (None: not written). `repo`: the
    source tree to run (a bench compares another commit's)."""

    def __init__(
        self,
        work: Path,
        node: str,
        textfile_dir: Path | None,
        sets: list[str],
        gpu_state: dict[str, Any] = HEALTHY_GPUS,
        repo: Path = REPO,
    ) -> None:
        self.node, self.work, self.repo = node, work, repo
        self.run_dir = work / "run"
        nvml = work / "nvml"
        nvml.mkdir(parents=True)
        self.nvml_file = nvml / f"{node}.json"
        self.set_gpus(gpu_state)
        self.log = work / "supervisor.log"
        self.sets = [
            "supervisor.nproc_per_node=1",
            "train.steps=100000",
            "train.eval_every=0",
            "metrics.port=0",
            f"health.fake_nvml_dir={nvml}",
            "health.write_test_bytes=4096",
            *sets,
        ]
        if textfile_dir is not None:
            self.sets.append(f"metrics.textfile_dir={textfile_dir}")
        self.proc: subprocess.Popen | None = None

    def start(self) -> LiveRun:
        config = self.repo / TINY.relative_to(REPO)
        cmd = [sys.executable, "-m", "resilient.cli", "run", str(config), "--run-dir", str(self.run_dir)]
        cmd += [a for s in self.sets for a in ("--set", s)]
        env = {
            **os.environ,
            "PYTHONPATH": str(self.repo),
            "RESILIENT_NODE_NAME": self.node,
            "OMP_NUM_THREADS": "1",
            "PYTHONWARNINGS": "ignore",
        }
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(
                cmd, cwd=self.repo, env=env, stdout=subprocess.DEVNULL, stderr=log, start_new_session=True
            )
        return self

    def stop(self) -> None:
        """SIGKILL the supervisor's session: its ranks die with it (PR_SET_PDEATHSIG), stopped or not."""
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=30)

    def set_gpus(self, sample: dict[str, Any]) -> None:
        """Replace the scripted NVML state atomically (the health monitor reads it at its next check)."""
        tmp = self.nvml_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(sample))
        tmp.rename(self.nvml_file)

    def status(self) -> dict[str, Any]:
        try:
            return read_status(self.run_dir)
        except Exception:  # not written yet, or being replaced
            return {}

    def events(self, kind: str) -> list[dict[str, Any]]:
        return [e for e in ledger.read(self.run_dir) if e.get("event") == kind] if self.run_dir.exists() else []

    def train_log(self) -> list[dict[str, Any]]:
        path = self.run_dir / "train_log.jsonl"
        out = []
        for line in path.read_text().splitlines() if path.exists() else []:
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:  # a line being written
                pass
        return out

    def wait(self, probe: Callable[[], Any], timeout: float, what: str) -> Any:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise AssertionError(
                    f"{self.node}: supervisor exited {self.proc.returncode} while waiting for "
                    f"{what}:\n{self.log.read_text()[-3000:]}"
                )
            got = probe()
            if got:
                return got
            time.sleep(0.2)
        raise AssertionError(
            f"{self.node}: timed out after {timeout:.0f}s waiting for {what}:\n{self.log.read_text()[-3000:]}"
        )

    def metrics_port(self, timeout: float = 180) -> int:
        return self.wait(
            lambda: next(iter((self.status().get("metrics_ports") or {}).values()), None),
            timeout,
            "the metrics port in status.json",
        )

    def running_rank(self, timeout: float = 180) -> tuple[int, int]:
        """(attempt, pid) of the rank once its attempt has completed a step."""

        def probe() -> tuple[int, int] | None:
            status = self.status()
            attempt, ranks = status.get("attempt"), status.get("ranks") or []
            stepped = any(r.get("attempt") == attempt for r in self.train_log())
            if status.get("state") == "running" and stepped and ranks and ranks[0].get("pid"):
                return attempt, ranks[0]["pid"]
            return None

        return self.wait(probe, timeout, "a running rank that completed a step")

    def exit_code(self, timeout: float) -> int:
        assert self.proc is not None
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(
                f"{self.node}: supervisor still running after {timeout:.0f}s:\n{self.log.read_text()[-3000:]}"
            ) from None


class Driver(threading.Thread):
    """Runs one scenario script beside the tests that wait for its alerts; keeps its error for them."""

    def __init__(self, name: str, script: Callable[[dict[str, Any]], None]) -> None:
        super().__init__(name=name, daemon=True)
        self.script = script
        self.error: str | None = None
        self.notes: dict[str, Any] = {}
        """What the script found out (an exit code, a time), for the tests."""

    def run(self) -> None:
        try:
            self.script(self.notes)
        except BaseException as err:  # noqa: BLE001 - reported to the tests that wait on this scenario
            self.error = f"{type(err).__name__}: {err}"

    def failed(self) -> str | None:
        return self.error
