"""The command line stays light: read-only commands import neither torch nor megatron-core, and the
lazy command table agrees with what each component registers."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import typer
import typer.main

from resilient.cli import COMMANDS
from tests.report.fixtures import make_run
from tests.supervisor.harness import REPO

_PROBE = """
import json, runpy, sys
sys.argv = ["resilient", *sys.argv[1:]]
try:
    runpy.run_module("resilient.cli", run_name="__main__")
except SystemExit as ex:
    code = ex.code
heavy = sorted(m for m in ("torch", "megatron.core", "matplotlib") if m in sys.modules)
print("\\n" + json.dumps({"code": code, "heavy": heavy}))
"""


def _heavy_imports(*args: str) -> dict:
    done = subprocess.run(
        [sys.executable, "-c", _PROBE, *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        timeout=120,
    )
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_read_only_commands_import_neither_torch_nor_megatron(tmp_path):
    run_dir = make_run(tmp_path / "run")
    for args in (
        ["status", str(run_dir), "--json"],
        ["status", str(run_dir)],
        ["--help"],
        ["ckpt", "list", str(run_dir)],
        ["plan", "--help"],
        ["report", "--help"],
    ):
        got = _heavy_imports(*args)
        assert got["code"] in (0, None) and got["heavy"] == [], (args, got)


def test_command_table_matches_the_components():
    for module in sorted({m for m, _ in COMMANDS.values()}):
        sub = typer.Typer()
        __import__(module, fromlist=["register"]).register(sub)
        group = typer.main.get_group(sub)
        for name, cmd in group.commands.items():
            assert COMMANDS.get(name, (None,))[0] == module, f"{name} of {module} is missing from cli.COMMANDS"
            short = (cmd.help or "").strip().split("\n\n")[0].replace("\n", " ")
            assert " ".join(short.split()) == COMMANDS[name][1], name


def test_status_watch_refreshes_in_place_until_interrupted(tmp_path):
    import pty
    import select
    import signal
    import time

    run_dir = make_run(tmp_path / "run")
    master, slave = pty.openpty()
    proc = subprocess.Popen(
        [sys.executable, "-m", "resilient.cli", "status", str(run_dir), "--watch", "--interval", "0.2"],
        cwd=REPO,
        stdin=slave,
        stdout=slave,
        stderr=slave,
        env={**os.environ, "PYTHONPATH": str(REPO), "COLUMNS": "120"},
        # as from an interactive terminal: a suite started in the background inherits SIGINT ignored
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    os.close(slave)
    drawn = b""
    deadline = time.monotonic() + 60
    while drawn.count(b"goodput") < 3 and time.monotonic() < deadline:
        drawn += os.read(master, 65536)
    proc.send_signal(signal.SIGINT)
    # Keep reading: a watch blocked on a full pty could not act on the interrupt.
    deadline = time.monotonic() + 30
    while proc.poll() is None and time.monotonic() < deadline:
        if select.select([master], [], [], 0.1)[0]:
            try:
                drawn += os.read(master, 65536)
            except OSError:  # EIO: the other side closed
                break
    assert proc.wait(5) == 0
    os.close(master)
    assert drawn.count(b"goodput") >= 3 and b"\x1b[1A" in drawn  # cursor up: redrawn in place, not appended
