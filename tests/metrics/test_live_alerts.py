"""Every alert whose condition the system can produce on CPU, raised by the running system and seen firing
by a real Prometheus scraping at 15 s (tests/alerting.py): real supervisors and trainer ranks, GPUs
scripted through `health.fake_nvml_dir`, real signals, the node facts served by a real node_exporter.

Three runs at once; the alerts of the hang run (no progress: the rule's 5 minutes; the heartbeat limit
is the run's, 20 s here, then the rule's 2 minutes) are checked at the end of the session
(`session_end`), so the suite's other tests run while the rules' `for:` durations elapse:
  faults   trains; a NaN loss (rolled back), three SIGKILLed ranks, then XID 79 and an uncorrectable
           ECC error on GPU 0 and GPU 1 lost: the supervisor exits UNHEALTHY_NODE within a second,
           and the GPU alerts fire from the node facts it left behind;
  hang     trains, saves, then its rank is SIGSTOPped with hang detection set beyond the test;
           Prometheus learns of it only then, so all it ever sees of the run is no progress;
  storage  the checkpoint filesystem is too small: the supervisor stops STORAGE_FAULT in pre-flight,
           before any scrape could reach it.
"""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Iterator

import pytest

from resilient.core.exit_codes import ExitCode
from resilient.core.rundir import RunDir
from tests.alerting import AlertWatch, Driver, LiveRun, gpus

pytestmark = [pytest.mark.slow, pytest.mark.prometheus, pytest.mark.timeout(900)]

FAULTS, HANG, STORAGE = "live-faults", "live-hang", "live-storage"
BROKEN_GPUS = gpus({"index": 0, "xids": [79], "ecc_uncorrected": 2}, {"index": 1, "lost": True})
WAIT_S = 600.0  # the slowest alert (no progress) fires about 6 minutes after the module starts


def faults(run: LiveRun, watch: AlertWatch, notes: dict) -> None:
    watch.add_supervisor(run.node, run.metrics_port())
    # A counter's first sample is no increase: Prometheus must have scraped it at 0 before the restarts.
    run.wait(
        lambda: watch.prometheus.query(f'resilient_restarts_total{{node="{run.node}"}}')["data"]["result"],
        120,
        "Prometheus's first scrape of the run",
    )
    run.wait(lambda: run.events("ckpt_save"), 300, "a committed checkpoint (the NaN rollback's target)")
    attempt, _ = run.running_rank()
    step = max(r["step"] for r in run.train_log())
    faults_file = RunDir(run.run_dir).faults  # read by the trainer when it changes: replaced whole
    faults_file.with_suffix(".tmp").write_text(json.dumps({"nan_loss": [{"step": step + 8, "attempt": attempt}]}))
    faults_file.with_suffix(".tmp").rename(faults_file)
    run.wait(lambda: run.events("numeric_fault"), 120, "the NaN loss")
    watch.wait_firing("ResilientLossNaN", 120, node=run.node)  # before the exits below end the exporter
    for _ in range(3):
        attempt, pid = run.running_rank()  # each attempt made progress: a restart loop, not NO_PROGRESS
        os.kill(pid, signal.SIGKILL)
        run.wait(lambda attempt=attempt: (run.status().get("attempt") or 0) > attempt, 120, "the restart")
    run.running_rank()
    watch.wait_firing("ResilientRestartLoop", 120, node=run.node)
    run.set_gpus(BROKEN_GPUS)
    notes["exit"] = run.exit_code(120)


def hang(run: LiveRun, watch: AlertWatch, notes: dict) -> None:
    run.wait(lambda: run.events("ckpt_save"), 300, "a committed checkpoint")
    _, pid = run.running_rank()
    os.kill(pid, signal.SIGSTOP)
    time.sleep(1.0)  # heartbeats already sent are drained: the step Prometheus sees never changes
    watch.add_supervisor(run.node, run.metrics_port())


def storage(run: LiveRun, watch: AlertWatch, notes: dict) -> None:
    notes["exit"] = run.exit_code(180)


RUNS = {
    HANG: (
        hang,
        [
            "checkpoint.interval_steps=3",
            "supervisor.warm_spares=false",
            "metrics.checkpoint_max_age_s=20",
            "metrics.heartbeat_max_age_s=20",
            # the run lives until the session's end: no phase of the stopped rank may time out before it
            "supervisor.step_timeout_initial_s=7200",
            "supervisor.step_timeout_floor_s=7200",
            "supervisor.checkpoint_timeout_s=7200",
            "supervisor.eval_timeout_s=7200",
        ],
    ),
    FAULTS: (faults, ["checkpoint.interval_steps=5", "health.monitor_interval_s=1", "supervisor.max_restarts=10"]),
    STORAGE: (storage, ["health.ckpt_min_free_gib=1000000", "supervisor.warm_spares=false"]),
}


@pytest.fixture(scope="session")  # the hang run lives on until the tests moved to the session's end
def live(alert_watch: AlertWatch, tmp_path_factory) -> Iterator[dict[str, tuple[LiveRun, Driver]]]:
    out: dict[str, tuple[LiveRun, Driver]] = {}
    try:
        for node, (script, sets) in RUNS.items():  # the hang, the slowest, first
            run = LiveRun(tmp_path_factory.mktemp(node), node, alert_watch.textfile_dir, sets).start()
            driver = Driver(node, lambda notes, s=script, r=run: s(r, alert_watch, notes))
            driver.start()
            out[node] = (run, driver)
        yield out
    finally:
        for run, _ in out.values():
            run.stop()


def fired(live, watch: AlertWatch, node: str, alertname: str, *, now: bool = False, **labels: str) -> dict:
    _, driver = live[node]
    return watch.wait_firing(alertname, WAIT_S, now=now, abort=driver.failed, node=node, **labels)


def test_storage_fault_fires_though_the_supervisor_stopped_before_any_scrape(live, alert_watch):
    alert = fired(live, alert_watch, STORAGE, "ResilientStorageFault")
    run, driver = live[STORAGE]
    driver.join(60)
    assert driver.notes["exit"] == ExitCode.STORAGE_FAULT, run.log.read_text()[-2000:]
    assert alert["annotations"]["summary"].startswith(f"{STORAGE}: checkpoint storage is low, full or failing")
    # The node fact says storage, not an unhealthy node: a full filesystem is never the node's fault.
    verdict = alert_watch.prometheus.query(f'resilient_node_health_verdict{{node="{STORAGE}"}}')["data"]["result"]
    assert [v["metric"]["verdict"] for v in verdict] == ["storage"] and verdict[0]["metric"]["check"] == "node.ckpt_dir"
    assert not alert_watch.seen("ResilientNodeUnhealthy", node=STORAGE)


def test_a_nan_loss_the_trainer_rolled_back_fires_loss_nan(live, alert_watch):
    alert = fired(live, alert_watch, FAULTS, "ResilientLossNaN")
    assert alert["labels"]["job"] == "resilient"
    assert live[FAULTS][0].events("numeric_fault")[0]["action"] == "rollback"


def test_three_killed_ranks_fire_restart_loop(live, alert_watch):
    alert = fired(live, alert_watch, FAULTS, "ResilientRestartLoop")
    assert alert["annotations"]["summary"].startswith(f"{FAULTS}: ")
    assert len([f for f in live[FAULTS][0].events("failure") if f["kind"] == "rank_exit"]) == 3


def test_xid_79_ecc_and_a_lost_gpu_fire_after_the_supervisor_is_gone(live, alert_watch):
    xid = fired(live, alert_watch, FAULTS, "ResilientGpuXidCritical", gpu="0")
    run, driver = live[FAULTS]
    driver.join(180)
    assert driver.notes.get("exit") == ExitCode.UNHEALTHY_NODE, driver.error or run.log.read_text()[-2000:]
    assert xid["annotations"]["summary"] == f"GPU 0 on {FAULTS} reported critical XID 79"
    # Firing now, with the supervisor gone: from the node facts node_exporter serves.
    fired(live, alert_watch, FAULTS, "ResilientGpuXidCritical", now=True, gpu="0")
    ecc = fired(live, alert_watch, FAULTS, "ResilientGpuEccUncorrectable", now=True, gpu="0")
    assert float(ecc["value"]) == 2
    fired(live, alert_watch, FAULTS, "ResilientGpuLost", now=True, gpu="1")
    unhealthy = fired(live, alert_watch, FAULTS, "ResilientNodeUnhealthy", now=True)
    assert unhealthy["labels"]["check"] == "gpu.ecc,gpu.lost,gpu.xid"
    assert "critical XID 79 on gpu0" in unhealthy["labels"]["reason"]
    assert unhealthy["annotations"]["summary"].startswith(f"{FAULTS} is unhealthy (gpu.ecc,gpu.lost,gpu.xid): ")
    assert not alert_watch.seen("ResilientGpuXidCritical", node=FAULTS, gpu="1"), "GPU 1 had no XID"


@pytest.mark.session_end
def test_a_checkpoint_older_than_its_limit_fires_checkpoint_too_old(live, alert_watch):
    fired(live, alert_watch, HANG, "ResilientCheckpointTooOld")


@pytest.mark.session_end
def test_a_run_that_never_advances_fires_no_progress(live, alert_watch):
    fired(live, alert_watch, HANG, "ResilientNoProgress")
    assert live[HANG][0].status()["state"] == "running", "the supervisor's own hang detection stayed out of it"


@pytest.mark.session_end
def test_a_stopped_rank_fires_heartbeat_stale(live, alert_watch):
    alert = fired(live, alert_watch, HANG, "ResilientRankHeartbeatStale", rank="0")
    run, _ = live[HANG]
    assert alert["annotations"]["summary"].startswith(f"Rank 0 on {HANG} has sent no heartbeat for ")
    assert not run.events("failure"), "the supervisor did not act on the hang (as configured)"
