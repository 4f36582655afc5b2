"""Damaged input: a truncated .json.gz in the middle and malformed lines are skipped the same way
every time, counted, logged with shard and line, and training/resume across them stays exact."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
import torch

from tests.data.conftest import data_config, sample_records, write_shard
from trainer.data.loader import build_train_loader
from trainer.data.prepare import prepare_if_needed
from trainer.data.shards import SkipCounts, read_documents
from trainer.data.tokenizer import encode_documents, load_tokenizer

BAD_LINES = {3: "{not json", 7: json.dumps({"url": "no text"}), 9: json.dumps(["a", "list"])}


@pytest.fixture
def damaged(tmp_path):
    records = sample_records()
    data = tmp_path / "data"
    for s in range(4):
        write_shard(
            data / f"c4-train.{s:05d}-of-01024.json.gz",
            records[s * 30 : (s + 1) * 30],
            extra_lines=BAD_LINES if s == 2 else None,
        )
    truncated = data / "c4-train.00001-of-01024.json.gz"
    raw = truncated.read_bytes()
    truncated.write_bytes(raw[: len(raw) * 6 // 10])
    write_shard(data / "c4-validation.00000-of-00008.json.gz", records[-10:])
    return data_config(data), tmp_path


def test_prepare_skips_counts_and_logs_the_damage(damaged, caplog):
    cfg, tmp = damaged
    with caplog.at_level(logging.WARNING, logger="trainer.data"):
        manifest = json.loads(prepare_if_needed(cfg, tmp / "run", workers=1).read_text())
    assert manifest["truncated_shards"] == ["c4-train.00001-of-01024.json.gz"]
    assert manifest["skipped_lines"] == len(BAD_LINES)
    per_shard = {s["name"]: s for s in manifest["shards"]}
    assert per_shard["c4-train.00002-of-01024.json.gz"]["documents"] == 30
    assert 0 < per_shard["c4-train.00001-of-01024.json.gz"]["documents"] < 30
    assert per_shard["c4-train.00002-of-01024.json.gz"]["skipped"]["c4-train.00002-of-01024.json.gz"][
        "malformed_lines"
    ] == len(BAD_LINES)
    logged = caplog.text
    assert "c4-train.00002-of-01024.json.gz: line 4:" in logged  # bad line 3 is the file's 4th line
    assert "c4-train.00001-of-01024.json.gz: gzip stream damaged after line" in logged


def test_the_skip_is_identical_on_every_prepare_and_matches_the_readable_documents(damaged):
    cfg, tmp = damaged
    first = json.loads(prepare_if_needed(cfg, tmp / "run1", workers=1).read_text())
    second = json.loads(prepare_if_needed(cfg, tmp / "run2", workers=1).read_text())
    assert first["fingerprint"] == second["fingerprint"]
    tokenizer, eos = load_tokenizer(cfg.tokenizer)
    for a, b in zip(first["shards"], second["shards"], strict=True):
        bin_a = np.fromfile(a["path"] + ".bin", dtype=a["dtype"])
        assert np.array_equal(bin_a, np.fromfile(b["path"] + ".bin", dtype=b["dtype"]))
        source = cfg.path / a["name"]
        expected = [t for ids in encode_documents(read_documents(source, SkipCounts()), tokenizer, eos) for t in ids]
        assert bin_a.tolist() == expected


def test_training_and_resume_across_the_damaged_shard_are_exact(damaged):
    cfg, tmp = damaged
    prepare_if_needed(cfg, tmp / "run", workers=1)

    def loader():
        return build_train_loader(
            cfg, run_dir=tmp / "run", seq_len=128, global_batch=16, micro_batch=4, dp_rank=0, dp_size=1, seed=5
        )

    steps = 40  # 640 samples: more than one epoch of ~430 windows, so every window is read
    straight = loader()
    reference = [torch.cat(straight.next_step()) for _ in range(steps)]
    resumed = loader()
    head = [torch.cat(resumed.next_step()) for _ in range(17)]
    state = resumed.state_dict()
    again = loader()
    again.load_state_dict(state)
    tail = [torch.cat(again.next_step()) for _ in range(steps - 17)]
    assert all(torch.equal(a, b) for a, b in zip(head + tail, reference, strict=True))
    assert len(straight.dataset) < steps * 16, "the test must cross an epoch boundary"
