"""docs/architecture.md: every path its tables name exists (a moved module makes the map say so)."""

from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DOC = REPO / "docs" / "architecture.md"
_PATH = re.compile(
    r"`((?:resilient|trainer|health|bench|grafana|docs|tests|deploy|examples|scripts)/[^`\s]*|pyproject\.toml)`"
)


def test_every_path_in_the_map_exists():
    named = _PATH.findall(DOC.read_text())
    assert len(named) > 50
    missing = sorted({p for p in named if not (REPO / p).exists()})
    assert not missing, missing


def test_every_production_package_is_on_the_map():
    text = DOC.read_text()
    packages = {
        str(p.parent.relative_to(REPO))
        for root in ("resilient", "trainer", "health")
        for p in (REPO / root).rglob("__init__.py")
    }
    unmapped = sorted(p for p in packages if f"`{p}/" not in text)
    assert not unmapped, unmapped
