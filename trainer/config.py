"""The trainer's configuration: its own sections (model, parallel layout, optimisation) plus the data
and checkpoint sections it also owns, composed into the trainer's view of the run config.

The trainer reads the same YAML file as the supervisor but only these sections; the composition layer
(resilient.config.RunConfig) extends `TrainerConfig` with the supervisor's, health's, metrics' and
Slurm's sections.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import ConfigDict, Field, model_validator

from resilient.core.configbase import Section, load_section
from trainer.checkpoint.config import CheckpointConfig
from trainer.data.config import DataConfig
from trainer.presets import PRESETS, Architecture
from trainer.sdc.config import NumericsConfig
from trainer.stages import layer_split_problem


class ModelConfig(Section):
    """Which architecture to train; `preset` fields can be overridden one by one."""

    preset: str = "tiny"
    """One of: tiny, llama3-8b, llama3-70b, llama31-405b."""
    overrides: dict[str, Any] = Field(default_factory=dict)
    """Architecture fields replacing the preset's (e.g. num_layers: 4)."""

    @model_validator(mode="after")
    def _known_preset(self) -> ModelConfig:
        if self.preset not in PRESETS:
            raise ValueError(f"unknown preset {self.preset!r} (choose from {', '.join(PRESETS)})")
        self.architecture()  # validates the overrides' keys and types
        return self

    def architecture(self) -> Architecture:
        """The preset with the overrides applied."""
        return Architecture.model_validate({**PRESETS[self.preset].model_dump(), **self.overrides})


class ParallelConfig(Section):
    """Model-parallel layout; data parallelism takes the remaining ranks."""

    tp: int = Field(1, ge=1)
    """Tensor-parallel size."""
    pp: int = Field(1, ge=1)
    """Pipeline-parallel size (1F1B schedule; uneven layer counts go to the first and last stages)."""
    vpp: int | None = Field(None, ge=2)
    """Virtual pipeline stages per pipeline rank (interleaved 1F1B); None: not interleaved."""
    cp: int = Field(1, ge=1)
    """Context-parallel size: each CP rank gets 2 of 2*cp load-balanced sequence chunks
    (transformer-engine attention, GPU only; refused on CPU)."""
    sequence_parallel: bool = False
    """Split norm/dropout activations over the TP group along the sequence (needs tp > 1 and
    transformer-engine norms, GPU only; refused on CPU)."""
    distributed_optimizer: bool = False
    """Shard fp32 main parameters and Adam state over data x context parallel ranks (megatron's
    DistributedOptimizer, ZeRO-1): gradients are reduce-scattered, parameters all-gathered."""
    overlap_grad_reduce: bool = False
    """Start each gradient bucket's reduce during the backward pass (megatron DDP)."""
    overlap_param_gather: bool = False
    """All-gather updated parameters during the next forward (needs distributed_optimizer)."""
    timeout_s: float = Field(1800.0, gt=0)
    """Process-group (NCCL/gloo) collective timeout; generous, since the first step at scale can
    wait minutes on compilation, allocation and a slow rank's data."""


class TrainConfig(Section):
    """The optimisation: batch, schedule, precision, logging."""

    steps: int = Field(100, ge=1)
    """Optimizer steps to train in total."""
    global_batch: int = Field(8, ge=1)
    """Sequences per optimizer step, across all data-parallel ranks."""
    micro_batch: int = Field(2, ge=1)
    """Sequences per forward/backward on one rank; the rest is gradient accumulation."""
    seq_len: int | None = Field(None, ge=8)
    """Tokens per sequence (None: the architecture's context length)."""
    lr: float = Field(3e-3, gt=0)
    """Peak learning rate."""
    min_lr: float = Field(3e-4, ge=0)
    """Learning rate at the end of the cosine decay."""
    warmup_steps: int = Field(10, ge=0)
    """Linear warm-up steps."""
    weight_decay: float = Field(0.1, ge=0)
    """Decoupled weight decay (AdamW)."""
    beta1: float = Field(0.9, ge=0, lt=1)
    """Adam beta1."""
    beta2: float = Field(0.95, ge=0, lt=1)
    """Adam beta2."""
    grad_clip: float = Field(1.0, ge=0)
    """Global gradient-norm clip (0: off)."""
    seed: int = 1234
    """Seed for weights, dropout and the data order."""
    log_every: int = Field(1, ge=1)
    """Print a progress line every N steps (train_log.jsonl gets every step)."""
    exit_at_step: int | None = Field(None, ge=1)
    """Save and stop (exit code PREEMPTED: resumable) after this step, like Megatron's --exit-interval."""
    eval_every: int = Field(0, ge=0)
    """Evaluate on the validation set every N steps and at the end (0: never)."""
    peak_flops: float = Field(1e11, gt=0)
    """Per-device peak FLOP/s used for MFU on CPU (GPUs use the known bf16 peak)."""
    numeric_fault_action: Literal["rollback", "fail"] = "rollback"
    """On a NaN/Inf loss or a loss spike: roll back to the last checkpoint and skip the step's data
    window (recorded in the ledger), or fail the ranks."""
    loss_spike_factor: float = Field(0.0, ge=0)
    """A loss above this multiple of the median of the last `loss_spike_window` losses is a fault (0: off)."""
    loss_spike_window: int = Field(20, ge=1)
    """Recent losses the spike bound looks at (judged only once this many are known)."""
    max_rollbacks: int = Field(5, ge=0)
    """Data windows a run may skip in total (kept in checkpoints); the next numerical fault fails the ranks."""
    precision: Literal["auto", "bf16", "fp32"] = "auto"
    """Model parameters and activations: bf16 (with fp32 main parameters, gradients and Adam state in
    the optimizer) or fp32; auto is bf16 on GPU and fp32 on CPU."""
    grad_reduce_in_fp32: bool = True
    """Accumulate and reduce gradients in fp32 buffers even with bf16 parameters."""
    recompute_granularity: Literal["selective", "full"] | None = None
    """Activation recomputation: selective (attention core only) or full transformer layers (GPU only;
    refused on CPU)."""
    recompute_method: Literal["uniform", "block"] | None = None
    """With full recomputation: uniform (every group of recompute_num_layers layers) or block
    (the first recompute_num_layers layers of each stage)."""
    recompute_num_layers: int | None = Field(None, ge=1)
    """Layers per recompute group (uniform) or recomputed per stage (block); full recompute only."""


class TrainerConfig(Section):
    """What one rank needs: model, parallel layout, training, data, checkpoints. Other top-level
    sections of the run config belong to other components and are ignored here."""

    model_config = ConfigDict(extra="ignore", use_attribute_docstrings=True)

    run_dir: Path = Path("runs/default")
    """Run directory: checkpoints, ledger, status, logs (the CLI's --run-dir overrides it)."""
    model: ModelConfig = Field(default_factory=ModelConfig)
    """Architecture."""
    parallel: ParallelConfig = Field(default_factory=ParallelConfig)
    """Parallel layout."""
    train: TrainConfig = Field(default_factory=TrainConfig)
    """Optimisation."""
    data: DataConfig = Field(default_factory=DataConfig)
    """Training and validation data."""
    checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig)
    """Checkpointing."""
    numerics: NumericsConfig = Field(default_factory=NumericsConfig)
    """Silent-data-corruption defence (replica agreement, re-execution of suspicious steps)."""

    @property
    def seq_len(self) -> int:
        return self.train.seq_len or self.model.architecture().max_position_embeddings

    def dp(self, world_size: int) -> int:
        """Data-parallel size for `world_size` ranks."""
        p = self.parallel
        return world_size // (p.tp * p.pp * p.cp)

    def check_layout(self, world_size: int) -> None:
        """Refuse a layout the trainer cannot run on `world_size` ranks (ValueError naming the field)."""
        arch, p, t = self.model.architecture(), self.parallel, self.train
        # What the architecture alone rules out first: it is wrong whatever the job's size.
        if arch.num_attention_heads % p.tp:
            raise ValueError(f"parallel.tp: {arch.num_attention_heads} attention heads are not divisible by tp={p.tp}")
        if arch.num_query_groups % p.tp:
            raise ValueError(f"parallel.tp: {arch.num_query_groups} query groups are not divisible by tp={p.tp}")
        if self.seq_len > arch.max_position_embeddings:
            raise ValueError(f"train.seq_len: {self.seq_len} exceeds the context length {arch.max_position_embeddings}")
        model_parallel = p.tp * p.pp * p.cp
        if world_size % model_parallel:
            raise ValueError(
                f"parallel: world size {world_size} (nodes x nproc_per_node) is not divisible "
                f"by tp*pp*cp = {model_parallel}"
            )
        dp = self.dp(world_size)
        if t.global_batch % (t.micro_batch * dp):
            raise ValueError(
                f"train.global_batch: {t.global_batch} is not divisible by micro_batch x dp = {t.micro_batch} x {dp}"
            )
        if t.min_lr > t.lr:
            raise ValueError(f"train.min_lr: {t.min_lr:g} exceeds the peak lr {t.lr:g}")
        problem = _runnable(arch, p, t, self.seq_len, t.global_batch // (t.micro_batch * dp))
        if problem:
            raise ValueError(problem)


def cpu_refusal(cfg: TrainerConfig) -> str | None:
    """Why megatron's local (non-TE) layers cannot run this layout on CPU (one line), or None."""
    p, t = cfg.parallel, cfg.train
    if p.cp > 1:
        return (
            "parallel.cp: context parallelism needs transformer-engine attention on GPU; megatron's local "
            "attention (CPU) cannot split the sequence"
        )
    if p.sequence_parallel:
        return (
            "parallel.sequence_parallel: needs transformer-engine (or apex) norms on GPU; megatron's torch "
            "norm (CPU) refuses it"
        )
    if t.recompute_granularity:
        return (
            "train.recompute_granularity: activation recomputation runs on GPU only; on CPU megatron recomputes "
            "where the CPU bridge cannot map its CUDA calls"
        )
    return None


def _runnable(arch: Architecture, p: ParallelConfig, t: TrainConfig, seq_len: int, grad_accum: int) -> str | None:
    """Why megatron cannot run this parallel/precision combination (one line), or None."""
    if p.vpp and p.pp < 2:
        return f"parallel.vpp: virtual pipeline stages need pp >= 2 (pp={p.pp})"
    split = layer_split_problem(arch.num_layers, p.pp, p.vpp)
    if split:
        return f"parallel.pp: {split}"
    if p.vpp and grad_accum % p.pp:
        return (
            f"parallel.vpp: the interleaved schedule needs micro-batches per step ({grad_accum}) divisible by pp={p.pp}"
        )
    if p.sequence_parallel and p.tp < 2:
        return "parallel.sequence_parallel: needs tp > 1"
    if p.overlap_param_gather and not p.distributed_optimizer:
        return "parallel.overlap_param_gather: needs distributed_optimizer"
    if seq_len % (2 * p.cp):
        return f"parallel.cp: sequence length {seq_len} is not divisible by 2 x cp = {2 * p.cp}"
    if p.sequence_parallel and (seq_len // p.cp) % p.tp:
        return f"parallel.sequence_parallel: sequence share {seq_len // p.cp} is not divisible by tp={p.tp}"
    if t.recompute_method and t.recompute_granularity != "full":
        return "train.recompute_method: only with recompute_granularity full"
    if t.recompute_granularity == "full" and not (t.recompute_method and t.recompute_num_layers):
        return "train.recompute_granularity: full recomputation needs recompute_method and recompute_num_layers"
    if t.recompute_num_layers and t.recompute_granularity != "full":
        return "train.recompute_num_layers: only with recompute_granularity full"
    return None


def load_trainer_config(
    path: str | Path | None, overrides: list[str] | None = None, world_size: int | None = None, *, no_link: bool = False
) -> TrainerConfig:
    """The trainer's sections of a run config file; with `world_size`, the layout is checked for it.
    `no_link`: the file is the one the supervisor wrote (RUN_DIR/config.yaml), read without following a link."""
    return load_section(
        TrainerConfig,
        path,
        overrides,
        check=(lambda c: c.check_layout(world_size)) if world_size else None,
        no_link=no_link,
    )
