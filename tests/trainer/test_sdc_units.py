"""Without processes: the silent-data-corruption decisions, the digest, the fault injection."""

from __future__ import annotations

import json
import math

import pytest
import torch

from resilient.core.exit_codes import ExitCode
from trainer.bitflip import default_bit, flip_bit
from trainer.checkpoint.memory import naming, retention
from trainer.checkpoint.memory.choice import Inventory, choose_tier
from trainer.checkpoint.policy import newest_at_most
from trainer.injection import FaultInjection
from trainer.numerics import judge_grad_norm
from trainer.sdc import digest
from trainer.sdc.verdicts import (
    DIGEST,
    GRAD_NORM,
    LOSS,
    attribute,
    differing_parameters,
    exit_code_for,
    first_difference,
    judge_replicas,
    moment,
    trusted_until,
)


def test_replicas_agree_or_the_majority_names_the_odd_rank():
    assert judge_replicas([7, 7, 7], [0, 0, 0]).agree
    odd = judge_replicas([7, 9, 7], [0, 0, 0])
    assert not odd.agree and odd.suspects == (1,) and odd.mismatched == (0,) and not odd.needs_reexecution
    # two positions (tp=2) with three replicas each: only rank 4 (position 0) is outvoted
    split = judge_replicas([1, 2, 1, 2, 5, 2], [0, 1, 0, 1, 0, 1])
    assert split.suspects == (4,) and split.mismatched == (0,)


@pytest.mark.parametrize("digests", [[7, 9], [1, 2, 3], [1, 1, 2, 2]], ids=["two replicas", "three-way", "tie"])
def test_a_mismatch_without_a_strict_majority_needs_a_reexecution(digests):
    verdict = judge_replicas(digests, [0] * len(digests))
    assert not verdict.agree and verdict.suspects == () and verdict.needs_reexecution


def test_results_reproduce_bitwise_and_a_nan_reproduces_a_nan():
    assert first_difference(5, (2.5, 1.0), (2.5, 1.0)) is None
    assert first_difference(5, (math.nan, 1.0), (math.nan, 1.0)) is None
    assert first_difference(5, (2.5, 1.0), (2.5000001, 1.0)) == moment(5, LOSS)
    assert first_difference(5, (2.5, 1.0), (2.5, 1.5)) == moment(5, GRAD_NORM)
    assert moment(5, DIGEST) < moment(6, LOSS)


def test_reexecution_blames_the_replica_whose_own_result_parted_first():
    replicas, positions = [0, 1], [0, 0]
    # a weight flip on rank 1 at step 13: its own token losses differ at 13, rank 0 only sees it through the
    # gradient reduction (its gradient norm at 13)
    blamed = attribute([moment(13, GRAD_NORM), moment(13, LOSS)], replicas, positions, mismatched=[0])
    assert blamed.suspects == (1,) and blamed.first_step == 13 and not blamed.reproduced
    # a flip of rank 0's reduced gradients at step 13: only its own gradient norm differs at 13
    assert attribute([moment(13, GRAD_NORM), moment(14, GRAD_NORM)], replicas, positions).suspects == (0,)
    # the flip came after the last forward: only rank 1's own digest at the check does not reproduce
    assert attribute([None, moment(15, DIGEST)], replicas, positions).suspects == (1,)
    assert attribute([None, None], replicas, positions).reproduced
    # every replica parted at the same moment: nobody can be blamed, but it did not reproduce
    nobody = attribute([moment(13, GRAD_NORM)] * 2, replicas, positions)
    assert nobody.suspects == () and nobody.first_step == 13 and not nobody.reproduced


def test_reexecution_narrows_a_pipeline_replica_to_the_mismatched_stage():
    # pp=2 x dp=2: ranks 0,1 are replica 0 (stages 0,1), ranks 2,3 replica 1; replica 1's loss (on its
    # last stage, rank 3) parts first, and the digests differ at stage 0 only
    firsts = [moment(9, GRAD_NORM), moment(9, GRAD_NORM), moment(9, GRAD_NORM), moment(9, LOSS)]
    blamed = attribute(firsts, [0, 0, 1, 1], [0, 1, 0, 1], mismatched=[0])
    assert blamed.suspects == (2,)  # replica 1 at the mismatched position 0


def test_trust_ends_at_the_last_agreement_and_before_the_first_unreproduced_step():
    assert trusted_until(10, None) == 10
    assert trusted_until(10, 13) == 10
    assert trusted_until(15, 13) == 12  # replicas agreed on state that a forward fault had already reached
    assert trusted_until(None, 3) == 2


def test_only_the_suspect_nodes_ranks_leave_and_how():
    assert exit_code_for(rank=3, node=1, suspect_nodes=[1], action="remove") == ExitCode.UNHEALTHY_NODE
    assert exit_code_for(rank=3, node=1, suspect_nodes=[1], action="restart") == ExitCode.RANK_FAILED
    assert exit_code_for(rank=0, node=0, suspect_nodes=[1], action="remove") is None  # waits to be stopped
    assert exit_code_for(rank=0, node=0, suspect_nodes=[], action="remove") == ExitCode.RANK_FAILED
    assert exit_code_for(rank=1, node=0, suspect_nodes=[], action="remove") is None


def test_the_incident_names_the_parameters_that_differ():
    names = ["a", "b", "c"]
    every = [(0, [1, 2, 3], names), (0, [1, 9, 3], names), (0, [1, 2, 3], names)]
    assert differing_parameters(every) == {1: ["b"]}


def test_a_single_bit_flip_always_changes_the_digest():
    torch.manual_seed(0)
    params = torch.nn.Linear(33, 7)  # odd sizes: the int32 path as well as the int64 one
    before = digest.fold(digest.parameter_sums([params]))
    assert before == digest.fold(digest.parameter_sums([params]))  # reading the bits changes nothing
    for tensor, bit in ((params.weight, 0), (params.weight, 31), (params.bias, 22)):
        flip_bit(tensor.data, 5, bit)
        assert digest.fold(digest.parameter_sums([params])) != before
        flip_bit(tensor.data, 5, bit)
        assert digest.fold(digest.parameter_sums([params])) == before


def test_flip_bit_and_its_default_bits():
    t = torch.tensor([1.5, -0.25], dtype=torch.float32)
    assert flip_bit(t, 0, 22) == (1.5, 1.0)  # the highest mantissa bit: off by a third
    assert flip_bit(t, 1, 31) == (-0.25, 0.25)  # the sign bit of a 32-bit value
    assert default_bit(torch.float32, "weights") == 22 and default_bit(torch.bfloat16, "gradients") == 6
    assert default_bit(torch.float32, "activation") == 30


def test_injection_reads_this_ranks_entries_once_and_poisons_a_window_again(tmp_path):
    (tmp_path / "faults.json").write_text(
        json.dumps(
            {
                "nan_loss": [{"step": 4}],
                "bitflip": [
                    {"step": 6, "rank": 1, "attempt": 0, "target": "gradients", "bit": 3},
                    {"step": 7, "rank": 0, "attempt": 0},
                    {"step": 8, "rank": 1, "attempt": 1},
                ],
            }
        )
    )
    rank1 = FaultInjection(tmp_path, attempt=0, rank=1)
    flip = rank1.bitflip(6)
    assert (flip.step, flip.target, flip.bit) == (6, "gradients", 3)
    assert rank1.bitflip(6) is None and rank1.bitflip(7) is None and rank1.bitflip(8) is None
    assert math.isnan(rank1.poison(4, window_start=24))
    assert math.isnan(rank1.poison(4, window_start=24))  # re-executing the same data: a real blow-up
    assert rank1.poison(4, window_start=32) == 1.0  # the step after the window was skipped
    assert rank1.poison(5, window_start=40) == 1.0


def test_unknown_bitflip_target_is_ignored_with_an_error(tmp_path, caplog):
    (tmp_path / "faults.json").write_text(json.dumps({"bitflip": [{"step": 6, "rank": 0, "target": "optimizer"}]}))
    assert FaultInjection(tmp_path, attempt=0, rank=0).bitflip(6) is None
    assert "bitflip target" in caplog.text


def test_a_restart_after_a_finding_never_takes_a_memory_snapshot_after_the_trusted_step():
    inventories = [Inventory({10: None, 15: None, 20: None}), Inventory({10: None, 15: None, 20: None})]
    assert choose_tier(inventories, disk_step=8).step == 20
    bounded = choose_tier(inventories, disk_step=8, at_most=16)
    assert bounded.step == 15 and "after the trusted step 16" in bounded.reason
    assert choose_tier(inventories, disk_step=8, at_most=9).step is None
    assert newest_at_most([4, 8, 12], 10) == 8 and newest_at_most([4, 8, 12], 3) is None
    assert newest_at_most([4, 8, 12], None) == 12


def test_withdrawn_memory_snapshots_lose_their_commit(tmp_path):
    for step in (5, 10, 15):
        path = naming.step_dir(tmp_path, step)
        path.mkdir(parents=True)
        (path / naming.COMMITTED).write_text("{}")
    assert retention.uncommit_after(tmp_path, 8) == [10, 15]
    assert [s for s, p in naming.steps_in(tmp_path).items() if (p / naming.COMMITTED).exists()] == [5]


def test_gradient_norm_faults():
    assert judge_grad_norm(math.nan, [], spike_factor=0, window=3).fault == "grad_norm_nan"
    assert judge_grad_norm(9.0, [1.0, 1.2, 0.9], spike_factor=3, window=3).fault == "grad_norm_spike"
    assert judge_grad_norm(9.0, [1.0, 1.2, 0.9], spike_factor=0, window=3).fault is None
