"""Node checks: a full checkpoint filesystem (real tmpfs), memory and /dev/shm thresholds."""

import os
import subprocess
from pathlib import Path

import pytest

from health.config import HealthConfig
from health.node_checks import GIB, check_ckpt_dir, check_shm, judge_memory, judge_shm, node_checks
from health.types import Severity


@pytest.fixture
def small_tmpfs(tmp_path: Path):
    mnt = tmp_path / "run"
    mnt.mkdir()
    proc = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=1m,mode=0700", "tmpfs", str(mnt)], capture_output=True, text=True
    )
    if proc.returncode != 0:
        pytest.fail(f"cannot mount a tmpfs here: {proc.stderr.strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", str(mnt)], check=True)


def fill(directory: Path) -> None:
    with open(directory / "filler", "wb") as f:
        try:
            while True:
                f.write(b"\0" * 65536)
                f.flush()
        except OSError:
            pass


def test_full_checkpoint_filesystem_fails_the_node(small_tmpfs):
    cfg = HealthConfig(ckpt_min_free_gib=256 / 1024 / 1024, write_test_bytes=128 << 10)  # 256 KiB, 128 KiB
    before = check_ckpt_dir(small_tmpfs, cfg)
    assert before.severity is Severity.OK, before.reason
    (small_tmpfs / "checkpoints").mkdir(exist_ok=True)
    fill(small_tmpfs / "checkpoints")
    after = check_ckpt_dir(small_tmpfs, cfg)
    assert after.severity is Severity.FATAL
    assert "need" in after.reason and "write+fsync of 131072 bytes failed" in after.reason
    assert "No space left on device" in after.reason
    assert not [p for p in (small_tmpfs / "checkpoints").iterdir() if p.name != "filler"]  # probe file removed


def test_write_test_alone_catches_a_full_disk_under_a_lax_threshold(small_tmpfs):
    cfg = HealthConfig(ckpt_min_free_gib=0, write_test_bytes=64 << 10)
    (small_tmpfs / "checkpoints").mkdir()
    fill(small_tmpfs / "checkpoints")
    r = check_ckpt_dir(small_tmpfs, cfg)
    assert r.severity is Severity.FATAL and "write+fsync" in r.reason and "need" not in r.reason


def test_checkpoint_dir_not_made_yet_is_judged_by_its_parent_and_not_created(tmp_path):
    r = check_ckpt_dir(tmp_path / "run" / "ckpt", HealthConfig(ckpt_min_free_gib=0))
    assert r.severity is Severity.OK and r.values["write_mb_per_s"] > 0
    assert os.listdir(tmp_path) == []


def test_unwritable_checkpoint_dir_is_fatal(tmp_path):
    blocker = tmp_path / "run"
    blocker.write_text("a file where the run directory should be")
    r = check_ckpt_dir(blocker / "checkpoints", HealthConfig())
    assert r.severity is Severity.FATAL and str(blocker / "checkpoints") in r.reason


def test_memory_threshold():
    cfg = HealthConfig(mem_min_available_gib=4)
    assert judge_memory(3 * GIB, cfg).severity is Severity.FATAL
    assert judge_memory(5 * GIB, cfg).severity is Severity.OK


def test_shm_threshold(small_tmpfs):
    assert judge_shm(64 << 20, HealthConfig(shm_min_gib=1)).severity is Severity.FATAL
    r = check_shm(HealthConfig(shm_path=small_tmpfs, shm_min_gib=0.5))  # a 1 MiB "/dev/shm"
    assert r.severity is Severity.FATAL and "need 0.5 GiB" in r.reason


def test_node_checks_here_are_healthy(tmp_path):
    results = node_checks(tmp_path / "checkpoints", HealthConfig(shm_min_gib=0.01, mem_min_available_gib=0.01))
    assert [r.name for r in results] == ["node.ckpt_dir", "node.memory", "node.shm"]
    assert all(r.severity is Severity.OK for r in results), results
    assert os.listdir(tmp_path) == []
