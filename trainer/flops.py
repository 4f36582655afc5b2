"""Model arithmetic: parameter counts, vocabulary padding, FLOPs per token and MFU (PaLM's accounting)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from trainer.presets import Architecture

if TYPE_CHECKING:  # torch only where a device is asked about: the planner and `resilient plan` stay light
    import torch

# Dense bf16 peak per device (no sparsity), by substring of the CUDA device name.
_GPU_PEAK_BF16 = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10": 125e12}


def layer_params(arch: Architecture) -> int:
    """One transformer layer: GQA attention (q, k, v, o), SwiGLU MLP (gate, up, down), two RMSNorms."""
    head_dim = arch.hidden_size // arch.num_attention_heads
    kv = arch.num_query_groups * head_dim
    attention = 2 * arch.hidden_size * arch.hidden_size + 2 * arch.hidden_size * kv
    mlp = 3 * arch.hidden_size * arch.ffn_hidden_size
    return attention + mlp + 2 * arch.hidden_size


def parameter_count(arch: Architecture, *, padded_vocab: int | None = None) -> int:
    """Parameters of the Llama architecture: layers, untied input and output embeddings, final norm."""
    vocab = padded_vocab or arch.vocab_size
    return arch.num_layers * layer_params(arch) + 2 * vocab * arch.hidden_size + arch.hidden_size


def padded_vocab(vocab_size: int, tp: int, multiple: int = 128) -> int:
    """Megatron pads the vocabulary so every TP shard has equal, aligned rows."""
    step = multiple * tp
    return -(-vocab_size // step) * step


def flops_per_token(arch: Architecture, seq_len: int) -> float:
    """Training FLOPs per token: 6 x (non-input-embedding params) + 12 x layers x width x seq."""
    matmul_params = parameter_count(arch) - arch.vocab_size * arch.hidden_size
    return 6.0 * matmul_params + 12.0 * arch.num_layers * arch.hidden_size * seq_len


def device_peak_flops(device: torch.device, configured: float) -> float:
    """Known bf16 peak for the GPU model, else the configured figure (CPU)."""
    if device.type == "cuda":
        import torch

        name = torch.cuda.get_device_name(device)
        for key, peak in _GPU_PEAK_BF16.items():
            if key in name:
                return peak
    return configured
