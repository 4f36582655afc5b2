"""A rank's error exit keeps its verdict: the exit code the supervisor and the tests read."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from resilient.core.exit_codes import ExitCode

pytestmark = pytest.mark.timeout(120)

CHILD = textwrap.dedent(
    """
    import sys, threading, types
    import trainer.__main__ as entry

    # a process group whose teardown never returns (a peer that never answers)
    group = types.ModuleType("trainer.distributed")
    group.shutdown = lambda: threading.Event().wait()
    sys.modules["trainer.distributed"] = group
    entry.LEAVE_TIMEOUT_S = 0.5
    print("leaving", flush=True)
    sys.exit(entry._leave_group(int(sys.argv[1])))
    """
)


def test_an_error_exit_that_cannot_leave_its_group_still_exits_with_its_verdict():
    out = subprocess.run(
        [sys.executable, "-c", CHILD, str(int(ExitCode.CHECKPOINT_DAMAGED))], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == ExitCode.CHECKPOINT_DAMAGED, out.stderr
    assert out.stdout == "leaving\n" and "Traceback" not in out.stderr
