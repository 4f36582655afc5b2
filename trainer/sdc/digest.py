"""A digest of a rank's model parameters, computed where they live (no host copy of the weights).

Each parameter's raw bits are summed as 64-bit integers on its device (wrapping: exact and independent
of the reduction order, so equal bits give equal sums on every replica); one small vector of sums per
rank crosses to the host, where xxh3 folds it with the parameters' order. A single flipped bit changes
its parameter's sum by +-2^k, never 0 mod 2^64: every single-bit flip is caught. Reading the bits
consumes no random numbers and changes no value, so a run with checks ends on the same bits as one
without.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import xxhash

_SIGNED = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def bit_sum(tensor: torch.Tensor) -> torch.Tensor:
    """The sum of the tensor's elements read as signed integers of their width, in int64 (0-dim, on its device)."""
    flat = tensor.detach().reshape(-1)
    if flat.numel() * flat.element_size() % 8 == 0:
        try:
            return flat.view(torch.int64).sum()  # 8 bytes at a time: no cast, one pass over memory
        except RuntimeError:  # a view into a buffer at an offset that is not 8-byte aligned
            pass
    return flat.view(_SIGNED[flat.element_size()]).to(torch.int64).sum()


def parameter_sums(chunks: Sequence[torch.nn.Module]) -> torch.Tensor:
    """One bit sum per parameter of `chunks`, in the modules' order, as an int64 vector on the host."""
    sums = [bit_sum(p) for chunk in chunks for p in chunk.parameters()]
    return torch.stack(sums).cpu() if sums else torch.zeros(0, dtype=torch.int64)


def fold(sums: torch.Tensor) -> int:
    """One signed 64-bit digest of a vector of sums (order-sensitive)."""
    value = xxhash.xxh3_64_intdigest(sums.contiguous().numpy().tobytes())
    return value - (1 << 64) if value >= 1 << 63 else value


def parameter_names(chunks: Sequence[torch.nn.Module]) -> list[str]:
    """Names matching `parameter_sums` entry by entry (the chunk index first)."""
    return [f"{i}.{name}" for i, chunk in enumerate(chunks) for name, _ in chunk.named_parameters()]
