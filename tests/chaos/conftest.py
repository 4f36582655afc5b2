from __future__ import annotations

import os

import pytest

from tests.chaos.drills import drill, why_failed


@pytest.fixture(autouse=True, scope="package")
def _one_thread():
    # the reference and every drill must run the same intra-op thread count: CPU float sums depend on it
    old = os.environ.get("OMP_NUM_THREADS")
    os.environ["OMP_NUM_THREADS"] = "1"
    yield
    if old is None:
        os.environ.pop("OMP_NUM_THREADS")
    else:
        os.environ["OMP_NUM_THREADS"] = old


@pytest.fixture(scope="package")
def reference(tmp_path_factory, _one_thread) -> str:
    """Digest of the fault-free run of the drills' config."""
    report = drill(tmp_path_factory.mktemp("chaos-ref") / "run", "none", [])
    assert report["passed"] and report["digest"], why_failed(report)
    return report["digest"]
