"""Megatron-LM's own training loop (`megatron.training`) under resilient, and its checkpoint layouts.

    checkpoints   list, verify and repair every save layout Megatron-LM writes (no megatron import)
    save_formats  whether one checkpoint directory of each --ckpt-format is whole
"""
