"""Bridge for megatron-core's CUDA-only calls when a rank runs on CPU (gloo).

Installed only when no GPU is present. It covers exactly what the trainer's megatron-core
paths touch: `torch.cuda.current_device` (rotary embeddings, checkpoint collectives),
`torch.cuda.synchronize` (async checkpoint preload) and the CUDA RNG tracker
(`tensor_parallel.random`), which gets a CPU-generator twin with the same interface so
tracker states stay part of the checkpointed RNG state.
"""

from __future__ import annotations

import contextlib

import torch
from megatron.core.tensor_parallel import random as mcore_random

_installed = False


class CpuRNGStatesTracker(mcore_random.CudaRNGStatesTracker):
    """Megatron's named RNG streams, kept as CPU generator states."""

    def add(self, name: str, seed: int) -> None:
        if seed in self.seeds_:
            raise RuntimeError(f"seed {seed} already exists")
        if name in self.states_:
            raise RuntimeError(f"rng state {name} already exists")
        self._is_initialized = True
        self.seeds_.add(seed)
        self.states_[name] = torch.Generator().manual_seed(seed).get_state()

    @contextlib.contextmanager
    def fork(self, name: str = mcore_random._MODEL_PARALLEL_RNG_TRACKER_NAME):
        if name not in self.states_:
            raise RuntimeError(f"rng state {name} is not added")
        outer = torch.get_rng_state()
        torch.set_rng_state(self.states_[name])
        try:
            yield
        finally:
            self.states_[name] = torch.get_rng_state()
            torch.set_rng_state(outer)


def install_cpu_bridge() -> None:
    """Make megatron-core's CUDA-only calls work on CPU; a no-op when CUDA is available."""
    global _installed
    if _installed or torch.cuda.is_available():
        return
    torch.cuda.current_device = lambda: torch.device("cpu")
    torch.cuda.synchronize = lambda device=None: None
    mcore_random._CUDA_RNG_STATE_TRACKER = CpuRNGStatesTracker()
    mcore_random._CUDA_RNG_STATE_TRACKER_INITIALIZED = True
    _installed = True
