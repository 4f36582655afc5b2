"""The global sample order and a rank's share of it (pure functions, no I/O).

A sample is a window of seq_len+1 tokens starting at token `w * seq_len` of the prepared token
stream (consecutive windows share one token, as inputs and shifted labels need). Global sample
`s` is window `perm_e[s % N]` with `e = s // N` the epoch and `perm_e` a permutation of the N
windows seeded by (seed, e). The order thus depends on the seed and the data only; the number of
data-parallel ranks only decides who reads which sample:

    step b, dp rank r, micro-batch j  ->  global samples  b*G + j*(mb*dp) + r*mb + [0, mb)

so a run that resumes on a different DP size (with the matching gradient accumulation) trains on
exactly the same global batches. The position is just the count of consumed global samples:
jumping to sample 10^9 costs one permutation of the current epoch, as sample 0 does.
"""

from __future__ import annotations

import numpy as np

STATE_VERSION = 1


def num_windows(tokens: int, seq_len: int) -> int:
    """Windows of seq_len+1 tokens (stride seq_len) that fit in `tokens`."""
    return max(0, (tokens - 1) // seq_len)


def epoch_permutation(seed: int, epoch: int, n: int) -> np.ndarray:
    """The window order of one epoch."""
    dtype = np.uint32 if n < 2**32 else np.int64
    return np.random.default_rng([seed, epoch]).permutation(np.arange(n, dtype=dtype))


class GlobalOrder:
    """Maps global sample indices to window indices, keeping the current epoch's permutation."""

    def __init__(self, n_windows: int, seed: int) -> None:
        if n_windows <= 0:
            raise ValueError("no windows")
        self.n_windows = n_windows
        self.seed = seed
        self._epoch = -1
        self._perm = np.empty(0, dtype=np.int64)

    def window(self, sample: int) -> int:
        epoch, pos = divmod(sample, self.n_windows)
        if epoch != self._epoch:
            self._perm = epoch_permutation(self.seed, epoch, self.n_windows)
            self._epoch = epoch
        return int(self._perm[pos])


def rank_micro_batches(consumed: int, global_batch: int, micro_batch: int, dp_rank: int, dp_size: int) -> list[range]:
    """Global sample indices of each micro-batch of this rank for the step starting at `consumed`."""
    stride = micro_batch * dp_size
    if global_batch % stride:
        raise ValueError(f"global batch {global_batch} is not divisible by micro_batch x dp = {stride}")
    return [
        range(consumed + j * stride + dp_rank * micro_batch, consumed + j * stride + (dp_rank + 1) * micro_batch)
        for j in range(global_batch // stride)
    ]


def check_resume(state: dict, *, fingerprint: str, seed: int, seq_len: int) -> tuple[bool, str]:
    """Whether a saved loader state can continue on the configured data, and why not."""
    if not isinstance(state, dict):
        return False, f"data: loader state is a {type(state).__name__}, not a mapping"
    if state.get("version") != STATE_VERSION:
        return False, f"data: loader state has unknown version {state.get('version')!r}"
    consumed = state.get("consumed_samples")
    if not isinstance(consumed, int) or consumed < 0:
        return False, f"data: loader state has invalid consumed_samples {consumed!r}"
    if state.get("fingerprint") != fingerprint:
        return False, (
            f"data: the checkpoint was trained on data {state.get('fingerprint')}, the configured data is "
            f"{fingerprint} (different shards, tokenizer or EOS); resume with the original data.path/tokenizer"
        )
    if state.get("seed") != seed:
        return False, f"data: the checkpoint's data order uses seed {state.get('seed')}, the config has {seed}"
    if state.get("seq_len") != seq_len:
        return False, f"data: the checkpoint's windows have seq_len {state.get('seq_len')}, the config has {seq_len}"
    return True, f"resume at global sample {consumed}"
