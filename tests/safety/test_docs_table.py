"""docs/operations.md's table of bad inputs and faults: at least 30 rows, each naming a test that exists."""

from __future__ import annotations

import ast
import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def _rows() -> list[list[str]]:
    text = (REPO / "docs" / "operations.md").read_text()
    section = text.split("## Bad inputs and faults", 1)[1].split("\n## ", 1)[0]
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in section.splitlines() if line.startswith("| ")]
    return rows[1:]  # header


def test_every_row_names_an_existing_test():
    rows = _rows()
    assert len(rows) >= 30
    for case, seen, code, test in rows:
        path, _, name = test.partition("::")
        module = REPO / "tests" / path
        assert module.is_file(), test
        functions = {n.name for n in ast.walk(ast.parse(module.read_text())) if isinstance(n, ast.FunctionDef)}
        param = re.search(r"\[(.*)\]$", name)
        name = re.sub(r"\[.*\]$", "", name)
        if name.startswith("…"):  # a case of the file's parametrized test, by its id
            assert param and f'"{param.group(1)}"' in module.read_text(), test
            continue
        assert name in functions, f"{case}: {test}"
        assert seen and code, case
