"""Existing Megatron-preprocessed data (.bin/.idx pairs) is used as is, without a tokenizer pass."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from resilient.core.errors import ConfigError
from trainer.data.loader import build_train_loader, build_validation_batches
from trainer.data.prepare import check_inputs, prepare_if_needed


def test_a_directory_of_bin_idx_pairs_trains_like_the_text_it_came_from(prepared, tmp_path):
    cfg, run_dir = prepared
    manifest = json.loads(prepare_if_needed(cfg, run_dir).read_text())
    megatron_dir = tmp_path / "megatron"
    megatron_dir.mkdir()
    for shard in manifest["shards"]:
        for suffix in (".bin", ".idx"):
            shutil.copy(shard["path"] + suffix, megatron_dir)
    mcfg = cfg.model_copy(update={"path": megatron_dir})
    mmanifest = json.loads(prepare_if_needed(mcfg, tmp_path / "run").read_text())
    assert (mmanifest["documents"], mmanifest["tokens"]) == (manifest["documents"], manifest["tokens"])

    def batches(c, rd):
        loader = build_train_loader(
            c, run_dir=rd, seq_len=16, global_batch=8, micro_batch=2, dp_rank=0, dp_size=1, seed=9
        )
        return [torch.cat(loader.next_step()) for _ in range(5)]

    assert all(torch.equal(a, b) for a, b in zip(batches(cfg, run_dir), batches(mcfg, tmp_path / "run"), strict=True))
    with pytest.raises(ConfigError, match="data.validation_path: .* Megatron"):
        build_validation_batches(mcfg, run_dir=tmp_path / "run", seq_len=16, micro_batch=2, dp_rank=0, dp_size=1)


def test_input_check_accepts_megatron_directories_and_rejects_empty_ones(prepared, tmp_path):
    cfg, run_dir = prepared
    check_inputs(cfg)
    shard = json.loads(prepare_if_needed(cfg, run_dir).read_text())["shards"][0]
    (tmp_path / "m").mkdir()
    for suffix in (".bin", ".idx"):
        shutil.copy(shard["path"] + suffix, tmp_path / "m")
    check_inputs(cfg.model_copy(update={"path": tmp_path / "m"}))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="no shards matching"):
        check_inputs(cfg.model_copy(update={"path": tmp_path / "empty"}))
