"""The two megatron-core lines the project supports, as interpreters for tests that run them.

0.16.1 is the main environment's (the newest release for Python 3.11); the current line (0.19.x,
with `megatron.training`, Megatron-LM's own loop) lives in `.venv/mcore-current`, made by
`scripts/setup.sh --test`. A missing line fails the test that needs it: nothing is skipped.
"""

from __future__ import annotations

import functools
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
CURRENT_VENV = REPO / ".venv" / "mcore-current"
LINES = {"0.16": sys.executable, "0.19": str(CURRENT_VENV / "bin" / "python")}
"""Release line -> interpreter that has it installed."""


@functools.cache
def installed_version(python: str) -> str:
    """megatron-core's version in `python`'s environment (without importing megatron)."""
    if not Path(python).exists():
        pytest.fail(
            f"{python} is missing: run `bash scripts/setup.sh --test` (it installs the current "
            "megatron-core line next to 0.16.1)"
        )
    out = subprocess.run(
        [python, "-c", "import importlib.metadata as m; print(m.version('megatron-core'))"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


def python_for(line: str) -> str:
    """The interpreter of release `line` ("0.16", "0.19"), checked to have that release."""
    python = LINES[line]
    version = installed_version(python)
    assert version.startswith(line + "."), f"{python} has megatron-core {version}, expected {line}.x"
    return python


def current_python() -> str:
    """The interpreter with the current megatron-core line (and megatron.training)."""
    return python_for("0.19")
