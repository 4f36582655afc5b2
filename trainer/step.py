"""One optimizer step through megatron's pipeline schedule (none, 1F1B or interleaved).

The schedule runs every micro-batch of the step (gradient accumulation happens inside it, with
the DDP gradient reduce deferred to the last one), then `finalize_model_grads` reduces gradients
over data x context parallel ranks and the embedding/norm gradients megatron shares across stages.
The loss returned is the data-parallel mean, known on every rank.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from functools import partial

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.distributed import finalize_model_grads
from megatron.core.optimizer import MegatronOptimizer
from megatron.core.pipeline_parallel import get_forward_backward_func

from trainer.compat import split_for_context_parallel
from trainer.model import unwrap
from trainer.sdc.digest import bit_sum


class StepRunner:
    """Binds the model chunks, the optimizer and the schedule for a fixed sequence length."""

    def __init__(
        self,
        chunks: list[torch.nn.Module],
        optimizer: MegatronOptimizer,
        *,
        seq_len: int,
        micro_batch: int,
        device: torch.device,
    ) -> None:
        self.chunks, self.optimizer = chunks, optimizer
        self.seq_len, self.micro_batch, self.device = seq_len, micro_batch, device
        self.schedule = get_forward_backward_func()
        config = unwrap(chunks[0]).config
        config.finalize_model_grads_func = self._finalize_grads
        self.compute_done = 0.0
        """perf_counter() when this rank's last backward ended and the gradient reduction began."""
        self.after_grad_reduce: Callable[[], None] | None = None
        """Called once the gradients are reduced, before the optimizer reads them (fault injection)."""
        self.loss_bits = torch.zeros((), dtype=torch.int64, device=device)
        """The last `run`'s per-token losses of this rank, their bits summed as integers (0 off the last
        pipeline stage): what this replica computed, before any collective mixed replicas together."""
        config.grad_scale_func = optimizer.scale_loss
        # Gradient accumulation: DDP reduces only after the last micro-batch's backward.
        no_sync = [c.no_sync for c in chunks]
        config.no_sync_func = no_sync[0] if len(no_sync) == 1 else no_sync
        if getattr(chunks[0], "ddp_config", None) is not None and chunks[0].ddp_config.overlap_param_gather:
            sync = [c.start_param_sync for c in chunks]
            config.param_sync_func = sync[0] if len(sync) == 1 else sync
        self.positions = torch.arange(seq_len, device=device).unsqueeze(0)
        self.is_last_stage = parallel_state.is_pipeline_last_stage(ignore_virtual=True)
        self.cp_group = (
            parallel_state.get_context_parallel_group()
            if parallel_state.get_context_parallel_world_size() > 1
            else None
        )

    def _finalize_grads(self, *args, **kwargs):
        # The first collective every rank of the step waits in: the time before it is this rank's own
        # work, which tells a straggler apart (wall step time is equal on all ranks).
        self.compute_done = time.perf_counter()
        result = finalize_model_grads(*args, **kwargs)
        if self.after_grad_reduce is not None:
            self.after_grad_reduce()
        return result

    def _forward(self, poison: float, data_iterator, model) -> tuple[torch.Tensor, Callable]:
        tokens = next(data_iterator).to(self.device, non_blocking=True)
        batch = {
            "tokens": tokens[:, :-1],
            "labels": tokens[:, 1:],
            "position_ids": self.positions.expand(tokens.shape[0], -1),
        }
        if self.cp_group is not None:
            batch = split_for_context_parallel(batch, self.cp_group)
        per_token = model(batch["tokens"], batch["position_ids"], None, labels=batch["labels"])
        return per_token, partial(_loss, poison)

    def run(
        self, micro_batches: Sequence[torch.Tensor], *, forward_only: bool = False, poison: float = 1.0
    ) -> torch.Tensor:
        """Forward (and backward) over the micro-batches; returns this rank's mean loss (a tensor:
        the micro-batch mean on the last pipeline stage, 0 elsewhere)."""
        iterators = [iter(micro_batches) for _ in self.chunks]  # every virtual stage walks them all
        losses = self.schedule(
            forward_step_func=partial(self._forward, poison),
            data_iterator=iterators if len(iterators) > 1 else iterators[0],
            model=self.chunks if len(self.chunks) > 1 else self.chunks[0],
            num_microbatches=len(micro_batches),
            seq_length=self.seq_len // parallel_state.get_context_parallel_world_size(),
            micro_batch_size=self.micro_batch,
            forward_only=forward_only,
        )
        if not self.is_last_stage:
            return torch.zeros((), device=self.device)
        self.loss_bits = torch.stack([r["loss bits"] for r in losses]).sum()
        total = torch.stack([r["lm loss"] for r in losses]).sum(0)  # (sum, tokens) over micro-batches
        if parallel_state.get_context_parallel_world_size() > 1:
            dist.all_reduce(total, group=parallel_state.get_context_parallel_group())
        return total[0] / total[1]

    def train(self, micro_batches: Sequence[torch.Tensor], *, poison: float = 1.0) -> tuple[torch.Tensor, float]:
        """One optimizer step; returns (this rank's loss tensor, the global gradient norm)."""
        for chunk in self.chunks:
            chunk.train()
            chunk.zero_grad_buffer()
        self.optimizer.zero_grad()
        loss = self.run(micro_batches, poison=poison)
        _, grad_norm, _ = self.optimizer.step()
        return loss, float(grad_norm or 0.0)

    @torch.no_grad()
    def evaluate(self, micro_batches: Sequence[torch.Tensor]) -> torch.Tensor:
        for chunk in self.chunks:
            chunk.eval()
        return self.run(micro_batches, forward_only=True)


def _loss(poison: float, per_token: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """Sum of token losses, token count (megatron divides), and for reporting the pair and the token losses'
    bits (every bit of every token's loss, for re-executions to compare)."""
    loss = per_token.float().sum() * poison
    tokens = torch.tensor(per_token.numel(), dtype=torch.int, device=per_token.device)
    return loss, tokens, {"lm loss": torch.stack([loss.detach(), tokens.float()]), "loss bits": bit_sum(per_token)}
