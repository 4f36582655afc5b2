"""Run and checkpoint directories that another user owns or can write are refused with one line (exit
64) before anything is written, unless the operator overrides it explicitly."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from resilient.core.exit_codes import ExitCode
from tests.safety.conftest import NOBODY, as_nobody
from tests.supervisor.harness import REPO, write_config

pytestmark = pytest.mark.timeout(300)


def _run(cfg, run_dir, *extra):
    return subprocess.Popen(
        [sys.executable, "-m", "resilient.cli", "run", str(cfg), "--run-dir", str(run_dir), *extra],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


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
    for key, text in (
        ("world", "writable by other users (mode 0777)"),
        ("foreign", f"owned by uid {NOBODY}"),
        ("ckpt", "writable by other users"),
    ):
        code, err = out[key]
        assert code == ExitCode.CONFIG_ERROR and text in err and "allow_shared_dir" in err, err
        assert len(err.strip().splitlines()) == 1, err
    assert os.listdir(foreign) == [] and not ckpt_shared.exists()
    assert out["allowed"][0] == ExitCode.FINISHED, out["allowed"][1][-2000:]


def test_parents_another_user_controls_are_refused_before_anything_starts(tmp_path, shared):
    """The whole path counts: a run dir that does not exist yet under a parent the attacker made, or under
    a parent others can write (not sticky), a checkpoint dir under the attacker's parent, a memory dir the
    attacker made first: each refused with one line, nothing created. A sticky parent (as /tmp) is fine."""
    as_nobody("mkdir", "-m", "0755", str(shared / "evil"))
    as_nobody("mkdir", "-m", "0700", str(shared / "squat"))
    (shared / "open").mkdir()
    os.chmod(shared / "open", 0o777)

    def config(name, **checkpoint):
        path = write_config(tmp_path / f"{name}.yaml", steps=2)
        if checkpoint:
            extra = "".join(f"  {k}: {v}\n" for k, v in checkpoint.items())
            path.write_text(path.read_text() + "checkpoint:\n" + extra)
        return path

    procs = {
        "parent_owned": _run(config("a"), shared / "evil" / "run"),
        "parent_open": _run(config("b"), shared / "open" / "run"),
        "ckpt_parent": _run(config("c", dir=shared / "evil" / "ckpt"), tmp_path / "run_c"),
        "memory_dir": _run(config("d", memory_interval_steps=1, memory_dir=shared / "squat"), tmp_path / "run_d"),
        "sticky": _run(config("e"), shared / "run"),
    }
    out = {k: (p.wait(280), p.communicate()[1]) for k, p in procs.items()}
    for key, text in (
        ("parent_owned", f"{shared / 'evil'}, a parent directory, is owned by uid {NOBODY}"),
        ("parent_open", f"{shared / 'open'}, a parent directory, is writable by other users and not sticky"),
        ("ckpt_parent", f"{shared / 'evil'}, a parent directory, is owned by uid {NOBODY}"),
        ("memory_dir", f"{shared / 'squat'} is owned by uid {NOBODY}"),
    ):
        code, err = out[key]
        assert code == ExitCode.CONFIG_ERROR and text in err and "allow_shared_dir" in err, (key, err)
        assert len(err.strip().splitlines()) == 1, err
    assert all(os.listdir(shared / d) == [] for d in ("evil", "open", "squat"))
    assert not (tmp_path / "run_c").exists() and not (tmp_path / "run_d").exists()
    assert out["sticky"][0] == ExitCode.FINISHED, out["sticky"][1][-2000:]
