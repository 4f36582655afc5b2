"""Loading the HF `tokenizers` tokenizer and identifying it by content."""

from __future__ import annotations

import hashlib
from pathlib import Path

from tokenizers import Tokenizer

from resilient.errors import ConfigError

DEFAULT_EOS = "<|endoftext|>"


def load_tokenizer(path: str | Path, eos_token: str = DEFAULT_EOS) -> tuple[Tokenizer, int]:
    """The tokenizer in `path` and the id of its EOS token; ConfigError (one line) if unusable."""
    path = Path(path)
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
