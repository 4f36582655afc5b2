"""Bad command lines and bad inputs: click's usage message and exit 2, or one line and exit 64; never a
traceback. Every case is a real `resilient` process; they run concurrently to keep the suite fast."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from resilient.core.exit_codes import ExitCode
from tests.supervisor.harness import REPO, write_config

pytestmark = pytest.mark.timeout(300)

USAGE = 2


def _cases(tmp: Path) -> dict[str, tuple[list[str], int, str]]:
    """name -> (argv, expected exit code, text the one line must contain)."""
    cfg = write_config(tmp / "cfg.yaml", steps=3)
    (tmp / "latin1.yaml").write_bytes(b"run_dir: caf\xe9\n")
    (tmp / "a_file").write_text("not a directory")
    (tmp / "cfgdir").mkdir()
    for name, make in (("secret_dir", lambda p: p.mkdir(mode=0o700)), ("secret_link", lambda p: p.symlink_to(cfg))):
        (tmp / name).mkdir(mode=0o700)
        make(tmp / name / ".secret")
    return {
        "run_without_config": (["run"], USAGE, "Missing argument"),
        "run_unknown_option": (["run", str(cfg), "--bogus"], USAGE, "No such option"),
        "plan_gpus_not_int": (["plan", "examples/tiny.yaml", "--gpus", "abc"], USAGE, "Invalid value for '--gpus'"),
        "verify_step_not_int": (["ckpt", "verify", str(tmp), "--step", "abc"], USAGE, "Invalid value for '--step'"),
        "set_bad_yaml": (["run", str(cfg), "--set", "train.steps=[1"], ExitCode.CONFIG_ERROR, "train.steps=[1"),
        "config_is_a_directory": (["run", str(tmp / "cfgdir")], ExitCode.CONFIG_ERROR, "is a directory"),
        "config_not_utf8": (["run", str(tmp / "latin1.yaml")], ExitCode.CONFIG_ERROR, "not UTF-8"),
        "run_dir_is_a_file": (
            ["run", str(cfg), "--run-dir", str(tmp / "a_file")],
            ExitCode.CONFIG_ERROR,
            "not a directory",
        ),
        "plan_set_bad_key": (
            ["plan", "examples/tiny.yaml", "--set", "train.nope=1"],
            ExitCode.CONFIG_ERROR,
            "train.nope",
        ),
        "ckpt_list_missing_dir": (["ckpt", "list", str(tmp / "missing")], ExitCode.CONFIG_ERROR, "no such directory"),
        "textfile_dir_missing": (
            ["run", str(cfg), "--run-dir", str(tmp / "tf-run"), "--set", f"metrics.textfile_dir={tmp / 'no-such-dir'}"],
            ExitCode.CONFIG_ERROR,
            "metrics.textfile_dir",
        ),
        "secret_is_a_directory": (
            ["run", str(cfg), "--run-dir", str(tmp / "secret_dir")],
            ExitCode.CONFIG_ERROR,
            ".secret is not a regular file; refusing it as the run secret",
        ),
        "secret_is_a_link": (
            ["run", str(cfg), "--run-dir", str(tmp / "secret_link")],
            ExitCode.CONFIG_ERROR,
            ".secret is a symbolic link; refusing it as the run secret",
        ),
        "launch_denormal_bandwidth": (
            [
                "launch",
                str(cfg),
                "--run-dir",
                str(tmp / "launched"),
                "--dry-run",
                "--set",
                "slurm.storage_write_gbps_per_node=1e-320",
            ],
            ExitCode.CONFIG_ERROR,
            "makes the final checkpoint's write endless",
        ),
        "plan_overflowing_model": (
            ["plan", "examples/tiny.yaml", "--set", f"model.overrides.hidden_size={2**62}"],
            ExitCode.CONFIG_ERROR,
            "the plan's figures overflow",
        ),
    }


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cli")
    cases = _cases(tmp)
    procs = {
        name: subprocess.Popen(
            [sys.executable, "-m", "resilient.cli", *argv],
            cwd=REPO,
            text=True,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        for name, (argv, _, _) in cases.items()
    }
    out = {name: (p.wait(240), *p.communicate()) for name, p in procs.items()}
    return cases, out


@pytest.mark.parametrize(
    "name",
    [
        "run_without_config",
        "run_unknown_option",
        "plan_gpus_not_int",
        "verify_step_not_int",
        "set_bad_yaml",
        "config_is_a_directory",
        "config_not_utf8",
        "run_dir_is_a_file",
        "plan_set_bad_key",
        "ckpt_list_missing_dir",
        "textfile_dir_missing",
        "secret_is_a_directory",
        "secret_is_a_link",
        "launch_denormal_bandwidth",
        "plan_overflowing_model",
    ],
)
def test_bad_input_is_one_message_and_a_distinct_exit_code(results, name):
    cases, out = results
    argv, code, text = cases[name]
    rc, stdout, stderr = out[name]
    assert "Traceback" not in stderr, stderr
    assert rc == code, stderr
    assert text in stderr, stderr
    if code != USAGE:
        assert len(stderr.strip().splitlines()) == 1 and stderr.startswith("resilient: "), stderr
    if "--run-dir" in argv and name != "run_dir_is_a_file":
        run_dir = Path(argv[argv.index("--run-dir") + 1])
        if name.startswith("secret_"):  # the run dir was made to hold the bad secret: only the run lock added
            assert sorted(p.name for p in run_dir.iterdir()) == [".lock", ".secret"], "refused before anything else"
        else:
            assert not run_dir.exists(), "refused before touching the run dir"


def test_read_only_run_dir_is_one_line(tmp_path):
    mnt = tmp_path / "ro"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(mnt)]).returncode:
        pytest.fail("cannot mount a tmpfs here (the safety tests run as root)")
    try:
        cfg = write_config(tmp_path / "cfg.yaml", steps=3)
        p = subprocess.run(
            [sys.executable, "-m", "resilient.cli", "run", str(cfg), "--run-dir", str(mnt / "run")],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=240,
        )
    finally:
        subprocess.run(["umount", str(mnt)])
    assert p.returncode == ExitCode.CONFIG_ERROR and "Traceback" not in p.stderr, p.stderr
    assert p.stderr.count("\n") == 1 and "Read-only file system" in p.stderr, p.stderr


def test_health_check_without_config_creates_nothing(tmp_path):
    p = subprocess.run(
        [sys.executable, "-m", "resilient.cli", "health", "check", "--json"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=240,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert "Traceback" not in p.stderr, p.stderr
    assert list(tmp_path.iterdir()) == []
