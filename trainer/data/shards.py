"""Finding C4-format shards and reading their documents, skipping damaged input deterministically.

A shard is `*.json.gz`, `*.jsonl.gz`, `*.json` or `*.jsonl` with one `{"text", ...}` object per
line (the `allenai/c4` layout). Damage never stops a run: a line that is not a JSON object with a
string `text` is skipped; a truncated or corrupt gzip stream ends the shard at the last line that
was read whole. Both depend only on the file's bytes, so every reader skips the same lines.
"""

from __future__ import annotations

import glob
import gzip
import json
import logging
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from resilient.core.errors import ConfigError

log = logging.getLogger(__name__)

SHARD_SUFFIXES = (".json.gz", ".jsonl.gz", ".json", ".jsonl")
_LOGGED_SKIPS_PER_SHARD = 10  # a badly damaged shard is summarised, not logged line by line


def is_shard(path: Path) -> bool:
    return path.is_file() and path.name.endswith(SHARD_SUFFIXES)


def find_shards(location: Path, pattern: str, *, what: str) -> list[Path]:
    """Sorted shards: `location` is a directory (filtered by `pattern`) or itself a glob.

    ConfigError (one line, naming the config key `what`) when nothing usable is there.
    """
    text = str(location)
    if glob.has_magic(text):
        shards = sorted(p for p in map(Path, glob.glob(text)) if is_shard(p))
        if not shards:
            raise ConfigError(f"{what}: no C4 shards match {text}")
        return shards
    if not location.exists():
        raise ConfigError(f"{what}: {location}: no such directory")
    if not location.is_dir():
        raise ConfigError(f"{what}: {location}: not a directory")
    shards = sorted(p for p in location.glob(pattern) if is_shard(p))
    if not shards:
        raise ConfigError(f"{what}: {location}: no shards matching {pattern!r} ({', '.join(SHARD_SUFFIXES)})")
    return shards


@dataclass
class SkipCounts:
    """What was skipped while reading one shard (recorded in the prepared metadata)."""

    malformed_lines: int = 0
    truncated: bool = False
    examples: list[str] = field(default_factory=list)

    def note(self, shard: Path, where: str) -> None:
        message = f"{shard.name}: {where}"
        if len(self.examples) < _LOGGED_SKIPS_PER_SHARD:
            self.examples.append(message)
            log.warning("data: skipped %s", message)

    def as_dict(self) -> dict[str, object]:
        return {"malformed_lines": self.malformed_lines, "truncated": self.truncated, "examples": self.examples}


def _open(path: Path):
    return gzip.open(path, "rb") if path.name.endswith(".gz") else open(path, "rb")


def _text_of(line: bytes) -> str | None:
    try:
        record = json.loads(line)
    except ValueError:  # JSONDecodeError and UnicodeDecodeError
        return None
    text = record.get("text") if isinstance(record, dict) else None
    return text if isinstance(text, str) else None


def read_documents(path: Path, skips: SkipCounts, limit: int | None = None) -> Iterator[str]:
    """The `text` of each good record in order; damaged input is counted in `skips` and logged."""
    lineno = 0
    produced = 0
    try:
        with _open(path) as fh:
            for lineno, line in enumerate(fh, start=1):  # noqa: B007 (lineno used after the loop)
                if not line.strip():
                    continue
                text = _text_of(line)
                if text is None:
                    skips.malformed_lines += 1
                    skips.note(path, f"line {lineno}: not a JSON object with a string 'text'")
                    continue
                yield text
                produced += 1
                if limit is not None and produced >= limit:
                    return
    except (EOFError, gzip.BadGzipFile, zlib.error) as err:
        skips.truncated = True
        skips.note(path, f"gzip stream damaged after line {lineno} ({type(err).__name__}); rest of shard skipped")
    except OSError as err:
        raise ConfigError(f"data: {path}: unreadable ({err.strerror or type(err).__name__})") from None
