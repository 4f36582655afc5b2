"""megatron-core's optimizer (AdamW; distributed or not) and its warm-up + cosine LR schedule.

The optimizer owns gradient clipping and, with bf16 parameters, the fp32 main parameters and
gradients; with `distributed_optimizer` its state is sharded over the data-parallel (x context
parallel) group and the gradient reduce becomes a reduce-scatter plus a parameter all-gather.
"""

from __future__ import annotations

import torch
from megatron.core.optimizer import MegatronOptimizer, OptimizerConfig, get_megatron_optimizer
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

from trainer.config import TrainConfig
from trainer.model import ModelBuild


def build_optimizer(chunks: list[torch.nn.Module], cfg: TrainConfig, build: ModelBuild) -> MegatronOptimizer:
    """AdamW with weight decay on matrices only (megatron's default groups skip norms and biases)."""
    config = OptimizerConfig(
        optimizer="adam",
        lr=cfg.lr,
        min_lr=cfg.min_lr,
        weight_decay=cfg.weight_decay,
        adam_beta1=cfg.beta1,
        adam_beta2=cfg.beta2,
        adam_eps=1e-8,
        clip_grad=cfg.grad_clip,
        bf16=build.bf16,
        params_dtype=torch.bfloat16 if build.bf16 else torch.float32,
        use_distributed_optimizer=build.distributed_optimizer,
        overlap_param_gather=build.overlap_param_gather,
    )
    optimizer = get_megatron_optimizer(config, chunks)
    init_optimizer_state(optimizer)
    return optimizer


def init_optimizer_state(optimizer: MegatronOptimizer) -> None:
    """Create torch Adam's moments and step counters up front (megatron's own init_state_fn leaves
    `step` out, which its distributed optimizer's state_dict then asserts on), so a fresh and a
    resumed run have the same state structure. TE/apex fused Adam keeps its step per group instead.
    The step lives where torch expects it: on the parameter's device for fused or capturable Adam."""
    for inner in (o.optimizer for o in getattr(optimizer, "chained_optimizers", [optimizer])):
        if not isinstance(inner, torch.optim.Adam | torch.optim.AdamW):
            continue
        for group in inner.param_groups:
            on_device = group.get("fused") or group.get("capturable")
            for p in group["params"]:
                if not inner.state[p]:
                    inner.state[p] = {
                        "step": torch.zeros((), dtype=torch.float32, device=p.device if on_device else "cpu"),
                        "exp_avg": torch.zeros_like(p, memory_format=torch.preserve_format),
                        "exp_avg_sq": torch.zeros_like(p, memory_format=torch.preserve_format),
                    }


def build_scheduler(optimizer: MegatronOptimizer, cfg: TrainConfig) -> OptimizerParamScheduler:
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
