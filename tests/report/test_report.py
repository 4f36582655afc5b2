"""`resilient report` renders a self-contained page that a real headless Chromium draws."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys

import pytest

from tests.report.fixtures import make_run
from tests.supervisor.harness import REPO

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def _report(run_dir, out):
    return subprocess.run(
        [sys.executable, "-m", "resilient.cli", "report", str(run_dir), "--out", str(out)],
        cwd=REPO,
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )


def test_report_is_self_contained_and_links_incidents(tmp_path):
    run_dir = make_run(tmp_path / "run")
    out = tmp_path / "out" / "report.html"
    out.parent.mkdir()
    done = _report(run_dir, out)
    assert done.returncode == 0, done.stderr
    page = out.read_text()
    assert len(re.findall(r'src="data:image/png;base64,', page)) == 5  # every figure drawn, inlined
    assert not re.search(r'(src|href)="(https?:)?//', page)  # nothing fetched from elsewhere
    assert 'href="../run/incidents/0-hang/summary.txt"' in page
    assert 'href="../run/incidents/1-sdc/summary.txt"' in page


def test_silent_data_corruption_is_marked_on_the_timeline(tmp_path):
    from resilient.report.data import load, timeline_marks

    marks = timeline_marks(load(make_run(tmp_path / "run")).ledger)
    assert len(marks["silent data corruption"]) == 2  # suspected, then confirmed
    assert len(marks["faults"]) == 1 and len(marks["checkpoints"]) == 8


def test_bad_run_dir_is_one_line_and_distinct_exit(tmp_path):
    done = _report(tmp_path / "nope", tmp_path / "r.html")
    assert done.returncode not in (0, 1) and done.stderr.count("\n") == 1 and "no such run directory" in done.stderr


def test_report_renders_in_headless_chromium(tmp_path):
    if CHROMIUM is None:
        pytest.fail("chromium is not installed: run scripts/setup.sh --test", pytrace=False)
    from PIL import Image, ImageStat

    run_dir = make_run(tmp_path / "run", ranks=24)  # > 16 ranks: the heat map
    out = tmp_path / "report.html"
    assert _report(run_dir, out).returncode == 0
    shot = tmp_path / "shot.png"
    subprocess.run(
        [
            CHROMIUM,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--no-first-run",
            f"--user-data-dir={tmp_path / 'profile'}",
            f"--screenshot={shot}",
            "--window-size=1200,3000",
            out.as_uri(),
        ],
        check=True,
        capture_output=True,
        timeout=120,
    )
    img = Image.open(shot).convert("RGB")
    assert img.size == (1200, 3000)
    assert max(ImageStat.Stat(img).stddev) > 20  # not blank
    colours = img.resize((300, 750)).getcolors(maxcolors=1 << 16) or []
    assert len([c for c in colours if c[0] >= 20]) >= 8  # curves, bars and text in several colours


def test_supervisor_samples_each_ranks_mean_step_time(tmp_path):
    from resilient.report.rank_steps import RankStepLog, read

    log = RankStepLog(tmp_path, node=1, interval_s=10.0)
    for now, step, times in ((0.0, 1, (1.0, 2.0)), (5.0, 2, (3.0, 2.0)), (9.0, 3, (2.0, 5.0))):
        for rank, t in zip((4, 5), times, strict=True):
            log.observe({"rank": rank, "step": step, "phase": "step", "step_time": t, "attempt": 2}, now=now)
    assert list(read(tmp_path)) == []  # within the first interval: nothing written yet
    log.observe({"rank": 4, "step": 3, "phase": "checkpoint", "attempt": 2}, now=10.5)  # no step time
    [line] = read(tmp_path)
    assert line["ranks"] == {"4": {"step": 3, "step_time": 2.0}, "5": {"step": 3, "step_time": 3.0}}
    assert (line["node"], line["attempt"]) == (1, 2)
    log.observe({"rank": 5, "step": 4, "phase": "step", "step_time": 4.0, "attempt": 2}, now=11.0)
    log.observe({"rank": 5, "step": 4, "phase": "done", "attempt": 2}, now=11.5)  # the run ended: flush
    assert list(read(tmp_path))[-1]["ranks"] == {"5": {"step": 4, "step_time": 4.0}}


def test_values_from_the_run_are_escaped_and_labels_are_text(tmp_path):
    """Every value the page shows comes from the run's files: markup stays text, and an attempt label that
    reads as matplotlib mathtext is drawn as text, not parsed (a parse error ended the report before)."""
    import json

    from resilient.core.ledger import append_jsonl

    run_dir = make_run(tmp_path / "run")
    status = json.loads((run_dir / "status.json").read_text())
    (run_dir / "status.json").write_text(json.dumps({**status, "step": "<script>alert(1)</script>"}))
    append_jsonl(
        run_dir / "train_log.jsonl",
        {
            "ts": 1_790_000_900.0,
            "attempt": "$\\undefined{$",
            "step": 141,
            "loss": 2.5,
            "step_time": 2.0,
            "tokens_per_s": 4000,
            "mfu": 0.4,
        },
    )
    append_jsonl(
        run_dir / "ledger.jsonl",
        {
            "ts": 1_790_000_901.0,
            "event": "failure",
            "kind": "rank_exit",
            "rank": 0,
            "reason": "<img src=x onerror=alert(2)>",
        },
    )
    out = tmp_path / "report.html"
    done = _report(run_dir, out)
    assert done.returncode == 0 and "Traceback" not in done.stderr, done.stderr[-2000:]
    page = out.read_text()
    assert "<script>alert" not in page and "<img src=x" not in page
    assert "step &lt;script&gt;alert(1)&lt;/script&gt;" in page and "&lt;img src=x onerror=alert(2)&gt;" in page
    assert len(re.findall(r'src="data:image/png;base64,', page)) == 5
