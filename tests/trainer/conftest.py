"""Shared fixtures of the trainer tests."""

import pytest
import torch.distributed as dist


@pytest.fixture(scope="module")
def single_process_megatron():
    from megatron.core import parallel_state

    from trainer.cpu_bridge import install_cpu_bridge

    install_cpu_bridge()
    if not dist.is_initialized():
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    parallel_state.initialize_model_parallel()
    yield
    parallel_state.destroy_model_parallel()
    dist.destroy_process_group()
