"""Data configuration (owned by the data package)."""

from pathlib import Path

from pydantic import Field

from resilient.core.configbase import Section


class DataConfig(Section):
    """Where the training text comes from, how it is tokenized, prepared and loaded."""

    path: Path = Path("examples/data/c4-sample")
    """Directory (or glob) of C4-format shards: *.json.gz / *.json / *.jsonl, one {text,timestamp,url} per line.
    A directory holding Megatron-preprocessed .bin/.idx pairs (and no text shards) is used as is."""
    tokenizer: Path = Path("examples/tokenizer.json")
    """HF `tokenizers` tokenizer.json file."""
    eos_token: str = "<|endoftext|>"
    """Token appended to every document; must be in the tokenizer's vocabulary."""
    train_glob: str = "c4-train.*"
    """Pattern selecting the training shards inside `path` when `path` is a directory."""
    validation_path: Path | None = None
    """Directory (or glob) of validation shards (None: the directory of `path`, with `validation_glob`)."""
    validation_glob: str = "c4-validation.*"
    """Pattern selecting the validation shards inside the validation directory."""
    validation_docs: int = Field(1000, ge=1)
    """Evaluate on the first K validation documents (in shard order, unshuffled)."""
    cache_dir: Path | None = None
    """Where pre-tokenized shards (.bin/.idx) are kept (None: RUN_DIR/data_cache). Share it between runs."""
    prepare_workers: int = Field(0, ge=0)
    """Processes tokenizing shards in parallel during prepare (0: one per CPU core, at most one per shard,
    in-process for small inputs)."""
    num_workers: int = Field(2, ge=0)
    """DataLoader worker processes per rank reading windows (0: read in the training process)."""
    prefetch_factor: int = Field(4, ge=1)
    """Micro-batches each DataLoader worker keeps ready ahead of the training loop."""
    worker_timeout_s: float = Field(60.0, gt=0)
    """Seconds the training loop waits for its workers' next micro-batch before it replaces them (once per
    step; a worker that hangs at its start is replaced in-process instead of costing a restart). Keep it
    under `supervisor.step_timeout_initial_s`."""
