"""Issue 24: replica checks every step raise no false alarm over 1,000 steps of the tiny preset.

Kept cheap: two ranks, one 16-token sequence per rank and step, no checkpoint but the final one, no
supervisor; every step is checked (its train-log record carries the check's seconds).
"""

from __future__ import annotations

import json

import pytest

from resilient.core import ledger
from tests.ranks import run_ranks

STEPS = 1000


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_a_thousand_checked_steps_raise_no_alarm(tmp_path):
    sets = [f"train.steps={STEPS}", "train.warmup_steps=10", "train.eval_every=0", f"train.log_every={STEPS}",
            "train.global_batch=2", "train.micro_batch=1", "train.seq_len=16", "data.num_workers=0",
            "checkpoint.interval_steps=0", "numerics.replica_check_interval_steps=1"]
    assert run_ranks(tmp_path, sets, timeout=800) == [0, 0], (tmp_path / "rank0.log").read_text()[-3000:]
    records = [json.loads(line) for line in (tmp_path / "train_log.jsonl").read_text().splitlines()]
    checked = [r["step"] for r in records if r.get("replica_check_s", 0) > 0]
    assert checked == list(range(1, STEPS + 1))  # one check after every step, in one uninterrupted pass
    alarms = [e for e in ledger.read(tmp_path) if e["event"] in ("sdc_suspected", "sdc_confirmed", "numeric_fault")]
    assert alarms == []
