"""Resume cost: restoring the loader at global sample 10^7 does the work of restoring it at 0
(measured as Python function calls, which do not depend on machine load), and lands there."""

from __future__ import annotations

import cProfile
import pstats

import torch

from tests.data.consumer import GLOBAL_BATCH, MICRO_BATCH, resume_at

SEED = 3
FAR = 10**7


def _resume(cfg, run_dir, position: int):
    return resume_at(position, cfg, run_dir, dp_rank=1, dp_size=2, seed=SEED)


def _calls(cfg, run_dir, position: int) -> int:
    profile = cProfile.Profile()
    profile.enable()
    loader, _ = _resume(cfg, run_dir, position)
    profile.disable()
    loader.close()
    return pstats.Stats(profile).total_calls


def test_resume_far_costs_what_resume_at_zero_costs(prepared):
    cfg, run_dir = prepared
    _calls(cfg, run_dir, 0)  # warm imports and caches
    near, far = _calls(cfg, run_dir, 0), _calls(cfg, run_dir, FAR)
    assert far <= 1.1 * near, f"resume at {FAR} made {far} calls, at 0 made {near}"


def test_resume_far_lands_on_the_right_samples(prepared):
    cfg, run_dir = prepared
    loader, batches = _resume(cfg, run_dir, FAR)
    # rank 1 of 2, micro-batch j: samples FAR + j*4 + 2 + [0, 2)
    for j, mb in enumerate(batches):
        for i in range(MICRO_BATCH):
            window = loader.order.window(FAR + j * MICRO_BATCH * 2 + MICRO_BATCH + i)
            assert torch.equal(mb[i], loader.dataset[window])
    assert loader.consumed_samples == FAR + GLOBAL_BATCH
