"""Build the bundled demo data: a small C4-format sample and a 2048-token byte-level BPE tokenizer.

The text is the Python documentation that ships with the interpreter (PSF license): the
reference topics in `pydoc_data.topics` and the docstrings of the pure-Python standard library,
read with `ast` (nothing is imported or executed). Paragraphs are grouped into documents of
C4-like size and written as `{"text", "timestamp", "url"}` JSON lines in the `allenai/c4` file
layout. Everything is deterministic for a given Python version: sorted inputs, a fixed split
rule, gzip without a timestamp, single-threaded tokenizer training.

    python scripts/make_tiny_assets.py            # writes examples/data/c4-sample, examples/tokenizer.json
"""

from __future__ import annotations

import argparse
import ast
import gzip
import hashlib
import json
import os
import sys
import sysconfig
from collections.abc import Iterator
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
VOCAB_SIZE = 2048  # the tiny preset's vocabulary
EOS = "<|endoftext|>"
DOC_CHARS = 1800  # C4 documents average about 2 KB of text
VALIDATION_EVERY = 20  # every 20th document goes to the validation split
TRAIN_SHARDS = 2
# Directories of the stdlib that hold tests, demos or vendored code rather than documentation.
SKIP_DIRS = {"site-packages", "test", "tests", "idlelib", "lib2to3", "turtledemo", "ensurepip", "__phello__"}


def _paragraphs(text: str) -> list[str]:
    return [p.strip() for p in text.replace("\r\n", "\n").split("\n\n") if p.strip()]


def _group(paragraphs: list[str]) -> Iterator[str]:
    """Greedily join paragraphs into documents of about DOC_CHARS characters."""
    current: list[str] = []
    size = 0
    for para in paragraphs:
        current.append(para)
        size += len(para)
        if size >= DOC_CHARS:
            yield "\n\n".join(current)
            current, size = [], 0
    if current and size >= 200:
        yield "\n\n".join(current)


def topic_documents() -> Iterator[tuple[str, str]]:
    """(url, text) from the language reference topics bundled for `help()`."""
    from pydoc_data.topics import topics

    for name in sorted(topics):
        for i, text in enumerate(_group(_paragraphs(topics[name]))):
            yield f"https://docs.python.org/3/reference/topics.html#{name}-{i}", text


def docstring_documents() -> Iterator[tuple[str, str]]:
    """(url, text) from module, class and function docstrings of the stdlib sources."""
    root = Path(sysconfig.get_paths()["stdlib"])
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root)
        if SKIP_DIRS.intersection(rel.parts):
            continue
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError):
            continue
        module = ".".join(rel.with_suffix("").parts).removesuffix(".__init__")
        docs = [
            ast.get_docstring(node)
            for node in ast.walk(tree)
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
        ]
        paragraphs = [p for d in docs if d and len(d) >= 200 for p in _paragraphs(d)]
        for i, text in enumerate(_group(paragraphs)):
            yield f"https://docs.python.org/3/library/{module}.html#doc-{i}", text


def _timestamp(url: str) -> str:
    """A fixed, C4-style timestamp derived from the URL (the sample has no crawl date)."""
    h = int(hashlib.sha256(url.encode()).hexdigest()[:8], 16)
    return f"2019-04-{18 + h % 10:02d}T{h % 24:02d}:{h // 24 % 60:02d}:{h // 1440 % 60:02d}Z"


def _write_shard(path: Path, records: list[dict[str, str]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    with open(tmp, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0, filename="") as gz:
        for rec in records:
            gz.write((json.dumps(rec, ensure_ascii=False) + "\n").encode("utf-8"))
    os.replace(tmp, path)


def train_tokenizer(texts: list[str], out: Path) -> None:
    """Byte-level BPE with VOCAB_SIZE entries, EOS as the only special token (id 0)."""
    os.environ["RAYON_NUM_THREADS"] = "1"  # deterministic merges, independent of the core count
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=[EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        min_frequency=2,
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    if tok.get_vocab_size() != VOCAB_SIZE:
        raise SystemExit(f"tokenizer has {tok.get_vocab_size()} entries, expected {VOCAB_SIZE}")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    tmp.write_text(tok.to_str(pretty=True) + "\n", encoding="utf-8")
    os.replace(tmp, out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", type=Path, default=REPO / "examples/data/c4-sample")
    parser.add_argument("--tokenizer", type=Path, default=REPO / "examples/tokenizer.json")
    args = parser.parse_args(argv)

    train: list[list[dict[str, str]]] = [[] for _ in range(TRAIN_SHARDS)]
    validation: list[dict[str, str]] = []
    documents = [*topic_documents(), *docstring_documents()]
    for i, (url, text) in enumerate(documents):
        record = {"text": text, "timestamp": _timestamp(url), "url": url}
        if i % VALIDATION_EVERY == VALIDATION_EVERY - 1:
            validation.append(record)
        else:
            train[i % TRAIN_SHARDS].append(record)

    for shard, records in enumerate(train):
        _write_shard(args.data_dir / f"c4-train.{shard:05d}-of-01024.json.gz", records)
    _write_shard(args.data_dir / "c4-validation.00000-of-00008.json.gz", validation)
    train_tokenizer([r["text"] for shard in train for r in shard], args.tokenizer)

    n_train = sum(len(s) for s in train)
    print(
        f"{n_train} train + {len(validation)} validation documents -> {args.data_dir}; "
        f"tokenizer ({VOCAB_SIZE} tokens) -> {args.tokenizer}",
        file=sys.stderr,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
