"""On one machine: a bit flipped in one rank's process is caught at the next replica check,
the rank and its node are named, state saved after the last agreeing step is withdrawn, and the run ends on
the fault-free bits: by majority with three replicas, by re-execution with two.

Checks every 5 steps and checkpoints every 4: a flip at step 13 is found at 15, the last agreeing step is
10, the checkpoint of step 12 (saved between them) is withdrawn and the run resumes from step 8; with the
memory tier (snapshots every 2 steps) the snapshot of step 14 is withdrawn too and it resumes from memory
step 10.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from resilient.core import ledger
from resilient.core.exit_codes import ExitCode
from tests.chaos.drills import COMMON, drill, why_failed
from tests.ranks import run_ranks

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

DP3 = ("supervisor.nproc_per_node=3", "train.global_batch=6")
CHECKS = ("numerics.replica_check_interval_steps=5",)
RESTART = ("numerics.sdc_action=restart",)
MEMORY = ("checkpoint.memory_interval_steps=2",)
STEPS = 24
FLIP, FOUND, AGREED, RESUMED = 13, 15, 10, 8


def _events(report: dict, name: str) -> list[dict]:
    return [e for e in ledger.read(report["run_dir"]) if e["event"] == name]


def _losses(run_dir: str | Path, attempt: int | None = None) -> dict[int, float]:
    records = [json.loads(line) for line in (Path(run_dir) / "train_log.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in records if "loss" in r and attempt in (None, r["attempt"])}


def _passed(report: dict) -> dict:
    assert report["passed"], why_failed(report)
    [fault] = report["faults"]
    assert fault["kind"] == "bitflip" and fault["detected_by"] == "sdc_confirmed", fault
    return report


def _resumed_after(report: dict, finding: dict) -> int:
    return next(e["step"] for e in _events(report, "ckpt_load") if e["ts"] > finding["ts"])


@pytest.fixture(scope="module")
def reference_dp3(tmp_path_factory) -> dict:
    """The fault-free three-replica run the DP3 drills compare with (one run for the module)."""
    report = drill(tmp_path_factory.mktemp("sdc-ref") / "run", "none", [], steps=STEPS, overrides=DP3 + CHECKS)
    assert report["passed"] and report["digest"], why_failed(report)
    return report


def test_dp3_weight_flip_is_outvoted_named_and_rolled_back_to_the_last_agreeing_state(tmp_path, reference_dp3):
    report = _passed(
        drill(
            tmp_path / "run",
            f"steps:{FLIP}",
            ["bitflip"],
            steps=STEPS,
            reference=reference_dp3["digest"],
            overrides=DP3 + CHECKS + RESTART + MEMORY,
        )
    )
    assert report["digest"] == reference_dp3["digest"]
    assert report["exit_codes"] == [ExitCode.FINISHED]  # restarted in the job, on the same machine
    [fault] = report["faults"]
    [found] = _events(report, "sdc_confirmed")
    assert (found["step"], found["how"], found["ranks"], found["nodes"]) == (
        FOUND,
        "majority vote",
        [fault["rank"]],
        ["chaos-node0"],
    )
    assert fault["found_at_step"] == FOUND  # the next check after the flip
    assert (found["trusted_until"], found["action"], found["withdrawn"]) == (
        AGREED,
        "restart",
        {"disk": [12], "memory": [14]},
    )
    assert list((tmp_path / "run" / "checkpoints").glob("step_0000012.sdc-*"))  # kept aside, never loaded
    load = next(e for e in _events(report, "ckpt_load") if e["ts"] > found["ts"])
    assert (load["step"], load["tier"]) == (AGREED, "memory-own")  # not the newer snapshot of step 14
    incident = json.loads((tmp_path / "run" / found["incident"] / "summary.json").read_text())
    digests = incident["check"]["digests"]
    assert len(set(digests)) == 2 and digests.count(digests[fault["rank"]]) == 1
    assert list(incident["check"]["differing_parameters"]) == [str(fault["rank"])]


def test_a_gradient_flip_that_barely_moves_the_loss_is_caught_by_the_replica_check(tmp_path, reference_dp3):
    # The drill's config on bare ranks (no supervisor: they stop at the finding); rank 1's gradients flip
    # after their reduction at step 13, so only its update differs.
    (tmp_path / "faults.json").write_text(json.dumps({"bitflip": [{"step": FLIP, "rank": 1, "target": "gradients"}]}))
    codes = run_ranks(tmp_path, [*COMMON, f"train.steps={STEPS}", *DP3, *CHECKS], world=3)
    assert codes == [ExitCode.UNHEALTHY_NODE] * 3  # rank 1's node (every rank of this machine) leaves
    [found] = [e for e in ledger.read(tmp_path) if e["event"] == "sdc_confirmed"]
    assert (found["step"], found["how"], found["ranks"]) == (FOUND, "majority vote", [1])
    # The corrupted steps' losses are within 0.1% of the fault-free ones: far inside any spike bound.
    clean, corrupted = _losses(reference_dp3["run_dir"]), _losses(tmp_path)
    changes = [abs(corrupted[s] - clean[s]) / clean[s] for s in range(FLIP, FOUND + 1)]
    assert changes[0] == 0 and 0 < max(changes) < 1e-3, changes
    assert not [e for e in ledger.read(tmp_path) if e["event"] == "numeric_fault"]


def test_dp2_weight_flip_is_named_by_reexecution_and_its_node_removed(tmp_path, reference):
    # two replicas: no majority; both re-execute from step 8 and the flipped rank alone does not reproduce
    # its own token losses at the flip's step. The default action removes the node: exit 76, the drill relaunches
    # as a requeue without it would (here: the same machine).
    report = _passed(drill(tmp_path / "run", f"steps:{FLIP}", ["bitflip"], reference=reference, overrides=CHECKS))
    assert report["digest"] == reference
    assert report["exit_codes"] == [ExitCode.UNHEALTHY_NODE, ExitCode.FINISHED]
    [fault] = report["faults"]
    [suspected] = _events(report, "sdc_suspected")
    assert (suspected["step"], suspected["kind"], suspected["reexecute_from"]) == (FOUND, "mismatch", RESUMED)
    [found] = _events(report, "sdc_confirmed")
    assert (found["how"], found["ranks"], found["action"]) == ("re-execution", [fault["rank"]], "remove")
    assert f"did not reproduce their own token losses at step {FLIP}" in found["reason"]
    assert found["withdrawn"]["disk"] == [12]
    health = [h for h in _events(report, "health") if h.get("check") == "rank.exit"]
    assert health and health[0]["severity"] == "fatal"  # the supervisor condemned the node (76)
    assert _resumed_after(report, found) == RESUMED
