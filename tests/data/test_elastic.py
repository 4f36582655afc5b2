"""Elastic resume: N steps at one DP size, then another DP size with the matching gradient
accumulation, sees exactly the global batches of an uninterrupted run."""

from __future__ import annotations

import pytest
import torch

from trainer.data.loader import build_train_loader

SEQ_LEN, GLOBAL_BATCH, MICRO_BATCH, SEED = 16, 8, 2, 11
N_BEFORE, N_AFTER = 5, 7


def _loaders(cfg, run_dir, dp):
    return [
        build_train_loader(
            cfg,
            run_dir=run_dir,
            seq_len=SEQ_LEN,
            global_batch=GLOBAL_BATCH,
            micro_batch=MICRO_BATCH,
            dp_rank=r,
            dp_size=dp,
            seed=SEED,
        )
        for r in range(dp)
    ]


def _global_batch(loaders) -> torch.Tensor:
    """One step's global batch in global-sample order, reassembled from every rank's micro-batches:
    micro-batch j of rank r holds samples j*(mb*dp) + r*mb + [0, mb)."""
    per_rank = [ld.next_step() for ld in loaders]
    return torch.cat([per_rank[r][j] for j in range(len(per_rank[0])) for r in range(len(loaders))])


@pytest.mark.parametrize("dp_before,dp_after", [(2, 1), (1, 4), (4, 2)])
def test_resume_on_another_dp_size_continues_with_the_same_global_batches(prepared, dp_before, dp_after):
    cfg, run_dir = prepared
    uninterrupted = _loaders(cfg, run_dir, dp_before)
    reference = [_global_batch(uninterrupted) for _ in range(N_BEFORE + N_AFTER)]

    before = _loaders(cfg, run_dir, dp_before)
    head = [_global_batch(before) for _ in range(N_BEFORE)]
    states = [ld.state_dict() for ld in before]
    assert all(s == states[0] for s in states)  # the position is global, not per rank

    after = _loaders(cfg, run_dir, dp_after)
    assert after[0].grad_accum * dp_after == before[0].grad_accum * dp_before
    for ld in after:
        ld.load_state_dict(states[0])
    tail = [_global_batch(after) for _ in range(N_AFTER)]

    for step, (got, want) in enumerate(zip(head + tail, reference, strict=True)):
        assert got.shape == (GLOBAL_BATCH, SEQ_LEN + 1)
        assert torch.equal(got, want), f"global batch of step {step} differs"
