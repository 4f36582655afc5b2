"""Preset parameter counts, taken from the megatron-core model built on the meta device."""

import pytest

from trainer.flops import parameter_count
from trainer.presets import PRESETS


@pytest.mark.parametrize("preset", ["llama3-8b", "llama3-70b", "llama31-405b"])
def test_preset_parameter_count_matches_published(single_process_megatron, preset):
    from trainer.model import meta_parameter_count

    arch = PRESETS[preset]
    built = meta_parameter_count(arch)
    assert abs(built - arch.published_params) / arch.published_params < 0.01, (built, arch.published_params)
    assert built == parameter_count(arch)  # the analytic formula the planner and MFU use agrees exactly


def test_405b_shape_is_the_published_one():
    arch = PRESETS["llama31-405b"]
    assert (
        arch.num_layers,
        arch.hidden_size,
        arch.num_attention_heads,
        arch.num_query_groups,
        arch.ffn_hidden_size,
        arch.vocab_size,
        arch.max_position_embeddings,
    ) == (126, 16384, 128, 8, 53248, 128256, 8192)
