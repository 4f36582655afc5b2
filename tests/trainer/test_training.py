"""Real megatron-core ranks (gloo, CPU) trained end to end, and the inputs a rank refuses."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from resilient.core.errors import ConfigError
from tests.conftest import REFERENCE
from tests.ranks import TINY, digest, refusal_line, run_ranks, train_losses
from trainer.config import load_trainer_config
from trainer.data.prepare import check_inputs


@pytest.fixture(scope="module")
def twin_runs(reference_run, tmp_path_factory) -> tuple[Path, Path]:
    """The reference run (replica checks on, every 10 steps by default) and a second run of the same config
    with the checks off: checks read the parameters' bits and must never change them."""
    twin = tmp_path_factory.mktemp("twin")
    assert run_ranks(twin, [*REFERENCE, "numerics.replica_check_interval_steps=0"]) == [0, 0], (
        twin / "rank0.log"
    ).read_text()[-3000:]
    return reference_run, twin


@pytest.mark.slow
def test_tiny_run_finishes_with_falling_loss(twin_runs):
    run_dir, _ = twin_runs
    curve = train_losses(run_dir)
    assert sorted(curve) == list(range(1, 25))
    assert curve[24] < curve[1] - 0.5, curve
    record = json.loads((run_dir / "train_log.jsonl").read_text().splitlines()[-1])
    for key in ("lr", "grad_norm", "tokens_per_s", "step_time", "mfu"):
        assert record[key] > 0, key


@pytest.mark.slow
def test_same_config_gives_bit_identical_parameters(twin_runs):
    a, b = twin_runs
    assert digest(a) == digest(b)
    assert train_losses(a) == train_losses(b)


@pytest.mark.parametrize(
    "overrides, needle",
    [
        (["model.preset=llama5"], "model: unknown preset 'llama5'"),
        (["train.stepz=3"], "train.stepz"),
        (["supervisor.nproc_per_node=3", "parallel.tp=3"], "not divisible by tp=3"),
        (["train.global_batch=7"], "train.global_batch: 7 is not divisible"),
        (["data.path=/nonexistent/c4"], "/nonexistent/c4"),
        (["data.tokenizer=EMPTY"], "data.tokenizer"),
        (["data.tokenizer=GARBAGE"], "data.tokenizer"),
    ],
)
def test_bad_input_is_refused_naming_the_key(tmp_path, overrides, needle):
    (tmp_path / "empty.json").write_text("")
    (tmp_path / "garbage.json").write_text("{not json")
    overrides = [
        o.replace("EMPTY", str(tmp_path / "empty.json")).replace("GARBAGE", str(tmp_path / "garbage.json"))
        for o in overrides
    ]
    with pytest.raises(ConfigError) as err:  # what a rank checks before its first collective
        check_inputs(load_trainer_config(TINY, ["supervisor.nproc_per_node=1", *overrides], world_size=1).data)
    assert needle in err.value.one_line()


def test_bad_input_ends_the_rank_with_one_line_and_exit_64(tmp_path):
    line = refusal_line(tmp_path, ["data.path=/nonexistent/c4"], world=1)
    assert "/nonexistent/c4" in line and "config error" in line, line
