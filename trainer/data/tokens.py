"""Random access to the concatenated token stream of a prepared data set (.bin files, memory-mapped)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from resilient.core.errors import ConfigError


class TokenStream:
    """The tokens of several .bin files read as one array, by global offset.

    Pickles as paths only: each DataLoader worker maps the files itself on first read.
    """

    def __init__(self, bins: list[Path], dtypes: list[str], tokens: list[int]) -> None:
        kept = [(b, d, t) for b, d, t in zip(bins, dtypes, tokens, strict=True) if t > 0]
        self.bins = [b for b, _, _ in kept]
        self.dtypes = [np.dtype(d) for _, d, _ in kept]
        self.bounds = np.cumsum([0] + [t for _, _, t in kept], dtype=np.int64)
        for path, dtype, n in zip(self.bins, self.dtypes, self.bounds[1:] - self.bounds[:-1], strict=True):
            size = path.stat().st_size if path.exists() else -1
            if size != int(n) * dtype.itemsize:
                raise ConfigError(
                    f"data: prepared file {path} is damaged or missing ({size} bytes, expected "
                    f"{int(n) * dtype.itemsize}); delete it and prepare again"
                )
        self._maps: list[np.memmap] | None = None

    @classmethod
    def from_manifest(cls, manifest: dict) -> TokenStream:
        shards = manifest["shards"]
        return cls(
            [Path(s["path"] + ".bin") for s in shards], [s["dtype"] for s in shards], [s["tokens"] for s in shards]
        )

    @classmethod
    def from_meta_file(cls, meta_path: Path) -> TokenStream:
        meta = json.loads(meta_path.read_text())
        return cls([meta_path.with_name(meta["prefix"] + ".bin")], [meta["dtype"]], [meta["tokens"]])

    @property
    def total(self) -> int:
        return int(self.bounds[-1])

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_maps": None}

    def read(self, start: int, count: int) -> np.ndarray:
        """Tokens [start, start+count) as int64, crossing file boundaries as needed."""
        if self._maps is None:
            self._maps = [np.memmap(b, dtype=d, mode="r") for b, d in zip(self.bins, self.dtypes, strict=True)]
        out = np.empty(count, dtype=np.int64)
        i = int(np.searchsorted(self.bounds, start, side="right")) - 1
        filled = 0
        while filled < count:
            lo = start + filled - int(self.bounds[i])
            take = min(count - filled, int(self.bounds[i + 1] - self.bounds[i]) - lo)
            out[filled : filled + take] = self._maps[i][lo : lo + take]
            filled += take
            i += 1
        return out
