"""Replica checks every step raise no false alarm over 1,000 steps of the tiny preset, and change no bits.

Kept cheap: two ranks, one 16-token sequence per rank and step, no checkpoint but the final one, no
supervisor; every step is checked (its train-log record carries the check's seconds).
"""

from __future__ import annotations

import json

import pytest

from resilient.core import ledger
from tests.ranks import digest, run_ranks

STEPS = 1000


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_a_thousand_checked_steps_raise_no_alarm(tmp_path):
    sets = [
        f"train.steps={STEPS}",
        "train.warmup_steps=10",
        "train.eval_every=0",
        f"train.log_every={STEPS}",
        "train.global_batch=2",
        "train.micro_batch=1",
        "train.seq_len=16",
        "data.num_workers=0",
        "checkpoint.interval_steps=0",
        "numerics.replica_check_interval_steps=1",
    ]
    assert run_ranks(tmp_path, sets, timeout=800) == [0, 0], (tmp_path / "rank0.log").read_text()[-3000:]
    records = [json.loads(line) for line in (tmp_path / "train_log.jsonl").read_text().splitlines()]
    checked = [r["step"] for r in records if r.get("replica_check_s", 0) > 0]
    assert checked == list(range(1, STEPS + 1))  # one check after every step, in one uninterrupted pass
    alarms = [e for e in ledger.read(tmp_path) if e["event"] in ("sdc_suspected", "sdc_confirmed", "numeric_fault")]
    assert alarms == []


@pytest.mark.slow
def test_checks_with_the_overlapped_parameter_gather_change_no_bits(tmp_path):
    """The distributed optimizer's overlapped gather leaves other ranks' updated shards stale until the next
    forward: a check (and a save) gathers them first, as megatron's own loop does, and changes nothing."""
    base = [
        "train.steps=6",
        "train.warmup_steps=2",
        "train.eval_every=0",
        "checkpoint.interval_steps=3",
        "parallel.distributed_optimizer=true",
        "parallel.overlap_param_gather=true",
        "parallel.overlap_grad_reduce=true",
    ]
    runs = {every: tmp_path / f"every{every}" for every in (0, 1)}
    for every, run_dir in runs.items():
        assert run_ranks(run_dir, [*base, f"numerics.replica_check_interval_steps={every}"]) == [0, 0], (
            run_dir / "rank0.log"
        ).read_text()[-3000:]
    assert digest(runs[0]) == digest(runs[1])
    assert not [e for e in ledger.read(runs[1]) if e["event"].startswith("sdc_")]
