"""Shared fixtures: one uninterrupted reference run of the tiny config, reused by every suite
that compares a disturbed run against it (same config, same bits); every Megatron-LM checkpoint layout;
one live Prometheus for every suite that drives the system into an alert (tests/alerting.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.alerting import alert_watch  # noqa: F401 - one Prometheus for every suite that drives alerts live
from tests.ranks import run_ranks

# 24 steps, checkpoints at 12 and 24: long enough for loss to fall, short enough for CI.
REFERENCE = ["train.steps=24", "train.warmup_steps=4", "train.eval_every=0", "checkpoint.interval_steps=12"]


@pytest.fixture(scope="session")
def reference_run(tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("reference")
    codes = run_ranks(run_dir, REFERENCE)
    assert codes == [0, 0], (run_dir / "rank0.log").read_text()[-3000:]
    return run_dir


@pytest.fixture(scope="session")
def megatron_lm_saves(tmp_path_factory):
    """Every checkpoint layout Megatron-LM writes, by both megatron-core lines' real save calls
    (tests/checkpoint/megatron_lm_writer.py); shared by the checkpoint and supervisor suites. Copy a
    layout before damaging it."""
    from tests.checkpoint.megatron_lm_writer import write_all

    return write_all(tmp_path_factory.mktemp("megatron_lm_saves"))


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Tests marked `session_end` run last: they wait on something a fixture started earlier (an alert's
    `for:` duration), and the rest of the suite runs meanwhile."""
    items.sort(key=lambda item: item.get_closest_marker("session_end") is not None)  # stable: order kept
