"""With real ranks: exact resume, crash consistency, corruption fallback, retention."""

from __future__ import annotations

import json
import random
import shutil
import signal
import time
from pathlib import Path

import pytest

from resilient.core import ledger
from resilient.core.exit_codes import ExitCode
from tests.conftest import REFERENCE
from tests.ranks import digest, resilient_cli, run_ranks, spawn_ranks, train_losses, wait_all
from trainer.checkpoint import manifest, ondisk

pytestmark = pytest.mark.slow


def copy_run(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("rank*.log"))
    return dst


def test_stop_at_n_and_rerun_matches_uninterrupted_run(reference_run, tmp_path):
    run_dir = tmp_path / "resumed"
    codes = run_ranks(run_dir, REFERENCE + ["train.exit_at_step=10"])
    assert codes == [ExitCode.PREEMPTED] * 2
    assert ondisk.read_latest(run_dir / "checkpoints") == 10
    assert run_ranks(run_dir, REFERENCE) == [0, 0]
    assert "resumed from step 10" in (run_dir / "rank0.log").read_text()
    assert digest(run_dir) == digest(reference_run)
    ref, got = train_losses(reference_run), train_losses(run_dir)
    assert {s: got[s] for s in range(11, 25)} == {s: ref[s] for s in range(11, 25)}


@pytest.mark.parametrize("damage", ["flip_byte", "truncate_shard", "delete_marker"])
def test_damaged_latest_fails_verify_and_next_run_falls_back(reference_run, tmp_path, damage):
    run_dir = copy_run(reference_run, tmp_path / damage)
    ckpt = ondisk.step_dir(run_dir / "checkpoints", 24)
    shard = sorted(ckpt.glob("__*.distcp"))[0]
    if damage == "flip_byte":
        data = bytearray(shard.read_bytes())
        data[len(data) // 2] ^= 0x01
        shard.write_bytes(bytes(data))
        reason = "checksum mismatch"
    elif damage == "truncate_shard":
        with open(shard, "r+b") as f:
            f.truncate(shard.stat().st_size // 2)
        reason = "size"
    else:
        (ckpt / ondisk.MARKER).unlink()
        reason = "no completion marker"
    out = resilient_cli("ckpt", "verify", str(run_dir), "--step", "24", "--json")
    assert out.returncode == ExitCode.CHECKPOINT_DAMAGED
    assert reason in json.loads(out.stdout)["problem"]

    assert run_ranks(run_dir, REFERENCE) == [0, 0]
    log = (run_dir / "rank0.log").read_text()
    assert "resumed from step 12" in log
    if damage == "delete_marker":
        assert "removing incomplete checkpoint step_0000024" in log
    else:
        fallbacks = [r for r in ledger.read(run_dir) if r["event"] == "ckpt_fallback"]
        assert fallbacks and fallbacks[-1]["from_step"] == 24 and fallbacks[-1]["to_step"] == 12
        assert reason in fallbacks[-1]["reason"]
        assert list((run_dir / "checkpoints").glob("step_0000024.damaged-*")), "the damaged one is kept aside"
    # Recomputing 13..24 from step 12 lands on the same bits as the undisturbed run.
    assert digest(run_dir) == digest(reference_run)


def test_sigkill_during_async_writes_never_leaves_a_bad_latest(tmp_path):
    """Seeded trials: kill every rank at a random moment while saving every step; `latest` must always
    name a checkpoint that verifies, and the next launch must resume from it."""
    rng = random.Random(20261124)
    run_dir = tmp_path / "crashy"
    config = ["train.steps=400", "train.eval_every=0", "checkpoint.interval_steps=1", "checkpoint.keep_last=2"]
    latest_after_kill = []
    trials = 6  # each a fresh launch (~7 s on 2 cores): CI's budget, not the property, sets the count
    for trial in range(trials):
        saves_before = _saves(run_dir)
        procs = spawn_ranks(run_dir, config)
        deadline = time.monotonic() + 120
        while _saves(run_dir) == saves_before and time.monotonic() < deadline:  # this launch committed one
            time.sleep(0.05)
        time.sleep(rng.uniform(0.0, 1.0))  # ...then die somewhere in the following saves
        for p in procs:
            p.send_signal(signal.SIGKILL)
        wait_all(procs, timeout=30)
        root = run_dir / "checkpoints"
        latest = ondisk.read_latest(root)
        assert latest is not None, f"trial {trial}: no latest"
        assert manifest.verify(ondisk.step_dir(root, latest), checksums=True) is None, f"trial {trial}"
        latest_after_kill.append(latest)
    loads = [r["step"] for r in ledger.read(run_dir) if r["event"] == "ckpt_load"]
    # Each relaunch resumed from the newest complete checkpoint the previous kill left, which is the one
    # `latest` named, or one committed after `latest` was read (marker written, pointer not yet).
    assert len(loads) == trials - 1
    assert all(load >= named for load, named in zip(loads, latest_after_kill[:-1], strict=True))
    assert all(load <= named for load, named in zip(loads, latest_after_kill[1:], strict=True))
    assert latest_after_kill == sorted(latest_after_kill) and latest_after_kill[-1] > latest_after_kill[0]


def _saves(run_dir: Path) -> int:
    return sum(1 for r in ledger.read(run_dir) if r["event"] == "ckpt_save")


def test_retention_keeps_exactly_the_promised_set(tmp_path):
    run_dir = tmp_path / "retention"
    codes = run_ranks(
        run_dir,
        [
            "train.steps=10",
            "train.eval_every=0",
            "checkpoint.interval_steps=1",
            "checkpoint.keep_last=2",
            "checkpoint.keep_every=4",
        ],
    )
    assert codes == [0, 0]
    assert ondisk.committed_steps(run_dir / "checkpoints") == [4, 8, 9, 10]
    assert sorted(ondisk.step_dirs(run_dir / "checkpoints")) == [4, 8, 9, 10]
    saves = [r["step"] for r in ledger.read(run_dir) if r["event"] == "ckpt_save"]
    assert saves == list(range(1, 11))


def test_ckpt_cli_list_inspect(reference_run):
    out = resilient_cli("ckpt", "list", str(reference_run), "--json")
    # this run's disk tier (`ckpt list` also reports stale memory tiers of gone runs, which earlier tests leave)
    rows = [r for r in json.loads(out.stdout) if r.get("tier") == "disk"]
    assert [(r["step"], r["state"], r["latest"]) for r in rows] == [(12, "complete", False), (24, "complete", True)]
    # each records the last step whose replica check agreed before it was saved (checks every 10 steps)
    assert [r["last_agreeing_step"] for r in rows] == [10, 20]
    info = json.loads(resilient_cli("ckpt", "inspect", str(reference_run), "--json").stdout)
    assert info["step"] == 24 and info["consumed_samples"] == 24 * 8 and info["parallel"]["dp"] == 2
    assert info["identity"]["num_layers"] == 2 and info["bytes"] > 0
    assert resilient_cli("ckpt", "verify", str(reference_run)).returncode == 0
