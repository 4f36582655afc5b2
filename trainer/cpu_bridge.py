"""The one place where megatron-core's CUDA-only calls are answered on a CPU-only machine (gloo).

Installed once per process by `install_cpu_bridge`, and only when `torch.cuda.is_available()` is
False; on a GPU nothing here runs. It covers what the trainer's megatron-core paths touch:

- a torch function mode, entered for the life of the process, that maps `device="cuda"` (or a
  CUDA index) on tensor factories to the default device (CPU, or meta in a meta-device build) and
  on `.to()` to the CPU, makes `Tensor.cuda()` a no-op, and
  answers `Tensor.type()` with the `torch.cuda.*Tensor` name megatron's optimizers check for;
- `torch.cuda` module calls used for placement and overlap: current_device, synchronize,
  streams and events (no-ops: on CPU every op is already ordered), empty_cache;
- the CUDA RNG tracker (`tensor_parallel.random`), replaced by a CPU-generator twin with the same
  interface, so tracker states stay part of the checkpointed RNG state.

For Megatron-LM's own loop (`megatron.training`, run by `python -m trainer.megatron_lm`),
`install_megatron_training_bridge` adds what that loop asks of CUDA beyond megatron-core.

Not covered: activation recomputation. megatron recomputes inside autograd functions, where torch
function modes are not active, so the trainer refuses `train.recompute_granularity` on CPU.
"""

from __future__ import annotations

import contextlib
import functools
import types

import torch
from megatron.core.tensor_parallel import random as mcore_random
from torch.overrides import TorchFunctionMode

_mode: CudaToCpu | None = None


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


def _is_cuda(device: object) -> bool:
    if isinstance(device, torch.device):
        return device.type == "cuda"
    if isinstance(device, str):
        return device.startswith("cuda")
    return isinstance(device, int) and not isinstance(device, bool)  # a bare index means a CUDA device


_CPU = torch.device("cpu")
_TYPE_NAMES = {
    "torch.FloatTensor",
    "torch.HalfTensor",
    "torch.BFloat16Tensor",
    "torch.DoubleTensor",
    "torch.IntTensor",
    "torch.LongTensor",
    "torch.ByteTensor",
    "torch.BoolTensor",
}


class CudaToCpu(TorchFunctionMode):
    """Rewrites CUDA placement to the CPU; everything else passes straight through."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.Tensor.type and len(args) == 1 and not kwargs:
            name = func(*args)
            return name.replace("torch.", "torch.cuda.", 1) if name in _TYPE_NAMES else name
        if func is torch.Tensor.cuda:
            return args[0]
        device = kwargs.get("device")
        # The default device is the CPU, or meta inside `with torch.device("meta")` (planning builds).
        if device is not None and _is_cuda(device):
            kwargs = {**kwargs, "device": torch.get_default_device()}
        elif func is torch.Tensor.to and len(args) > 1 and _is_cuda(args[1]):
            args = (args[0], _CPU, *args[2:])
        return func(*args, **kwargs)


class _NoStream:
    """Stands in for torch.cuda.Stream / Event: CPU ops are already ordered."""

    def __init__(self, *args, **kwargs) -> None:
        pass

    def wait_stream(self, *args) -> None:
        pass

    def wait_event(self, *args) -> None:
        pass

    def wait(self, *args, **kwargs) -> None:
        pass

    def record_event(self, *args) -> _NoStream:
        return _NoStream()

    def record(self, *args) -> None:
        pass

    def synchronize(self) -> None:
        pass

    def query(self) -> bool:
        return True


def install_cpu_bridge() -> None:
    """Make megatron-core's CUDA-only calls work on CPU; a no-op when CUDA is available or installed."""
    global _mode
    if _mode is not None or torch.cuda.is_available():
        return
    cuda = torch.cuda
    cuda.current_device = lambda: _CPU
    cuda.synchronize = lambda device=None: None
    cuda.empty_cache = lambda: None
    cuda.Stream = cuda.Event = _NoStream
    cuda.current_stream = cuda.default_stream = lambda device=None: _NoStream()
    cuda.stream = lambda stream=None: contextlib.nullcontext()
    mcore_random._CUDA_RNG_STATE_TRACKER = CpuRNGStatesTracker()
    mcore_random._CUDA_RNG_STATE_TRACKER_INITIALIZED = True
    _mode = CudaToCpu()
    _mode.__enter__()  # for the life of the rank process; never exited


def install_megatron_training_bridge() -> None:
    """On top of `install_cpu_bridge`, what `megatron.training` (Megatron-LM's loop) needs on a CPU-only machine:
    - `initialize_megatron(allow_no_cuda=True)`: pretrain passes nothing and would assert CUDA;
    - no JIT-fusion warm-up: it runs fused kernels on CUDA tensors to compile them (a GPU speed-up only);
    - one visible device (`device_count() == 1`, `set_device` a no-op, `current_device() == 0`, which the
      mode above maps to the CPU): megatron builds its model-parallel groups only when it sees a device,
      and Megatron-FSDP names its device `cuda:{current_device()}`;
    - device properties of a compute capability 9 device (argument validation asks, for Megatron-FSDP);
    - an empty CUDA RNG state (get/set): no CUDA generator exists; the CPU generator and the tracker
      states above are the ones that matter, and megatron saves and restores those too;
    - `Event.wait` (Megatron-FSDP waits on its gradient-reduce events).
    A no-op when CUDA is available."""
    if torch.cuda.is_available():
        return
    install_cpu_bridge()
    from megatron.training import training

    if not isinstance(training.initialize_megatron, functools.partial):
        training.initialize_megatron = functools.partial(training.initialize_megatron, allow_no_cuda=True)
    training.set_jit_fusion_options = lambda *args, **kwargs: None
    cuda = torch.cuda
    cuda.device_count = lambda: 1
    cuda.set_device = lambda device: None
    cuda.current_device = lambda: 0
    cuda.get_device_properties = lambda device=None: types.SimpleNamespace(
        name="cpu", major=9, minor=0, total_memory=1 << 34, multi_processor_count=1
    )
    cuda.get_rng_state = lambda device="cuda": torch.empty(0, dtype=torch.uint8)
    cuda.set_rng_state = lambda state, device="cuda": None
