"""The static gates: ruff (lint and format, pyproject.toml [tool.ruff]) over the whole tree and mypy (pyproject.toml
[tool.mypy]) over the core, the rank protocol and the decision modules. CI runs only pytest, so the gates
are tests. Neither may pass by checking nothing: ruff's configuration is shown to catch each selected rule
family, and mypy must report every file its configuration names."""

from __future__ import annotations

import importlib.util
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "pyproject.toml"


def _ruff(*args: str, cwd: Path = ROOT, command: str = "check") -> subprocess.CompletedProcess[str]:
    ruff = shutil.which("ruff")
    assert ruff is not None, "ruff is a test dependency (pip install -e .[test])"
    options = ["--output-format", "concise"] if command == "check" else []
    return subprocess.run(
        [ruff, command, "--no-cache", "--config", str(CONFIG), *options, *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_ruff_passes_on_the_tree():
    proc = _ruff(".")
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-2000:]
    assert "All checks passed!" in proc.stdout, proc.stdout[-2000:]


def test_the_tree_is_formatted():
    proc = _ruff("--check", ".", command="format")
    assert proc.returncode == 0, "run `ruff format .`:\n" + proc.stdout[-4000:] + proc.stderr[-2000:]
    assert re.search(r"\d+ files already formatted", proc.stdout), proc.stdout[-2000:]


def test_the_format_check_catches_unformatted_code(tmp_path):
    # the gate is not vacuous: the same configuration flags a file written in another style
    bad = tmp_path / "bad.py"
    bad.write_text("x = {  'a':1 }\n")
    proc = _ruff("--check", str(bad), cwd=tmp_path, command="format")
    assert proc.returncode == 1 and "1 file would be reformatted" in proc.stdout, proc.stdout + proc.stderr


def test_ruff_config_catches_each_selected_family(tmp_path):
    # One violation per selected rule family: a config that stopped selecting one would pass anything.
    bad = tmp_path / "bad.py"
    bad.write_text(
        "import sys\n"
        "import os\n"  # I001: unsorted
        "from typing import List\n"  # UP035 (deprecated import), used below for UP006
        "\n"
        "\n"
        "def f(x: List[int] = []) -> int:  \n"  # B006 (mutable default), UP006, W291 (trailing whitespace)
        f"    return len(x) + len({'y' * 130!r}) + len(sys.argv)\n"  # E501: too long; os unused (F401)
    )
    proc = _ruff(str(bad), cwd=tmp_path)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    found = set(re.findall(r": ([A-Z]+\d+) ", proc.stdout))
    assert {"E501", "F401", "W291", "I001", "B006", "UP006"} <= found, proc.stdout


def _mypy_files() -> list[Path]:
    files = tomllib.loads(CONFIG.read_text())["tool"]["mypy"]["files"]
    out: list[Path] = []
    for name in files:
        path = ROOT / name
        out += sorted(path.rglob("*.py")) if path.is_dir() else [path]
    return out


def test_mypy_passes_on_the_core_the_rank_protocol_and_the_decisions():
    assert importlib.util.find_spec("mypy") is not None, "mypy is a test dependency (pip install -e .[test])"
    checked = _mypy_files()
    assert ROOT / "resilient" / "supervisor" / "decisions.py" in checked and len(checked) > 20, checked
    # This interpreter's mypy, so that it sees the packages (pydantic, tenacity) this interpreter imports.
    proc = subprocess.run(
        [sys.executable, "-m", "mypy", "--config-file", str(CONFIG)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-2000:]
    assert f"Success: no issues found in {len(checked)} source files" in proc.stdout, proc.stdout[-2000:]
