"""Run and checkpoint directories that another user owns or can write are refused with one line (exit
64) before anything is written, unless the operator overrides it explicitly."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from resilient.core.exit_codes import ExitCode
from tests.supervisor.harness import REPO, write_config

pytestmark = pytest.mark.timeout(300)
NOBODY = 65534


def _run(cfg, run_dir, *extra):
    return subprocess.Popen([sys.executable, "-m", "resilient.cli", "run", str(cfg), "--run-dir", str(run_dir),
                             *extra], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_shared_run_and_checkpoint_dirs_are_refused_unless_allowed(tmp_path):
    cfg = write_config(tmp_path / "cfg.yaml", steps=2)
    world = tmp_path / "world_writable"
    world.mkdir()
    os.chmod(world, 0o777)
    foreign = tmp_path / "foreign"
    foreign.mkdir(mode=0o700)
    os.chown(foreign, NOBODY, NOBODY)
    ckpt_shared = tmp_path / "ckpt_shared_run"
    shared_ckpt_cfg = write_config(tmp_path / "cfg2.yaml", steps=2)
    shared_ckpt_cfg.write_text(shared_ckpt_cfg.read_text() + f"checkpoint:\n  dir: {world}\n")
    procs = {
        "world": _run(cfg, world),
        "foreign": _run(cfg, foreign),
        "ckpt": _run(shared_ckpt_cfg, ckpt_shared),
        "allowed": _run(cfg, world, "--set", "supervisor.allow_shared_dir=true"),
    }
    out = {k: (p.wait(280), p.communicate()[1]) for k, p in procs.items()}
    for key, text in (("world", "writable by other users (mode 0777)"),
                      ("foreign", f"owned by uid {NOBODY}"), ("ckpt", "writable by other users")):
        code, err = out[key]
        assert code == ExitCode.CONFIG_ERROR and text in err and "allow_shared_dir" in err, err
        assert len(err.strip().splitlines()) == 1, err
    assert os.listdir(foreign) == [] and not ckpt_shared.exists()
    assert out["allowed"][0] == ExitCode.FINISHED, out["allowed"][1][-2000:]
