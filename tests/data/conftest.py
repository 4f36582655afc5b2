"""Real C4-format shards (gzip JSON lines cut from the bundled sample) and data configs over them."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest

from trainer.data.config import DataConfig
from trainer.data.prepare import prepare_if_needed

REPO = Path(__file__).resolve().parents[2]
SAMPLE = REPO / "examples/data/c4-sample"
TOKENIZER = REPO / "examples/tokenizer.json"


def sample_records() -> list[dict]:
    """The bundled training documents, in file order."""
    records = []
    for shard in sorted(SAMPLE.glob("c4-train.*.json.gz")):
        with gzip.open(shard, "rt", encoding="utf-8") as fh:
            records.extend(json.loads(line) for line in fh)
    return records


def write_shard(path: Path, records: list[dict], extra_lines: dict[int, str] | None = None) -> Path:
    """A gzip JSON-lines shard; `extra_lines` inserts raw lines before the given record index."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with gzip.open(path, "wt", encoding="utf-8") as fh:
        for i, rec in enumerate(records):
            if extra_lines and i in extra_lines:
                fh.write(extra_lines[i] + "\n")
            fh.write(json.dumps(rec) + "\n")
    return path


def write_c4_dir(directory: Path, shards: int, docs_per_shard: int, validation_docs: int = 20) -> Path:
    """`shards` training shards and one validation shard in the allenai/c4 naming."""
    records = sample_records()
    for s in range(shards):
        write_shard(
            directory / f"c4-train.{s:05d}-of-01024.json.gz", records[s * docs_per_shard : (s + 1) * docs_per_shard]
        )
    write_shard(directory / "c4-validation.00000-of-00008.json.gz", records[-validation_docs:])
    return directory


def data_config(directory: Path, **fields) -> DataConfig:
    return DataConfig(path=directory, tokenizer=TOKENIZER, num_workers=0, **fields)


@pytest.fixture(scope="session")
def prepared(tmp_path_factory) -> tuple[DataConfig, Path]:
    """Four small shards, prepared once for the session: (config, run_dir)."""
    root = tmp_path_factory.mktemp("c4")
    cfg = data_config(write_c4_dir(root / "data", shards=4, docs_per_shard=40))
    run_dir = root / "run"
    prepare_if_needed(cfg, run_dir, workers=1)
    return cfg, run_dir
