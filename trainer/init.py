"""Layout-invariant weight initialization for CPU runs.

megatron's CPU initialization draws each full weight from the process's RNG stream and keeps this
rank's tensor-parallel slice, so TP=1 and TP=2 start equal; but a later pipeline stage is built on
a rank that never drew the earlier stages' weights, so its stream (and its weights) differ with PP.
Here every matrix is redrawn from a generator seeded by (seed, global parameter name), with
megatron's std (scaled for the residual output projections) and its TP slicing, so any
TP/PP/VPP/DP layout starts from the same model. 1-D parameters (RMSNorm gains: ones) are kept.
"""

from __future__ import annotations

import math
import re
import zlib

import torch
from megatron.core import parallel_state

from trainer.model import unwrap

_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.")
_RESIDUAL_OUT = ("linear_proj.weight", "linear_fc2.weight")  # megatron's output_layer_init_method


def _global_name(chunk: torch.nn.Module, name: str) -> str:
    match = _LAYER.match(name)
    if not match:
        return name
    layer_number = chunk.decoder.layers[int(match.group(1))].layer_number  # 1-based, global
    return f"decoder.layers.{layer_number - 1}.{name[match.end() :]}"


@torch.no_grad()
def init_layout_invariant(chunks: list[torch.nn.Module], seed: int) -> None:
    tp, tp_rank = (
        parallel_state.get_tensor_model_parallel_world_size(),
        parallel_state.get_tensor_model_parallel_rank(),
    )
    for wrapped in chunks:
        chunk = unwrap(wrapped)
        config = chunk.config
        for name, param in chunk.named_parameters():
            if param.dim() < 2:
                continue
            full_name = _global_name(chunk, name)
            std = config.init_method_std
            if full_name.endswith(_RESIDUAL_OUT):
                std /= math.sqrt(2.0 * config.num_layers)
            shape = list(param.shape)
            split = getattr(param, "tensor_model_parallel", False)
            dim, stride = getattr(param, "partition_dim", 0), getattr(param, "partition_stride", 1)
            if split:
                shape[dim] *= tp
            generator = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(full_name.encode()))
            master = torch.empty(shape, dtype=torch.float32).normal_(0.0, std, generator=generator)
            if split:  # megatron's slicing: stride pieces, every tp-th one belongs to this rank
                pieces = torch.split(master, param.shape[dim] // stride, dim=dim)
                master = torch.cat(pieces[tp_rank::tp], dim=dim)
            param.copy_(master.to(param.dtype))
