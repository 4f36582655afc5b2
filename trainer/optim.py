"""AdamW with warm-up + cosine LR, data-parallel gradient averaging and TP-aware clipping.

megatron-core's optimizer wrappers allocate their scalars on CUDA; plain torch AdamW runs on
both devices and its per-parameter state maps one-to-one onto megatron's sharded tensors
for checkpointing (see trainer/checkpoint/state.py).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
from megatron.core.tensor_parallel.layers import param_is_not_tensor_parallel_duplicate
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

from trainer.config import TrainConfig


def build_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    """Weight decay on matrices only (norm gains are 1-D), as in Llama and Megatron."""
    decay, no_decay = [], []
    for _, param in model.named_parameters():
        if param.requires_grad:
            (decay if param.dim() >= 2 else no_decay).append(param)
    groups = [
        {"params": decay, "weight_decay": cfg.weight_decay},
        {"params": no_decay, "weight_decay": 0.0, "wd_mult": 0.0},
    ]
    fused = next(model.parameters()).is_cuda
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=1e-8,
                             weight_decay=cfg.weight_decay, fused=fused, foreach=not fused)


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig) -> OptimizerParamScheduler:
    """Linear warm-up to `lr`, cosine decay to `min_lr` at the last step (megatron's scheduler)."""
    return OptimizerParamScheduler(
        optimizer,
        init_lr=0.0,
        max_lr=cfg.lr,
        min_lr=cfg.min_lr,
        lr_warmup_steps=cfg.warmup_steps,
        lr_decay_steps=max(cfg.steps, cfg.warmup_steps + 1),
        lr_decay_style="cosine",
        start_wd=cfg.weight_decay,
        end_wd=cfg.weight_decay,
        wd_incr_steps=cfg.steps,
        wd_incr_style="constant",
    )


def average_gradients(model: torch.nn.Module) -> None:
    """Average gradients over the data-parallel group in one coalesced all-reduce."""
    group = parallel_state.get_data_parallel_group()
    size = dist.get_world_size(group)
    if size == 1:
        return
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    flat = _flatten_dense_tensors(grads)
    flat.div_(size)
    dist.all_reduce(flat, group=group)
    for grad, synced in zip(grads, _unflatten_dense_tensors(flat, grads)):
        grad.copy_(synced)


def clip_gradients(model: torch.nn.Module, max_norm: float) -> float:
    """Global L2 norm over the whole model (TP shards summed, TP-duplicated params counted once);
    scales gradients when it exceeds `max_norm` (0 disables clipping). Returns the norm."""
    grads = [p.grad for p in model.parameters() if p.grad is not None and param_is_not_tensor_parallel_duplicate(p)]
    local = torch.stack([g.detach().float().pow(2).sum() for g in grads]).sum() if grads else torch.zeros(())
    local = local.reshape(1)
    if parallel_state.get_model_parallel_group() is not None and dist.get_world_size(parallel_state.get_model_parallel_group()) > 1:
        dist.all_reduce(local, group=parallel_state.get_model_parallel_group())
    norm = float(local.sqrt().item())
    if max_norm > 0 and norm > max_norm:
        coef = max_norm / (norm + 1e-6)
        for p in model.parameters():
            if p.grad is not None:
                p.grad.mul_(coef)
    return norm
