"""The supervisor's coordinator and the scale simulator's take the same decision for the same reports, lost
nodes and spares.

Both paths run as they do in a job: every node posts its typed report through a real sealed store, node 0
reads them back, gathers what it knows (the store's stop request; the daemon also reads the progress
directory) and calls `decide_attempt`; the decision goes back through the store to the other nodes.
Property-style over seeded random report sets, plus the cases the simulator used to decide differently.
"""

from __future__ import annotations

import itertools
import os
import random
from pathlib import Path

import pytest

from bench.scale.simulate import Marks, SimNode
from resilient.config import load_config
from resilient.core import ledger
from resilient.core.exit_codes import ExitCode
from resilient.core.kvstore import StoreClient, host_store
from resilient.core.outcome import Outcome
from resilient.supervisor.auth import Sealer
from resilient.supervisor.coordination import Coordinator
from resilient.supervisor.daemon import Supervisor
from resilient.supervisor.decisions import AttemptDecision
from resilient.supervisor.reports import NodeOutcome, NodeReport, RankExit, StopKind
from resilient.supervisor.roster import initial
from resilient.supervisor.store import SealedStore
from resilient.supervisor.topology import Topology
from trainer.checkpoint.ondisk import MARKER, step_dir

STEPS = 16
# (rank command, supervisor.final_save_check, checkpoint.save_on_finish): whose final step is checked, and how
VARIANTS = {
    "own trainer": ("[python, -m, trainer, --config, '{config}']", "null", "true"),
    "another script": ("[python, train.py]", "null", "true"),
    "another script, checked": ("[python, train.py]", "true", "true"),
    "own trainer, no final save": ("[python, -m, trainer, --config, '{config}']", "null", "false"),
}


@pytest.fixture(scope="module")
def supervisors(tmp_path_factory):
    """One node-0 supervisor per config variant (nothing started: no ranks, no store, no metrics)."""
    out = {}
    for name, (command, check, save) in VARIANTS.items():
        run_dir = tmp_path_factory.mktemp("run")
        cfg = load_config(
            None,
            [
                f"train.steps={STEPS}",
                "supervisor.max_restarts=3",
                "supervisor.max_attempts_without_progress=2",
                "supervisor.backoff_max_s=5",
                f"supervisor.rank_command={command}",
                f"supervisor.final_save_check={check}",
                f"checkpoint.save_on_finish={save}",
                "metrics.enabled=false",
                "health.enabled=false",
                "supervisor.warm_spares=false",
            ],
        )
        out[name] = Supervisor(cfg, Topology(0, 1, ("127.0.0.1",), 0, "n0", "test"), run_dir)
    return out


@pytest.fixture(scope="module")
def store():
    """One real sealed store for every case; each case is a new job on it (fresh coordinators, no stop key)."""
    sealer = Sealer(os.urandom(32), "test")
    server = host_store("127.0.0.1", 0, sealer.store_key)
    client = StoreClient("127.0.0.1", server.port, sealer.store_key, connect_timeout_s=10, op_timeout_s=10)
    yield SealedStore(client, sealer, _forged)
    server.close()


_ATTEMPTS = itertools.count()


class Job:
    """One coordinator per node, as the supervisors of one job hold them, on a store without a stop request."""

    def __init__(self, store: SealedStore, nnodes: int) -> None:
        store.delete_prefix("stop")
        cfg = load_config(None).supervisor
        self.coords = [Coordinator(store, n, nnodes, cfg, "127.0.0.1") for n in range(nnodes)]
        self.attempt = next(_ATTEMPTS)


def _forged(key: str, reason: str) -> None:
    raise AssertionError(f"forged value in a test store: {key}: {reason}")


def committed_dir(root: Path, newest: int | None) -> Path:
    """A checkpoint directory whose newest committed step is `newest` (our layout: a step dir with its marker)."""
    root.mkdir(parents=True)
    if newest is not None:
        step_dir(root, newest).mkdir()
        (step_dir(root, newest) / MARKER).write_text("{}")
    return root


def both_paths(
    store: SealedStore,
    sup: Supervisor,
    tmp: Path,
    reports: list[NodeReport],
    nnodes: int,
    *,
    restarts: int = 0,
    streak: int = 0,
    stop: tuple[int, StopKind] | None = None,
    newest: int | None = None,
    spares: int = 0,
    lost: dict[int, str] | None = None,
) -> tuple[AttemptDecision, AttemptDecision]:
    """(daemon's decision, simulator's decision) for `reports` posted by their nodes in a job of `nnodes` with
    `spares` spare nodes, where the coordinator's leases found the node ranks `lost` lost."""
    job = Job(store, nnodes)
    attempt = job.attempt
    if stop is not None:
        job.coords[stop[0]].request_stop(stop[1], f"node {stop[0]}: test stop")
    for r in reports:
        job.coords[r.node].report(attempt, r)
    node0 = job.coords[0]
    plan = initial(nnodes, nnodes + spares)
    posted = node0.reports(attempt, plan, range(nnodes))  # as daemon._decide gathers them
    assert posted == {r.node: r for r in reports}
    lost_slots = {plan.nodes[k]: why for k, why in (lost or {}).items()}

    topo = Topology(0, nnodes + spares, ("127.0.0.1",) * (nnodes + spares), 0, "n0", "test")
    sim = SimNode(topo, nnodes, sup.scfg, Sealer(os.urandom(32), "test"), 1, 1.0, Marks())
    sim.coord, sim.plan, sim.roster, sim.lost.lost = node0, plan, plan, dict(lost_slots)
    sim.restarts, sim.no_progress_streak, sim.train_steps, sim.newest_committed = restarts, streak, STEPS, newest
    sim.save_on_finish = sup.cfg.checkpoint.save_on_finish
    simulated = sim.decide(posted)

    sup.coord, sup.attempt, sup.restarts, sup.no_progress_streak = node0, attempt, restarts, streak
    sup.topo, sup.plan, sup.roster, sup.lost.lost = topo, plan, plan, dict(lost_slots)
    sup.progress_root = committed_dir(tmp, newest)
    real = sup._coordinator_decision(posted)
    assert sup.no_progress_streak == sim.no_progress_streak == real.no_progress_streak

    node0.publish_decision(attempt, real)
    assert all(c.decision(attempt) == real for c in job.coords)  # every node reads the same decision
    return real, simulated


def random_reports(rng: random.Random, nnodes: int) -> list[NodeReport]:
    reports = []
    for node in range(nnodes):
        if nnodes > 1 and rng.random() < 0.1:
            continue  # its supervisor did not report
        outcome = rng.choice(list(NodeOutcome))
        start = rng.choice([None, *range(0, STEPS + 1, 4)])
        reached = rng.choice([None, start or 0, (start or 0) + rng.randint(1, 4)])
        final = RankExit(rng.choice([64, 79]), f"rank {node} exited") if rng.random() < 0.1 else None
        why = f"node n{node}: gpu.xid: XID 79" if outcome is NodeOutcome.UNHEALTHY else None
        reports.append(NodeReport(node, outcome, start, reached, why, final))
    return reports


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_generated_report_sets_get_the_same_decision_on_both_paths(store, supervisors, variant, tmp_path):
    rng = random.Random(f"decision-paths-{variant}")
    seen: set[Outcome | None] = set()
    replaced = 0
    for case in range(60):
        nnodes = rng.randint(1, 4)
        reports = random_reports(rng, nnodes)
        kind = rng.choice([None, None, StopKind.PREEMPTED, StopKind.STORAGE])
        stop = None if kind is None else (rng.randrange(nnodes), kind)
        silent = {
            n: "lease not renewed for 4.2s"
            for n in range(nnodes)
            if n not in {r.node for r in reports} and rng.random() < 0.7
        }  # most nodes without a report lost their lease; the others are missing
        inputs = dict(
            restarts=rng.randint(0, 4),
            streak=rng.randint(0, 2),
            stop=stop,
            newest=rng.choice([None, 4, STEPS - 1, STEPS, STEPS + 2]),
            spares=rng.choice([0, 0, 1, 2]),
            lost=silent,
        )
        real, simulated = both_paths(store, supervisors[variant], tmp_path / str(case), reports, nnodes, **inputs)
        assert real == simulated, (reports, inputs)
        seen.add(real.outcome)
        replaced += real.replace
    assert len(seen) >= 6, seen  # the generated sets reach most of the decision's branches
    assert replaced, "some generated sets replace a node with a spare"


def test_finished_but_final_step_not_committed_is_a_storage_fault_on_both_paths(store, supervisors, tmp_path):
    sup = supervisors["own trainer"]
    finished = [NodeReport(n, NodeOutcome.FINISHED, 8, STEPS) for n in range(2)]
    real, simulated = both_paths(store, sup, tmp_path / "ckpt", finished, 2, newest=8)
    assert real == simulated and real.outcome is Outcome.STORAGE_FAULT and real.final_step_uncommitted
    assert "newest committed: step 8" in real.reason
    recorded = [e for e in ledger.read(sup.run_dir) if e["event"] == "storage_fault"]
    assert recorded and recorded[-1]["reason"] == real.reason  # the daemon records what the decision found


def test_a_storage_stop_is_a_storage_fault_on_both_paths(store, supervisors, tmp_path):
    stopped = [NodeReport(0, NodeOutcome.PREEMPTED, 8, 9), NodeReport(1, NodeOutcome.PREEMPTED, 8, 9)]
    real, simulated = both_paths(
        store, supervisors["own trainer"], tmp_path / "ckpt", stopped, 2, stop=(1, StopKind.STORAGE), newest=9
    )
    assert real == simulated and real.outcome is Outcome.STORAGE_FAULT and real.reason == "node 1: test stop"


@pytest.mark.parametrize(
    "code,outcome",
    [(ExitCode.CONFIG_ERROR, Outcome.CONFIG_ERROR), (ExitCode.CHECKPOINT_DAMAGED, Outcome.CHECKPOINT_DAMAGED)],
)
def test_a_final_rank_exit_ends_the_run_on_both_paths(store, supervisors, tmp_path, code, outcome):
    reports = [
        NodeReport(0, NodeOutcome.FAILED, 8, 9),
        NodeReport(1, NodeOutcome.FAILED, 8, 9, final_rank_exit=RankExit(int(code), "rank 3 exited")),
    ]
    real, simulated = both_paths(store, supervisors["own trainer"], tmp_path / "ckpt", reports, 2)
    assert real == simulated and real.outcome is outcome and real.exit_code is code


def test_a_node_condemned_by_its_rank_ends_the_run_unhealthy_on_both_paths(store, supervisors, tmp_path):
    why = "node n1: rank 3 (pid 9) exited with code 76 (UNHEALTHY_NODE: the rank found this node unfit)"
    reports = [NodeReport(0, NodeOutcome.FAILED, 8, 9), NodeReport(1, NodeOutcome.UNHEALTHY, 8, 9, why)]
    real, simulated = both_paths(store, supervisors["own trainer"], tmp_path / "ckpt", reports, 2)
    assert real == simulated and real.exit_code is ExitCode.UNHEALTHY_NODE and real.reason == why
    assert [f.node for f in real.faulty_nodes] == [1]
