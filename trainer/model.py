"""Build this rank's Llama-style megatron-core GPTModel chunks, wrapped in megatron's DDP.

One chunk per virtual pipeline stage; each chunk knows whether it holds the embedding
(pre_process) or the output layer and loss (post_process); uneven layer splits: trainer.stages.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from megatron.core import parallel_state
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
from megatron.core.models.gpt import GPTModel
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
from megatron.core.transformer import TransformerConfig

from trainer.flops import padded_vocab
from trainer.presets import Architecture
from trainer.stages import stage_layers


@dataclass(frozen=True)
class ModelBuild:
    """The parallel and precision choices a model build depends on; each field is the trainer config
    field of the same name (trainer.config: parallel.*, train.*), `bf16` resolved from train.precision."""

    tp: int = 1
    pp: int = 1
    cp: int = 1
    vpp: int | None = None
    sequence_parallel: bool = False
    bf16: bool = False
    recompute_granularity: str | None = None
    recompute_method: str | None = None
    recompute_num_layers: int | None = None
    distributed_optimizer: bool = False
    overlap_grad_reduce: bool = False
    overlap_param_gather: bool = False
    grad_reduce_in_fp32: bool = True


def transformer_config(
    arch: Architecture, build: ModelBuild, *, on_gpu: bool, initialize: bool = True
) -> TransformerConfig:
    """Llama: RMSNorm, SwiGLU, no biases, no dropout, RoPE; bf16 or fp32 parameters."""
    dtype = torch.bfloat16 if build.bf16 else torch.float32
    layers = stage_layers(arch.num_layers, build.pp)
    uneven = build.pp > 1 and len(set(layers)) > 1
    return TransformerConfig(
        num_layers=arch.num_layers,
        hidden_size=arch.hidden_size,
        num_attention_heads=arch.num_attention_heads,
        num_query_groups=arch.num_query_groups,
        ffn_hidden_size=arch.ffn_hidden_size,
        normalization="RMSNorm",
        layernorm_epsilon=arch.norm_epsilon,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        init_method_std=0.02,
        tensor_model_parallel_size=build.tp,
        pipeline_model_parallel_size=build.pp,
        virtual_pipeline_model_parallel_size=build.vpp,
        context_parallel_size=build.cp,
        sequence_parallel=build.sequence_parallel,
        num_layers_in_first_pipeline_stage=layers[0] if uneven else None,
        num_layers_in_last_pipeline_stage=layers[-1] if uneven else None,
        pipeline_dtype=dtype,
        params_dtype=dtype,
        bf16=build.bf16,
        recompute_granularity=build.recompute_granularity,
        recompute_method=build.recompute_method,
        recompute_num_layers=build.recompute_num_layers,
        # CPU initialization draws the full weight and slices it, so TP=1 and TP=2 start equal.
        use_cpu_initialization=not on_gpu,
        perform_initialization=initialize,
        bias_activation_fusion=on_gpu,
        bias_dropout_fusion=on_gpu,
        # megatron's fused softmax is a separately built CUDA extension nobody ships; TE fuses its own.
        masked_softmax_fusion=False,
        apply_rope_fusion=False,
        gradient_accumulation_fusion=False,
        persist_layer_norm=False,
        deallocate_pipeline_outputs=on_gpu,
        # gloo matches point-to-point messages between two ranks by posting order; megatron's batched
        # ops post both directions in one order on both ranks, which with pp=2 (prev == next) pairs an
        # activation with a gradient of the same shape. Unbatched, megatron orders them by rank parity.
        batch_p2p_comm=on_gpu,
    )


def transformer_engine_available() -> bool:
    """TE layers are used only with a GPU and the `gpu` extra installed."""
    if not torch.cuda.is_available():
        return False
    try:
        import transformer_engine  # noqa: F401
    except ImportError:
        return False
    return True


def _layer_spec(use_te: bool):
    if use_te:
        from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_with_transformer_engine_spec

        return get_gpt_layer_with_transformer_engine_spec()
    return get_gpt_layer_local_spec(normalization="RMSNorm")


def build_chunk(
    arch: Architecture,
    config: TransformerConfig,
    *,
    tp: int,
    vp_stage: int | None,
    pre_process: bool,
    post_process: bool,
    use_te: bool,
) -> GPTModel:
    """One (virtual) pipeline stage of the model."""
    return GPTModel(
        config=config,
        transformer_layer_spec=_layer_spec(use_te),
        vocab_size=padded_vocab(arch.vocab_size, tp),
        max_sequence_length=arch.max_position_embeddings,
        pre_process=pre_process,
        post_process=post_process,
        position_embedding_type="rope",
        rotary_base=arch.rotary_base,
        share_embeddings_and_output_weights=False,
        vp_stage=vp_stage,
    )


def build_model(arch: Architecture, build: ModelBuild, *, device: torch.device) -> list[DistributedDataParallel]:
    """This rank's model chunks (one per virtual stage), each wrapped in megatron's DDP (gradient
    buffers; reduce-scatter instead of all-reduce with the distributed optimizer)."""
    on_gpu = device.type == "cuda"
    use_te = on_gpu and transformer_engine_available()
    config = transformer_config(arch, build, on_gpu=on_gpu)
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=build.grad_reduce_in_fp32,
        overlap_grad_reduce=build.overlap_grad_reduce,
        overlap_param_gather=build.overlap_param_gather,
        use_distributed_optimizer=build.distributed_optimizer,
        check_for_nan_in_grad=False,  # NaN losses are judged (and rolled back) by the loop
    )
    chunks = []
    vpp = build.vpp or 1
    for vp in range(vpp):
        vp_stage = vp if build.vpp else None
        pre = parallel_state.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp_stage)
        post = parallel_state.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp_stage)
        chunk = build_chunk(
            arch, config, tp=build.tp, vp_stage=vp_stage, pre_process=pre, post_process=post, use_te=use_te
        ).to(device)
        # As Megatron-LM: later chunks' reduces already overlap the earlier chunks' backward, so
        # only the first chunk is split into buckets.
        chunks.append(DistributedDataParallel(config, ddp_config, chunk, disable_bucketing=vp > 0))
    return chunks


def unwrap(chunk: torch.nn.Module) -> GPTModel:
    """The GPTModel inside a DDP wrapper."""
    return chunk.module if isinstance(chunk, DistributedDataParallel) else chunk


def stage_parameter_count(arch: Architecture, build: ModelBuild, *, pp_rank: int) -> int:
    """Parameters of one pipeline stage, built on the meta device (no memory) at TP=1: megatron's
    own split decides the stage's layer count, the stage is then built as a one-stage model with
    that many layers, the embedding on the first stage and the output layer on the last.
    Needs an initialized process group and parallel_state (a 1-process gloo group will do)."""
    from megatron.core.transformer.transformer_block import get_num_layers_to_build

    full = transformer_config(arch, replace(build, tp=1), on_gpu=False, initialize=False)
    total = 0
    with torch.device("meta"):
        for vp in range(build.vpp or 1):
            vp_stage = vp if build.vpp else None
            layers = get_num_layers_to_build(full, vp_stage=vp_stage, pp_rank=pp_rank)
            stage = transformer_config(
                arch.model_copy(update={"num_layers": layers}), ModelBuild(), on_gpu=False, initialize=False
            )
            stage.use_cpu_initialization = False
            chunk = build_chunk(
                arch,
                stage,
                tp=1,
                vp_stage=None,
                use_te=False,
                pre_process=pp_rank == 0 and vp == 0,
                post_process=pp_rank == build.pp - 1 and vp == (build.vpp or 1) - 1,
            )
            total += sum(p.numel() for p in chunk.parameters())
    return total


def meta_parameter_count(arch: Architecture) -> int:
    """Parameters of the whole megatron-core model (TP=1, PP=1), built on the meta device."""
    return stage_parameter_count(arch, ModelBuild(), pp_rank=0)


@contextmanager
def params_gathered(chunks: Sequence[torch.nn.Module]) -> Iterator[None]:
    """Every rank's parameters complete for the duration. With the distributed optimizer's overlapped
    parameter gather, megatron's DDP gathers the updated shards only at the next forward; this gathers them
    now (the bits that forward would get) and re-arms its hooks after, as megatron's own loop does before a
    checkpoint save or a weight-hash check. Otherwise nothing happens."""
    hooked = [c for c in chunks if getattr(c, "use_forward_hook", False)]
    for chunk in hooked:
        chunk.disable_forward_pre_hook(param_sync=True)
    try:
        yield
    finally:
        for chunk in hooked:
            chunk.enable_forward_pre_hook()
