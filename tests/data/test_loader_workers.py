"""The training loader's worker processes: one that never delivers (stuck at its start, as a forked worker
once was in CI) is replaced within the step, and the step's micro-batches are those of an in-process loader."""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

import pytest
import torch

from trainer.data.loader import TrainLoader

SEQ_LEN = 8


class _StuckOnce:
    """Windows of a fixed token pattern; the first worker to read anything blocks forever (a real process,
    stuck as a deadlocked worker would be: alive, silent)."""

    def __init__(self, flag: Path | None) -> None:
        self.flag, self.seq_len = flag, SEQ_LEN

    def __len__(self) -> int:
        return 64

    def __getitem__(self, window: int) -> torch.Tensor:
        if self.flag is not None and torch.utils.data.get_worker_info() is not None:
            try:
                os.close(os.open(self.flag, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
            except FileExistsError:
                pass
            else:
                while True:
                    time.sleep(60)
        return torch.arange(window * SEQ_LEN, window * SEQ_LEN + SEQ_LEN + 1, dtype=torch.int64)


def _loader(dataset: _StuckOnce, workers: int) -> TrainLoader:
    return TrainLoader(
        dataset,  # type: ignore[arg-type]
        fingerprint="f",
        seed=1,
        global_batch=4,
        micro_batch=2,
        dp_rank=0,
        dp_size=1,
        num_workers=workers,
        prefetch_factor=1,
        worker_timeout_s=2.0,
    )


@pytest.mark.timeout(120)
def test_a_worker_that_never_delivers_is_replaced_and_the_step_is_unchanged(tmp_path, caplog):
    reference = _loader(_StuckOnce(None), 0)
    expected = [reference.next_step() for _ in range(3)]
    loader = _loader(_StuckOnce(tmp_path / "stuck"), 1)
    with caplog.at_level(logging.WARNING, logger="trainer.data.loader"):
        got = [loader.next_step() for _ in range(3)]
    loader.close()
    assert (tmp_path / "stuck").exists()  # a worker did get stuck
    assert "replacing the workers" in caplog.text
    assert loader.consumed_samples == 3 * 4
    for want, have in zip(expected, got, strict=True):
        assert len(want) == len(have) == 2 and all(torch.equal(a, b) for a, b in zip(want, have, strict=True))
