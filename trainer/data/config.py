"""Data configuration (owned by the data package)."""

from pathlib import Path

from resilient.configbase import Section


class DataConfig(Section):
    """Where the training text comes from and how it is tokenized."""

    path: Path = Path("examples/data/c4-sample")
    """Directory (or glob) of C4-format shards: *.json.gz / *.json / *.jsonl, one {text,timestamp,url} per line."""
    tokenizer: Path = Path("examples/tokenizer.json")
    """HF `tokenizers` tokenizer.json file."""
