"""What a data location holds: shards, documents, bytes, damage, and tokens given a tokenizer."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from trainer.data.prepare import megatron_prefixes
from trainer.data.shards import SkipCounts, find_shards, is_shard, read_documents
from trainer.data.tokenizer import encode_documents, load_tokenizer


def _text_shard(path: Path, tokenizer, eos_id: int | None) -> dict:
    skips = SkipCounts()
    docs = text_bytes = 0
    tokens: int | None = None

    def texts():
        nonlocal docs, text_bytes
        for text in read_documents(path, skips):
            docs += 1
            text_bytes += len(text.encode("utf-8"))
            yield text

    if tokenizer is None:
        for _ in texts():
            pass
    else:
        tokens = sum(len(ids) for ids in encode_documents(texts(), tokenizer, eos_id))
    return {
        "name": path.name,
        "file_bytes": path.stat().st_size,
        "documents": docs,
        "text_bytes": text_bytes,
        "tokens": tokens,
        "malformed_lines": skips.malformed_lines,
        "truncated": skips.truncated,
    }


def _indexed_shard(prefix: Path) -> dict:
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    ds = IndexedDataset(str(prefix))
    return {
        "name": prefix.name,
        "file_bytes": prefix.with_name(prefix.name + ".bin").stat().st_size,
        "documents": int(len(ds.document_indices) - 1),
        "text_bytes": None,
        "tokens": int(ds.sequence_lengths.sum(dtype=np.int64)),
        "malformed_lines": 0,
        "truncated": False,
    }


def inspect_data(path: Path, tokenizer: Path | None = None, eos_token: str = "<|endoftext|>") -> dict:
    """Per-shard and total counts for a shard file, a directory or glob of shards, or a directory
    of Megatron .bin/.idx pairs. Tokens (EOS per document included) need a tokenizer for text."""
    prefixes = megatron_prefixes(path)
    if prefixes:
        shards = [_indexed_shard(p) for p in prefixes]
        kind = "megatron-indexed"
    else:
        tok, eos_id = load_tokenizer(tokenizer, eos_token) if tokenizer is not None else (None, None)
        files = [path] if is_shard(path) else find_shards(path, "*", what="inspect")
        shards = [_text_shard(f, tok, eos_id) for f in files]
        kind = "text"

    def total(key: str) -> int | None:
        values = [s[key] for s in shards]
        return None if any(v is None for v in values) else sum(values)

    return {
        "path": str(path),
        "kind": kind,
        "shards": len(shards),
        "documents": total("documents"),
        "file_bytes": total("file_bytes"),
        "text_bytes": total("text_bytes"),
        "tokens": total("tokens"),
        "malformed_lines": total("malformed_lines"),
        "truncated_shards": [s["name"] for s in shards if s["truncated"]],
        "per_shard": shards,
    }
