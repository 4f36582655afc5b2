"""`resilient data prepare` killed mid-way leaves no cache that is trusted; the next prepare keeps
the finished shards and ends with exactly the cache a clean prepare builds. `data inspect` agrees."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np

from tests.data.conftest import REPO, TOKENIZER, data_config, sample_records, write_shard
from trainer.data.prepare import prepare_if_needed

SHARDS, DOCS = 4, 480


def _cli(*args: str, **kwargs) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-W", "ignore", "-m", "resilient.cli", "data", *args],
        cwd=REPO,
        start_new_session=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        **kwargs,
    )


def test_prepare_killed_midway_resumes_per_shard_and_matches_a_clean_prepare(tmp_path):
    records = sample_records()
    data = tmp_path / "data"
    for s in range(SHARDS):
        write_shard(data / f"c4-train.{s:05d}-of-01024.json.gz", (records[s * 100 :] + records[: s * 100])[:DOCS])
    write_shard(data / "c4-validation.00000-of-00008.json.gz", records[-10:])
    run_dir = tmp_path / "run"
    config = tmp_path / "run.yaml"
    config.write_text(json.dumps({"run_dir": str(run_dir), "data": {"path": str(data), "tokenizer": str(TOKENIZER)}}))

    proc = _cli("prepare", str(config), "--workers", "1")
    shards_dir = run_dir / "data_cache" / "shards"
    deadline = time.monotonic() + 120
    while not list(shards_dir.glob("*.json")):
        assert proc.poll() is None, proc.stderr.read()[-2000:]
        assert time.monotonic() < deadline
        time.sleep(0.005)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()

    cache = run_dir / "data_cache"
    assert not list(cache.glob("train.*.json")), "a killed prepare must not leave a manifest"
    finished = {p: p.stat().st_mtime_ns for p in shards_dir.glob("*.json")}
    assert 1 <= len(finished) < SHARDS

    done = _cli("prepare", str(config), "--json")
    out, err = done.communicate(timeout=300)
    assert done.returncode == 0, err[-2000:]
    summary = json.loads(out)
    assert {p: p.stat().st_mtime_ns for p in finished} == finished, "finished shards were tokenized again"
    assert not [p for p in cache.rglob(".*") if p.name != ".lock"], "temporary files left behind"

    clean = json.loads(prepare_if_needed(data_config(data), tmp_path / "clean", workers=1).read_text())
    resumed = json.loads(open(summary["manifest"]).read())
    assert resumed["fingerprint"] == clean["fingerprint"] == summary["fingerprint"]
    assert resumed["tokens"] == clean["tokens"] and resumed["documents"] == clean["documents"] == SHARDS * DOCS
    for a, b in zip(resumed["shards"], clean["shards"], strict=True):
        assert np.array_equal(np.fromfile(a["path"] + ".bin", a["dtype"]), np.fromfile(b["path"] + ".bin", b["dtype"]))
        assert open(a["path"] + ".idx", "rb").read() == open(b["path"] + ".idx", "rb").read()
    assert oct(cache.stat().st_mode & 0o777) == "0o700"

    inspect = _cli("inspect", str(data), "--json", "--tokenizer", str(TOKENIZER))
    out, err = inspect.communicate(timeout=300)
    report = json.loads(out)
    train = [s for s in report["per_shard"] if s["name"].startswith("c4-train")]
    assert sum(s["tokens"] for s in train) == clean["tokens"]
    assert sum(s["documents"] for s in train) == clean["documents"]
    assert report["shards"] == SHARDS + 1 and report["malformed_lines"] == 0
