"""Bad data inputs end with one-line ConfigErrors (exit code 64 on the command line)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from resilient.core.errors import ConfigError
from resilient.core.exit_codes import ExitCode
from tests.data.conftest import REPO, TOKENIZER, data_config, sample_records, write_c4_dir, write_shard
from trainer.data.config import DataConfig
from trainer.data.loader import build_train_loader, build_validation_batches
from trainer.data.prepare import prepare_if_needed
from trainer.data.tokenizer import load_tokenizer


def _one_line_error(fn, match: str) -> str:
    with pytest.raises(ConfigError, match=match) as info:
        fn()
    assert "\n" not in str(info.value)
    return str(info.value)


def test_missing_empty_and_unmatched_data_directories(tmp_path):
    run = tmp_path / "run"
    _one_line_error(lambda: prepare_if_needed(data_config(tmp_path / "nope"), run), r"data.path: .*no such directory")
    (tmp_path / "empty").mkdir()
    _one_line_error(lambda: prepare_if_needed(data_config(tmp_path / "empty"), run), r"data.path: .*no shards matching")
    write_shard(tmp_path / "other" / "wiki.00000.json.gz", sample_records()[:2])
    _one_line_error(lambda: prepare_if_needed(data_config(tmp_path / "other"), run), r"no shards matching 'c4-train")
    _one_line_error(
        lambda: prepare_if_needed(data_config(tmp_path / "other" / "c4-*.json.gz"), run), r"no C4 shards match"
    )
    (tmp_path / "afile").write_text("x")
    _one_line_error(lambda: prepare_if_needed(data_config(tmp_path / "afile"), run), r"not a directory")


def test_shards_without_any_readable_document(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    (data / "c4-train.00000-of-01024.json").write_text('garbage\n{"no": "text"}\n')
    _one_line_error(lambda: prepare_if_needed(data_config(data), tmp_path / "run", workers=1), r"no readable documents")


@pytest.mark.parametrize(
    "content,match",
    [
        (None, "no such file"),
        (b"", "file is empty"),
        (b"  \n", "file is empty"),
        (b'{"not": "a tokenizer"}', "not a tokenizers file"),
        (b"\xff\xfe\x00", "unreadable"),
    ],
)
def test_unusable_tokenizer(tmp_path, content, match):
    path = tmp_path / "tokenizer.json"
    if content is not None:
        path.write_bytes(content)
    _one_line_error(lambda: load_tokenizer(path), f"data.tokenizer: .*{match}")
    cfg = DataConfig(path=write_c4_dir(tmp_path / "data", 1, 5), tokenizer=path)
    _one_line_error(lambda: prepare_if_needed(cfg, tmp_path / "run"), "data.tokenizer")


def test_tokenizer_without_the_eos_token(tmp_path):
    _one_line_error(lambda: load_tokenizer(TOKENIZER, "<eos>"), "EOS token '<eos>' is not in the vocabulary")


def test_loader_on_unprepared_data_and_resume_on_other_data(tmp_path, prepared):
    cfg = data_config(write_c4_dir(tmp_path / "data", 2, 10))
    kwargs = dict(seq_len=16, global_batch=4, micro_batch=2, dp_rank=0, dp_size=1, seed=1)
    _one_line_error(lambda: build_train_loader(cfg, run_dir=tmp_path / "run", **kwargs), "is not prepared")
    prepare_if_needed(cfg, tmp_path / "run", workers=1)
    other_cfg, other_run = prepared
    saved = build_train_loader(other_cfg, run_dir=other_run, **kwargs).state_dict()
    loader = build_train_loader(cfg, run_dir=tmp_path / "run", **kwargs)
    _one_line_error(lambda: loader.load_state_dict(saved), "the checkpoint was trained on data")
    _one_line_error(lambda: loader.load_state_dict({**loader.state_dict(), "seed": 2}), "seed 2")


def test_validation_smaller_than_one_round(tmp_path):
    cfg = data_config(write_c4_dir(tmp_path / "data", 1, 5), validation_docs=1)
    prepare_if_needed(cfg, tmp_path / "run", workers=1)
    _one_line_error(
        lambda: build_validation_batches(
            cfg, run_dir=tmp_path / "run", seq_len=128, micro_batch=8, dp_rank=0, dp_size=8
        ),
        "data.validation_docs: 1 documents",
    )


def test_cli_reports_bad_input_on_one_line_with_the_config_exit_code(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text(json.dumps({"run_dir": str(tmp_path / "run"), "data": {"path": str(tmp_path / "missing")}}))
    for args in (["data", "inspect", str(tmp_path / "missing")], ["data", "prepare", str(config)]):
        proc = subprocess.run(
            [sys.executable, "-W", "ignore", "-m", "resilient.cli", *args],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert proc.returncode == ExitCode.CONFIG_ERROR, proc.stderr
        errors = [line for line in proc.stderr.splitlines() if "error" in line]
        assert len(errors) == 1 and "no such directory" in errors[0], proc.stderr
