"""One drill per fault kind and a mixed schedule, each against real supervised runs.

Every drill must finish, end on the fault-free run's bits (except the NaN rollback, which by design
trains on other data and is compared against a rerun of its schedule), leave no process behind, and
show every injected fault in the ledger with its detection latency.
"""

from __future__ import annotations

import signal

import psutil
import pytest

from resilient.core import ledger
from resilient.core.exit_codes import ExitCode
from resilient.core.ledger import read_jsonl
from resilient.supervisor.ranks import free_port
from tests.chaos.drills import COMMON, CONFIG, drill, why_failed
from tests.mcore import current_python
from tests.ranks import digest
from tests.supervisor.harness import events as ledger_events
from tests.supervisor.harness import ranks_of, start, start_nodes, wait_until

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]


def _events(report: dict, name: str) -> list[dict]:
    return [e for e in ledger.read(report["run_dir"]) if e["event"] == name]


def _passed(report: dict) -> dict:
    assert report["passed"], why_failed(report)
    assert report["faults"] and all(f["detection_latency_s"] is not None for f in report["faults"])
    return report


def test_kill_rank_loses_only_recomputed_steps(tmp_path, reference):
    report = _passed(drill(tmp_path / "run", "steps:9", ["kill_rank"], reference=reference))
    assert report["digest"] == reference
    [failure] = _events(report, "failure")
    assert failure["kind"] == "rank_exit" and failure["rank"] == report["faults"][0]["rank"]
    # a failure shows up as goodput < 1 with lost progress equal to the recomputed steps
    gp = report["goodput"]
    assert gp["ratio"] < 1.0 and gp["badput_s"]["lost_progress"] > 0
    assert gp["recomputed_steps"] == gp["expected_recomputed_steps"] > 0
    assert gp["badput_s"]["lost_progress"] == pytest.approx(gp["expected_lost_s"], abs=1e-3)


def test_the_current_megatron_core_line_recovers_to_the_same_bits(tmp_path, reference):
    # megatron-core 0.19 ranks, the memory tier on: a killed rank resumes from memory, a preemption from
    # disk, and the run ends on the bits of the fault-free 0.16.1 reference (the two lines compute alike)
    report = _passed(
        drill(
            tmp_path / "run",
            "steps:7,15",
            ["kill_rank", "preempt"],
            reference=reference,
            overrides=("checkpoint.memory_interval_steps=2",),
            python=current_python(),
        )
    )
    assert report["digest"] == reference
    assert report["exit_codes"] == [ExitCode.PREEMPTED, ExitCode.FINISHED]
    loads = [e for e in _events(report, "ckpt_load") if e.get("rank") == 0]
    assert [e["tier"] for e in loads][:2] == ["memory-own", "disk"], loads


@pytest.mark.parametrize(
    "fault, exits",
    [
        # hang_rank, kill_supervisor and gpu_health alone: the mixed schedule below, which checks the same
        ("preempt", [ExitCode.PREEMPTED, ExitCode.FINISHED]),
        ("ckpt_write_kill", [ExitCode.FINISHED]),
        ("straggler", [ExitCode.FINISHED]),
    ],
)
def test_fault_leaves_the_same_bits(tmp_path, reference, fault, exits):
    report = _passed(drill(tmp_path / "run", "steps:6", [fault], reference=reference))
    assert report["digest"] == reference
    assert report["exit_codes"] == [int(c) for c in exits]
    if fault == "preempt":  # the stop saved the step it stopped at: the rerun loses no step
        stopped = [e["step"] for e in _events(report, "preempted") if "node" in e][-1]
        assert stopped in [e["step"] for e in _events(report, "ckpt_save")]
        # the step trained right after the stopped attempt's last record (in file order: whatever attempt number
        # the rerun got) is the next one
        trained = [r for r in read_jsonl(tmp_path / "run" / "train_log.jsonl") if "loss" in r]
        after = trained[max(i for i, r in enumerate(trained) if r["step"] == stopped) + 1 :]
        assert after and after[0]["step"] == stopped + 1, [  # on failure, the ledger's story
            (e["event"], e.get("attempt"), e.get("step"), e.get("reason")) for e in ledger.read(report["run_dir"])
        ]


def test_two_nodes_restart_together_and_end_on_the_same_bits(tmp_path, reference):
    # Two supervisors of one rank each, coordinated through node 0's store: a rank killed on node 1
    # restarts both nodes, and the run ends on the single-node reference bits (same world size).
    port, run_dir = free_port(), tmp_path / "run"
    sets = [a for s in [*COMMON, "nodes=2", "supervisor.nproc_per_node=1"] for a in ("--set", s)]
    nodes = start_nodes(CONFIG, run_dir, port, tmp_path, name="node", args=sets)
    try:
        wait_until(lambda: len(ledger_events(run_dir, "ckpt_save")) >= 2, 300, "two checkpoints")
        ranks_of(nodes[1].pid)[1].send_signal(signal.SIGKILL)
        assert [p.wait(600) for p in nodes] == [ExitCode.FINISHED, ExitCode.FINISHED]
    finally:
        for p in nodes:
            p.kill()
    [failure] = ledger_events(run_dir, "failure")
    assert (failure["kind"], failure["rank"], failure["node"]) == ("rank_exit", 1, 1)
    assert sorted((e["attempt"], e["node"]) for e in ledger_events(run_dir, "attempt_start")) == [
        (0, 0),
        (0, 1),
        (1, 0),
        (1, 1),
    ]
    assert digest(run_dir) == reference


def test_a_killed_supervisor_leaves_no_rank(tmp_path):
    proc = start(
        [
            "run",
            str(CONFIG),
            "--run-dir",
            str(tmp_path / "run"),
            *(a for s in [*COMMON, "train.steps=1000"] for a in ("--set", s)),
        ],
        log=tmp_path / "supervisor.log",
    )
    try:
        ranks = wait_until(
            lambda: list(ranks_of(proc.pid).values()) if len(ranks_of(proc.pid)) == 2 else None, 120, "two ranks"
        )
        wait_until(lambda: ledger_events(tmp_path / "run", "rank_init"), 300, "the ranks to start")
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
    finally:
        proc.kill()
    _, alive = psutil.wait_procs(ranks, timeout=5)
    assert alive == []


def test_corrupt_latest_falls_back_and_quarantines(tmp_path, reference):
    report = _passed(drill(tmp_path / "run", "steps:10", ["corrupt_ckpt"], reference=reference))
    assert report["digest"] == reference
    bad = report["faults"][0]["corrupted_step"]
    [fallback] = _events(report, "ckpt_fallback")
    assert fallback["from_step"] == bad and fallback["to_step"] < bad
    assert list((tmp_path / "run" / "checkpoints").glob(f"step_{bad:07d}.damaged-*"))


def test_full_checkpoint_filesystem_fails_saves_and_training_goes_on(tmp_path, reference):
    report = _passed(drill(tmp_path / "run", "steps:6", ["fill_disk"], reference=reference))
    # Saves fail and training goes on, or the monitor saw the full filesystem first: a storage fault
    # (82, never 76 "unhealthy node"), and the rerun after the space was freed finishes.
    assert report["digest"] == reference and report["exit_codes"][-1] == 0
    assert set(report["exit_codes"][:-1]) <= {ExitCode.STORAGE_FAULT}
    saves, storage = _events(report, "ckpt_save_failed"), _events(report, "storage_fault")
    assert saves or storage
    assert "No space left" in (saves[0]["error"] if saves else storage[0]["reason"])


def test_nan_loss_rolls_back_skips_the_window_and_reruns_identically(tmp_path, reference):
    runs = [_passed(drill(tmp_path / f"run{i}", "steps:14", ["nan_loss"], reference=reference)) for i in (0, 1)]
    for report in runs:
        [fault] = _events(report, "numeric_fault")
        [skip] = _events(report, "data_skip")
        assert (fault["step"], fault["kind"], fault["action"]) == (14, "nan", "rollback")
        assert skip["to_sample"] - skip["from_sample"] == 8 and skip["rollback_to"] == 12
    assert runs[0]["digest"] == runs[1]["digest"] != reference  # other data seen, the same way twice


def test_mixed_schedule_of_five_faults(tmp_path, reference):
    faults = ["kill_rank", "preempt", "hang_rank", "kill_supervisor", "corrupt_ckpt", "gpu_health"]
    report = _passed(drill(tmp_path / "run", "steps:4,8,12,16,20,24", faults, reference=reference))
    assert [f["kind"] for f in report["faults"]] == faults
    assert report["digest"] == reference and report["goodput"]["ratio"] < 1.0
    # each fault ends its launch the way it alone would: a preemption, the killed supervisor, the bad GPU
    assert report["exit_codes"] == [ExitCode.PREEMPTED, -9, ExitCode.UNHEALTHY_NODE, ExitCode.FINISHED]
    [hang] = [e for e in _events(report, "failure") if e["kind"] == "hang"]
    assert hang["rank"] == next(f["rank"] for f in report["faults"] if f["kind"] == "hang_rank")
