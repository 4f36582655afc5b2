"""Model architectures: the tiny CPU demo and the published Llama 3 / 3.1 shapes."""

from __future__ import annotations

from pydantic import Field

from resilient.core.configbase import Section


class Architecture(Section):
    """A decoder-only Llama-style transformer (RoPE, SwiGLU, RMSNorm, GQA, untied embeddings)."""

    num_layers: int = Field(gt=0)
    """Transformer layers."""
    hidden_size: int = Field(gt=0)
    """Model width."""
    num_attention_heads: int = Field(gt=0)
    """Query heads."""
    num_query_groups: int = Field(gt=0)
    """Key/value heads (grouped-query attention); equal to the heads for plain multi-head."""
    ffn_hidden_size: int = Field(gt=0)
    """SwiGLU inner width."""
    vocab_size: int = Field(gt=0)
    """Embedding rows before padding for tensor parallelism."""
    max_position_embeddings: int = Field(gt=0)
    """Context length the architecture was published with."""
    rotary_base: int = Field(500_000, gt=0)
    """RoPE theta."""
    norm_epsilon: float = Field(1e-5, gt=0)
    """RMSNorm epsilon."""
    published_params: float | None = None
    """Published parameter count, for the preset tests and the planner."""


PRESETS: dict[str, Architecture] = {
    "tiny": Architecture(
        num_layers=2,
        hidden_size=128,
        num_attention_heads=4,
        num_query_groups=2,
        ffn_hidden_size=352,
        vocab_size=2048,
        max_position_embeddings=128,
        rotary_base=10_000,
    ),
    # Llama 3 / 3.1 model card and paper (Dubey et al. 2024, table 3).
    "llama3-8b": Architecture(
        num_layers=32,
        hidden_size=4096,
        num_attention_heads=32,
        num_query_groups=8,
        ffn_hidden_size=14336,
        vocab_size=128256,
        max_position_embeddings=8192,
        published_params=8.03e9,
    ),
    "llama3-70b": Architecture(
        num_layers=80,
        hidden_size=8192,
        num_attention_heads=64,
        num_query_groups=8,
        ffn_hidden_size=28672,
        vocab_size=128256,
        max_position_embeddings=8192,
        published_params=70.6e9,
    ),
    "llama31-405b": Architecture(
        num_layers=126,
        hidden_size=16384,
        num_attention_heads=128,
        num_query_groups=8,
        ffn_hidden_size=53248,
        vocab_size=128256,
        max_position_embeddings=8192,
        published_params=405.9e9,
    ),
}
