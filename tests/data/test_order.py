"""The global order and the rank slices as pure functions."""

from __future__ import annotations

import numpy as np
import pytest

from trainer.data.order import GlobalOrder, check_resume, epoch_permutation, num_windows, rank_micro_batches
from trainer.data.prepare import SPAWN_MIN_BYTES, choose_workers


def test_rank_slices_follow_the_contract_formula():
    b, G, mb, dp = 3, 12, 2, 3
    for r in range(dp):
        got = rank_micro_batches(b * G, G, mb, r, dp)
        assert [list(x) for x in got] == [
            [b * G + j * (mb * dp) + r * mb + i for i in range(mb)] for j in range(G // (mb * dp))
        ]


@pytest.mark.parametrize("dp", [1, 2, 4])
def test_rank_slices_partition_the_global_batch_for_any_dp(dp):
    G, mb, consumed = 16, 2, 48
    samples = sorted(s for r in range(dp) for mbatch in rank_micro_batches(consumed, G, mb, r, dp) for s in mbatch)
    assert samples == list(range(consumed, consumed + G))


def test_indivisible_layout_is_rejected():
    with pytest.raises(ValueError, match="not divisible"):
        rank_micro_batches(0, 10, 4, 0, 1)


def test_each_epoch_is_a_permutation_that_depends_on_seed_and_epoch():
    n = 1000
    p0, p1 = epoch_permutation(5, 0, n), epoch_permutation(5, 1, n)
    assert sorted(p0.tolist()) == list(range(n)) and sorted(p1.tolist()) == list(range(n))
    assert not np.array_equal(p0, p1)
    assert np.array_equal(p0, epoch_permutation(5, 0, n))
    assert not np.array_equal(p0, epoch_permutation(6, 0, n))


def test_global_order_at_a_far_position_equals_walking_there():
    order, far = GlobalOrder(97, seed=3), GlobalOrder(97, seed=3)
    walked = [order.window(s) for s in range(0, 97 * 5 + 13)]
    assert far.window(97 * 5 + 12) == walked[-1]
    assert sorted(walked[97 * 2 : 97 * 3]) == list(range(97))


def test_windows_share_one_token_and_drop_the_tail():
    assert num_windows(33, 16) == 2 and num_windows(32, 16) == 1 and num_windows(1, 16) == 0


def test_resume_state_checks_name_the_mismatch():
    good = {"version": 1, "consumed_samples": 80, "fingerprint": "abc", "seed": 1, "seq_len": 16}
    assert check_resume(good, fingerprint="abc", seed=1, seq_len=16) == (True, "resume at global sample 80")
    cases = {
        "fingerprint": ("zzz", "trained on data zzz"),
        "seed": (2, "seed 2"),
        "seq_len": (32, "seq_len 32"),
        "consumed_samples": (-1, "invalid consumed_samples"),
        "version": (9, "unknown version"),
    }
    for key, (value, expected) in cases.items():
        ok, reason = check_resume({**good, key: value}, fingerprint="abc", seed=1, seq_len=16)
        assert not ok and expected in reason and "\n" not in reason


def test_worker_choice():
    assert choose_workers(0, 1, 10**12, 16)[0] == 1
    assert choose_workers(0, 8, SPAWN_MIN_BYTES - 1, 16)[0] == 1
    assert choose_workers(0, 8, SPAWN_MIN_BYTES, 16)[0] == 8
    assert choose_workers(0, 64, SPAWN_MIN_BYTES, 16)[0] == 16
    assert choose_workers(4, 64, 10, 16) == (4, "requested, at most one per shard")
