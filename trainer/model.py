"""Build the Llama-style megatron-core GPTModel for an architecture and parallel layout."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core.models.gpt import GPTModel
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
from megatron.core.transformer import TransformerConfig

from trainer.flops import padded_vocab
from trainer.presets import Architecture


def transformer_engine_available() -> bool:
    """TE layers are used only with a GPU and the `gpu` extra installed."""
    if not torch.cuda.is_available():
        return False
    try:
        import transformer_engine  # noqa: F401
    except ImportError:
        return False
    return True


def transformer_config(arch: Architecture, *, tp: int, pp: int, cp: int, on_gpu: bool,
                       initialize: bool = True) -> TransformerConfig:
    """Llama: RMSNorm, SwiGLU, no biases, no dropout, RoPE; bf16 on GPU, fp32 on CPU."""
    dtype = torch.bfloat16 if on_gpu else torch.float32
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
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        context_parallel_size=cp,
        params_dtype=dtype,
        bf16=on_gpu,
        # CPU initialization draws the full weight and slices it, so TP=1 and TP=2 start equal.
        use_cpu_initialization=not on_gpu,
        perform_initialization=initialize,
        # Fused kernels exist only on GPU.
        bias_activation_fusion=on_gpu,
        bias_dropout_fusion=on_gpu,
        masked_softmax_fusion=on_gpu,
        apply_rope_fusion=False,
        gradient_accumulation_fusion=False,
        persist_layer_norm=False,
    )


def build_model(arch: Architecture, *, tp: int, pp: int, cp: int, device: torch.device,
                initialize: bool = True) -> GPTModel:
    """The GPTModel, with transformer-engine layers when available, megatron's local ones otherwise."""
    on_gpu = device.type == "cuda"
    config = transformer_config(arch, tp=tp, pp=pp, cp=cp, on_gpu=on_gpu, initialize=initialize)
    if on_gpu and transformer_engine_available():
        from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_with_transformer_engine_spec

        spec = get_gpt_layer_with_transformer_engine_spec()
    else:
        spec = get_gpt_layer_local_spec(normalization="RMSNorm")
    model = GPTModel(
        config=config,
        transformer_layer_spec=spec,
        vocab_size=padded_vocab(arch.vocab_size, tp),
        max_sequence_length=arch.max_position_embeddings,
        position_embedding_type="rope",
        rotary_base=arch.rotary_base,
        share_embeddings_and_output_weights=False,
    )
    return model.to(device)


def causal_mask(seq_len: int, device: torch.device) -> torch.Tensor:
    """Megatron's mask convention: True marks a position that may not be attended."""
    return torch.triu(torch.ones(seq_len, seq_len, dtype=torch.bool, device=device), 1).view(1, 1, seq_len, seq_len)


def meta_parameter_count(arch: Architecture) -> int:
    """Parameters of the megatron-core model itself, built on the meta device (no memory), TP=1.
    Needs an initialized process group and parallel_state (a 1-process gloo group will do)."""
    with torch.device("meta"):
        config = transformer_config(arch, tp=1, pp=1, cp=1, on_gpu=False, initialize=False)
        model = GPTModel(config=config, transformer_layer_spec=get_gpt_layer_local_spec(normalization="RMSNorm"),
                         vocab_size=arch.vocab_size, max_sequence_length=arch.max_position_embeddings,
                         position_embedding_type="rope", rotary_base=arch.rotary_base,
                         share_embeddings_and_output_weights=False)
    return sum(p.numel() for p in model.parameters())
