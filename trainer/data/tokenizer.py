"""Loading the HF `tokenizers` tokenizer and identifying it by content."""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Iterable, Iterator
from pathlib import Path

from tokenizers import Tokenizer

from resilient.core.errors import ConfigError

DEFAULT_EOS = "<|endoftext|>"
ENCODE_BATCH = 256  # documents per tokenizer call: amortises the Python<->Rust crossing


def load_tokenizer(path: str | Path, eos_token: str = DEFAULT_EOS) -> tuple[Tokenizer, int]:
    """The tokenizer in `path` and the id of its EOS token; ConfigError (one line) if unusable. Parsed once
    per process and file version: a rank's start asks for it several times (a 128k-vocabulary file takes
    most of a second to parse, and a restart pays it on the critical path)."""
    path = Path(path)
    try:
        st = path.stat()
    except FileNotFoundError:
        raise ConfigError(f"data.tokenizer: {path}: no such file") from None
    except OSError as err:
        raise ConfigError(f"data.tokenizer: {path}: unreadable ({type(err).__name__})") from None
    return _parse(path, st.st_dev, st.st_ino, st.st_mtime_ns, st.st_size, eos_token)


@functools.lru_cache(maxsize=4)
def _parse(path: Path, _dev: int, _ino: int, _mtime_ns: int, _size: int, eos_token: str) -> tuple[Tokenizer, int]:
    try:
        raw = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"data.tokenizer: {path}: no such file") from None
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"data.tokenizer: {path}: unreadable ({type(err).__name__})") from None
    if not raw.strip():
        raise ConfigError(f"data.tokenizer: {path}: file is empty")
    try:
        tokenizer = Tokenizer.from_str(raw)
    except Exception as err:  # the Rust side raises plain Exception on bad JSON/models
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise ConfigError(f"data.tokenizer: {path}: not a tokenizers file ({reason})") from None
    eos_id = tokenizer.token_to_id(eos_token)
    if eos_id is None:
        raise ConfigError(f"data.tokenizer: {path}: EOS token {eos_token!r} is not in the vocabulary")
    return tokenizer, eos_id


def tokenizer_digest(path: str | Path) -> str:
    """sha256 of the tokenizer file: part of every cache key, so a new tokenizer re-prepares."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def encode_documents(documents: Iterable[str], tokenizer: Tokenizer, eos_id: int) -> Iterator[list[int]]:
    """Token ids of each document with EOS appended, encoded in batches (parallel in the tokenizer)."""
    batch: list[str] = []
    for text in documents:
        batch.append(text)
        if len(batch) >= ENCODE_BATCH:
            yield from _encode_batch(batch, tokenizer, eos_id)
            batch = []
    if batch:
        yield from _encode_batch(batch, tokenizer, eos_id)


def _encode_batch(batch: list[str], tokenizer: Tokenizer, eos_id: int) -> Iterator[list[int]]:
    for enc in tokenizer.encode_batch_fast(batch, add_special_tokens=False):
        ids = enc.ids
        ids.append(eos_id)
        yield ids
