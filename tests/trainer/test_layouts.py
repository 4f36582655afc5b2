"""Megatron-native ranks (gloo, CPU) on pipeline, virtual-pipeline, tensor and data
parallel layouts with megatron's DDP and distributed optimizer.

One 4-layer tiny model, 6 steps, checkpoints at 3 and 6, trained once per layout (module fixture):
- every layout's loss falls, and its first-step loss equals the plain DP2 run's (same initial
  weights whatever the layout: trainer.init; same global batches: the data order ignores layout),
  one rank accumulating the whole global batch included;
- stopping at step 3 and rerunning on the same layout ends with the same bits;
- a PP2 or DP2 (distributed optimizer) checkpoint resumed on one rank continues the loss trajectory.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from resilient.core.errors import ConfigError
from resilient.core.exit_codes import ExitCode
from tests.ranks import TINY, digest, refusal_line, run_ranks, train_losses
from trainer.checkpoint import ondisk
from trainer.config import cpu_refusal, load_trainer_config

pytestmark = pytest.mark.slow

BASE = [
    "train.steps=6",
    "train.warmup_steps=2",
    "train.eval_every=0",
    "checkpoint.interval_steps=3",
    "model.overrides.num_layers=4",
]
LAYOUTS = {
    "dp2": (2, []),
    "dp1_two_micro_batches": (1, []),  # the same global batch accumulated on one rank
    "pp2": (2, ["parallel.pp=2"]),
    "pp2_vpp2": (2, ["parallel.pp=2", "parallel.vpp=2"]),
    "tp2": (2, ["parallel.tp=2"]),
    "dp2_distopt": (2, ["parallel.distributed_optimizer=true"]),
    "pp2_dp2_distopt": (4, ["parallel.pp=2", "parallel.distributed_optimizer=true"]),
}
FIRST_STEP_RTOL = 1e-5  # float32 sums in a different order (pipeline, TP split, reduce-scatter)
RESHARD_RTOL = 1e-4


def _train(run_dir: Path, world: int, overrides: list[str]) -> None:
    codes = run_ranks(run_dir, BASE + overrides, world=world, timeout=600)
    assert codes == [0] * world, (run_dir / "rank0.log").read_text()[-3000:]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    out = {}
    for name, (world, overrides) in LAYOUTS.items():
        out[name] = tmp_path_factory.mktemp(name)
        _train(out[name], world, overrides)
    return out


def test_every_layout_trains_and_starts_from_the_same_loss(runs):
    reference = train_losses(runs["dp2"])[1]
    for name, run_dir in runs.items():
        curve = train_losses(run_dir)
        assert sorted(curve) == list(range(1, 7)), name
        assert curve[6] < curve[1] - 0.1, (name, curve)
        assert abs(curve[1] - reference) / reference < FIRST_STEP_RTOL, (name, curve[1], reference)


@pytest.mark.parametrize("name", ["pp2_vpp2", "dp2_distopt", "pp2_dp2_distopt"])  # plain PP2: the acceptance run
def test_stop_and_rerun_on_the_same_layout_is_bit_identical(runs, tmp_path, name):
    world, overrides = LAYOUTS[name]
    run_dir = tmp_path / name
    codes = run_ranks(run_dir, BASE + overrides + ["train.exit_at_step=3"], world=world, timeout=600)
    assert codes == [ExitCode.PREEMPTED] * world, (run_dir / "rank0.log").read_text()[-3000:]
    _train(run_dir, world, overrides)
    assert "resumed from step 3" in (run_dir / "rank0.log").read_text()
    assert digest(run_dir) == digest(runs[name])
    ref, got = train_losses(runs[name]), train_losses(run_dir)
    assert {s: got[s] for s in (4, 5, 6)} == {s: ref[s] for s in (4, 5, 6)}


@pytest.mark.parametrize(
    "name, one_rank",
    [
        ("pp2", []),
        ("dp2_distopt", ["parallel.distributed_optimizer=true"]),
    ],
)
def test_checkpoint_resumes_resharded_on_one_rank(runs, tmp_path, name, one_rank):
    run_dir = tmp_path / f"{name}_to_one_rank"
    shutil.copytree(runs[name], run_dir, ignore=shutil.ignore_patterns("rank*.log"))
    shutil.rmtree(ondisk.step_dir(run_dir / "checkpoints", 6))
    _train(run_dir, 1, one_rank)
    assert "resumed from step 3" in (run_dir / "rank0.log").read_text()
    ref, got = train_losses(runs[name]), train_losses(run_dir)
    for step in (4, 5, 6):
        assert got[step] == pytest.approx(ref[step], rel=RESHARD_RTOL), (step, got[step], ref[step])


@pytest.mark.parametrize(
    "overrides, needle",
    [
        (["parallel.cp=2"], "parallel.cp: context parallelism needs transformer-engine attention on GPU"),
        (["parallel.pp=2", "parallel.vpp=3"], "parallel.pp: 2 layers cannot fill 2 pipeline stages x 3 virtual stages"),
        (["parallel.sequence_parallel=true"], "parallel.sequence_parallel: needs tp > 1"),
        (["parallel.tp=2", "parallel.sequence_parallel=true"], "parallel.sequence_parallel: needs transformer-engine"),
        (["parallel.overlap_param_gather=true"], "parallel.overlap_param_gather: needs distributed_optimizer"),
        (["train.recompute_granularity=full"], "train.recompute_granularity: full recomputation needs"),
        (
            ["train.recompute_granularity=selective"],
            "train.recompute_granularity: activation recomputation runs on GPU",
        ),
    ],
)
def test_a_layout_the_trainer_cannot_run_is_refused_naming_the_field(overrides, needle):
    with pytest.raises(ConfigError) as err:
        cfg = load_trainer_config(TINY, overrides, world_size=2)
        if problem := cpu_refusal(cfg):  # what the rank checks on a machine without CUDA
            raise ConfigError(problem)
    assert needle in err.value.one_line()


def test_a_refused_layout_ends_the_rank_with_one_line_and_exit_64(tmp_path):
    line = refusal_line(tmp_path, ["parallel.cp=2"], world=2)
    assert "parallel.cp: context parallelism needs" in line, line


def test_chaos_drills_pass_with_pp2_and_the_distributed_optimizer(tmp_path, monkeypatch):
    """A killed rank and a preemption, with the acceptance layout: the run ends on the fault-free bits."""
    from tests.chaos.drills import drill, why_failed

    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # reference and drill: the same float sums
    layout_sets = ("parallel.pp=2", "parallel.distributed_optimizer=true")
    reference = drill(tmp_path / "ref", "none", [], steps=12, overrides=layout_sets)
    assert reference["passed"] and reference["digest"], reference
    report = drill(
        tmp_path / "run",
        "steps:5,9",
        ["kill_rank", "preempt"],
        steps=12,
        reference=reference["digest"],
        overrides=layout_sets,
    )
    assert report["passed"], why_failed(report)
    assert report["digest"] == reference["digest"]
    assert [f["kind"] for f in report["faults"]] == ["kill_rank", "preempt"]
