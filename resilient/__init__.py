"""resilient: a fault-tolerant supervisor for long megatron-core pretraining runs."""

__version__ = "0.1.0"
