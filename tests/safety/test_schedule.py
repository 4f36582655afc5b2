"""Extending a finished run: the learning-rate schedule follows the new config (it decays over the new
length instead of staying at min_lr), and the ledger records what changed."""

from __future__ import annotations

import pytest

from resilient.core import ledger
from resilient.core.rundir import RunDir
from tests.ranks import run_ranks

pytestmark = pytest.mark.timeout(600)
BASE = [
    "train.warmup_steps=1",
    "train.eval_every=0",
    "checkpoint.interval_steps=0",
    "train.log_every=1",
    "train.lr=0.003",
    "train.min_lr=0.0003",
]


def test_extended_run_follows_the_new_schedule_and_records_it(tmp_path):
    run_dir = tmp_path / "run"
    for steps in (4, 8):
        assert run_ranks(run_dir, [*BASE, f"train.steps={steps}"], timeout=280) == [0, 0], (
            run_dir / "rank0.log"
        ).read_text()[-2000:]
    lrs = {r["step"]: r["lr"] for r in ledger.read_jsonl(RunDir(run_dir).train_log) if "lr" in r}
    assert lrs[4] == pytest.approx(0.0003)  # the 4-step run ended its decay
    assert lrs[5] > 0.0003 * 1.5 and lrs[5] > lrs[6] > lrs[7] > lrs[8] - 1e-12  # decays again over 8 steps
    [changed] = [e for e in ledger.read(run_dir) if e["event"] == "lr_schedule_changed"]
    assert changed["step"] == 4 and changed["changes"]["lr_decay_steps"] == [4, 8]
