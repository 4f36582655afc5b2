"""Megatron-LM's own training loop (`megatron.training`) under resilient, and its checkpoint formats.

wrapper       `python -m trainer.megatron_lm SCRIPT ARGS...`: the script under the supervisor
exits         why the loop ended, as the exit code the supervisor acts on
checkpoints   list, verify and repair every save format Megatron-LM writes (no megatron import)
save_formats  whether one checkpoint directory of each --ckpt-format is whole
"""
