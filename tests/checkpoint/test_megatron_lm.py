"""Megatron-LM-layout checkpoints written by megatron-core: list, verify, repair."""

from __future__ import annotations

import json
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from resilient.core.exit_codes import ExitCode
from tests.ranks import REPO, resilient_cli
from trainer.megatron_lm import checkpoints as mlm


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> Path:
    """iter_0000010 and iter_0000020, the tracker naming 20 (one writer process for the module)."""
    save_dir = tmp_path_factory.mktemp("megatron_lm") / "save"
    out = subprocess.run([sys.executable, "-m", "tests.checkpoint.megatron_lm_writer", str(save_dir), "10", "20"],
                         cwd=REPO, capture_output=True, text=True, timeout=300,
                         env={**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr[-3000:]
    return save_dir


@pytest.fixture
def save(saved, tmp_path) -> Path:
    return Path(shutil.copytree(saved, tmp_path / "save"))


def _shards(save: Path, iteration: int) -> list[Path]:
    return sorted(mlm.iteration_dir(save, iteration).glob("__*.distcp"))


def test_complete_save_lists_verifies_and_needs_no_repair(save):
    assert len(_shards(save, 20)) >= 2
    rows = mlm.listing(save)
    assert [(r["step"], r["state"], r["latest"]) for r in rows] == [(10, "complete", False), (20, "complete", True)]
    assert mlm.tracker_problem(save) is None
    assert mlm.repair(save) == (20, 20, "tracker already names complete iteration 20")
    out = resilient_cli("ckpt", "verify", str(save), "--json")
    assert out.returncode == 0 and json.loads(out.stdout) == {"step": 20, "ok": True, "problem": None}


def test_missing_shard_makes_the_iteration_incomplete_and_repair_points_back(save):
    _shards(save, 20)[-1].unlink()
    assert "missing" in mlm.check_iteration(mlm.iteration_dir(save, 20))
    assert [r["state"] for r in mlm.listing(save)] == ["complete", "incomplete"]
    out = resilient_cli("ckpt", "verify", str(save), "--json")
    assert out.returncode == ExitCode.CHECKPOINT_DAMAGED and "missing" in json.loads(out.stdout)["problem"]
    out = resilient_cli("ckpt", "repair", str(save))
    assert out.returncode == 0 and "now names iteration 10" in out.stdout
    assert (save / mlm.TRACKER).read_text() == "10"
    assert os.stat(save / mlm.TRACKER).st_mode & 0o777 == 0o600
    assert mlm.tracker_problem(save) is None


def test_truncated_shard_is_incomplete(save):
    shard = _shards(save, 20)[0]
    os.truncate(shard, shard.stat().st_size - 1)
    assert "truncated" in mlm.check_iteration(mlm.iteration_dir(save, 20))
    assert mlm.repair(save)[:2] == (20, 10)


def test_tracker_naming_an_unfinished_iteration_is_repaired(save):
    unfinished = mlm.iteration_dir(save, 30)
    shutil.copytree(mlm.iteration_dir(save, 20), unfinished)
    (unfinished / ".metadata").unlink()  # written last by the save: it never finished
    mlm.write_tracker(save, 30)
    assert "iteration 30, which is incomplete" in mlm.tracker_problem(save)
    assert mlm.repair(save)[:2] == (30, 20)
    assert mlm.read_tracker(save) == 20


def test_no_complete_iteration_leaves_the_tracker_and_fails(save):
    for iteration in (10, 20):
        _shards(save, iteration)[0].unlink()
    out = resilient_cli("ckpt", "repair", str(save))
    assert out.returncode == ExitCode.CHECKPOINT_DAMAGED and "no complete iteration" in out.stdout
    assert mlm.read_tracker(save) == 20


def test_hostile_storage_metadata_is_refused_unexecuted(save, tmp_path):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    (mlm.iteration_dir(save, 20) / ".metadata").write_bytes(pickle.dumps(Evil()))
    problem = mlm.check_iteration(mlm.iteration_dir(save, 20))
    assert "not a checkpoint metadata type" in problem and not marker.exists()


def test_not_a_directory_is_a_one_line_config_error(tmp_path):
    out = resilient_cli("ckpt", "list", str(tmp_path / "absent"))
    assert out.returncode == ExitCode.CONFIG_ERROR and "Traceback" not in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1


def test_repair_points_our_latest_back_to_the_newest_step_that_verifies(tmp_path):
    from trainer.checkpoint import inspect as ck
    from trainer.checkpoint import layout

    for step in (10, 20):
        ckpt = layout.step_dir(tmp_path, step)
        ckpt.mkdir()
        (ckpt / "__0_0.distcp").write_bytes(b"abc")
        (ckpt / layout.MARKER).write_text(json.dumps({"files": {"__0_0.distcp": {"size": 3, "blake2b": "-"}}}))
    layout.write_latest(tmp_path, 20)
    assert ck.repair(tmp_path) == (20, 20, "latest already names complete step 20")
    os.truncate(layout.step_dir(tmp_path, 20) / "__0_0.distcp", 1)
    before, after, what = ck.repair(tmp_path)
    assert (before, after) == (20, 10) and "size 1 != 3" in what and layout.read_latest(tmp_path) == 10
