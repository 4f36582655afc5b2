"""Progress bars show on a terminal and stay out of pipes and logs."""

from __future__ import annotations

import os
import pty
import subprocess
import sys

from tests.supervisor.harness import REPO

_SCRIPT = (
    "import time; from resilient.core.progress import track\n"
    "for _ in track(range(4), 'verifying step_0000010', total=4000, weight=lambda i: 1000): time.sleep(0.3)\n"
    "print('done')"
)


def _run(stderr) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", _SCRIPT],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=stderr,
        env={**os.environ, "PYTHONPATH": str(REPO), "COLUMNS": "100"},
        timeout=60,
    )


def test_bar_on_a_terminal_only():
    master, slave = pty.openpty()
    try:
        done = _run(slave)
        os.close(slave)
        drawn = b""
        while True:
            try:
                chunk = os.read(master, 65536)
            except OSError:  # EIO: the writer side is closed
                break
            if not chunk:
                break
            drawn += chunk
    finally:
        os.close(master)
    assert done.stdout == b"done\n" and b"verifying step_0000010" in drawn and b"%" in drawn
    piped = _run(subprocess.PIPE)
    assert piped.stdout == b"done\n" and piped.stderr == b""
