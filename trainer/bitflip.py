"""Applying a `bitflip` fault (trainer/injection.py) to a rank's model.

`bit` defaults to the highest mantissa bit (a weight or gradient off by up to half its value) for weights
and gradients, and the highest exponent bit for an activation (a huge value); `parameter` (a substring of
the parameter's name) and `index` (the element) default to the largest decoder parameter and its middle.
With bf16 parameters a flipped weight lasts until the optimizer copies its fp32 main parameters over it.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from typing import Any

import torch

from trainer.injection import BitFlip, Target
from trainer.model import unwrap

log = logging.getLogger(__name__)

_MANTISSA_BITS = {torch.float32: 23, torch.bfloat16: 7, torch.float16: 10, torch.float64: 52}
_INT_VIEW = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def flip_bit(tensor: torch.Tensor, index: int, bit: int) -> tuple[float, float]:
    """Flip bit `bit` of element `index` of a contiguous tensor in place; returns (before, after)."""
    flat = tensor.detach().view(-1)
    before = float(flat[index])
    ints = flat.view(_INT_VIEW[flat.element_size()])
    width = 8 * flat.element_size()
    mask = torch.tensor(1 << bit if bit < width - 1 else -(1 << bit), dtype=ints.dtype, device=ints.device)
    ints[index] = torch.bitwise_xor(ints[index], mask)
    return before, float(flat[index])


def default_bit(dtype: torch.dtype, target: Target) -> int:
    """The highest mantissa bit (weights, gradients) or the highest exponent bit (an activation)."""
    mantissa = _MANTISSA_BITS[dtype]
    return mantissa - 1 if target != "activation" else torch.finfo(dtype).bits - 2


class BitFlipper:
    """Applies a rank's armed bit flip to its model: weights at once, gradients from the step runner's
    after-reduction hook, an activation from a forward pre-hook on the first transformer layer."""

    def __init__(self, chunks: Sequence[torch.nn.Module]) -> None:
        self.chunks = chunks
        self._pending: BitFlip | None = None
        self.fired: list[dict[str, Any]] = []
        """What each flip hit (for the log and tests)."""
        layers = getattr(getattr(unwrap(chunks[0]), "decoder", None), "layers", None)
        if layers is not None and len(layers):
            layers[0].register_forward_pre_hook(self._on_layer_input, with_kwargs=True)

    def arm(self, flip: BitFlip | None) -> None:
        if flip is None:
            return
        if flip.target == "weights":
            name, param = self._parameter(flip.parameter)
            self._flip(flip, name, param.data)
        else:
            self._pending = flip

    def after_grad_reduce(self) -> None:
        """Called by the step runner once the gradients are reduced, before the optimizer reads them."""
        if self._pending is not None and self._pending.target == "gradients":
            flip, self._pending = self._pending, None
            name, param = self._parameter(flip.parameter)
            grad = getattr(param, "main_grad", None)
            self._flip(flip, f"{name}.main_grad", grad if grad is not None else param.grad)

    def _on_layer_input(self, _module: torch.nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        if self._pending is None or self._pending.target != "activation":
            return None
        flip, self._pending = self._pending, None
        if args:
            hidden = args[0].clone()
            self._flip(flip, "decoder.layers.0 input", hidden)
            return (hidden, *args[1:]), kwargs
        hidden = kwargs["hidden_states"].clone()
        self._flip(flip, "decoder.layers.0 input", hidden)
        return args, {**kwargs, "hidden_states": hidden}

    def _parameter(self, wanted: str | None) -> tuple[str, torch.nn.Parameter]:
        named = list(unwrap(self.chunks[0]).named_parameters())
        if wanted is not None:
            chosen = [(n, p) for n, p in named if wanted in n]
            if not chosen:
                raise ValueError(f"bitflip: no parameter named like {wanted!r}")
            return chosen[0]
        decoder = [(n, p) for n, p in named if n.startswith("decoder.")] or named
        return max(decoder, key=lambda item: item[1].numel())

    def _flip(self, flip: BitFlip, where: str, tensor: torch.Tensor) -> None:
        index = flip.index if flip.index is not None else tensor.numel() // 2
        bit = flip.bit if flip.bit is not None else default_bit(tensor.dtype, flip.target)
        before, after = flip_bit(tensor, index, bit)
        record = {
            "step": flip.step,
            "target": flip.target,
            "tensor": where,
            "index": index,
            "bit": bit,
            "before": before,
            "after": after if math.isfinite(after) else str(after),
        }
        self.fired.append(record)
        log.warning("fault injection: bit flip %s", record)
