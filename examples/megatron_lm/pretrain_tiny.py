"""A tiny Megatron-LM pretraining script on megatron's mock data, written the way operators call
`megatron.training.pretrain` (megatron-core >= 0.19); `examples/megatron_lm.yaml` runs it supervised.

    python -m trainer.megatron_lm examples/megatron_lm/pretrain_tiny.py --num-layers 2 ... --mock-data
"""

from functools import partial

import torch
from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
from megatron.core.datasets.gpt_dataset import GPTDatasetConfig, MockGPTDataset
from megatron.core.enums import ModelType
from megatron.core.rerun_state_machine import get_rerun_state_machine
from megatron.core.tokenizers.utils.build_tokenizer import build_tokenizer
from megatron.training import get_args, pretrain
from megatron.training.argument_utils import gpt_config_from_args, pretrain_cfg_container_from_args
from megatron.training.arguments import parse_and_validate_args


def loss_func(loss_mask, output_tensor):
    losses = output_tensor.view(-1).float()
    loss_mask = loss_mask.view(-1).float()
    loss = torch.sum(losses * loss_mask)
    num_tokens = loss_mask.sum().clone().detach().to(torch.int)
    # Megatron's result validation (a NaN reruns the step; one that does not reproduce exits 16 or 17)
    get_rerun_state_machine().validate_result(
        result=loss,
        rejection_func=torch.isnan,
        tolerance=0.0,
        fatal=True,
        message="found NaN in local forward loss calculation",
    )
    return loss, num_tokens, {"lm loss": torch.cat([loss.clone().detach().view(1), num_tokens.view(1)])}


def forward_step(data_iterator, model):
    batch = next(data_iterator)
    tokens, labels, loss_mask, position_ids = (
        batch[k].cuda() for k in ("tokens", "labels", "loss_mask", "position_ids")
    )
    return model(tokens, position_ids, None, labels=labels), partial(loss_func, loss_mask)


def datasets_provider(num_samples, vp_stage=None):
    args = get_args()
    config = GPTDatasetConfig(
        random_seed=args.seed,
        sequence_length=args.seq_length,
        split="98,1,1",
        tokenizer=build_tokenizer(args),
        reset_position_ids=False,
        reset_attention_mask=False,
        eod_mask_loss=False,
    )
    return BlendedMegatronDatasetBuilder(MockGPTDataset, num_samples, lambda: True, config).build()


if __name__ == "__main__":
    datasets_provider.is_distributed = True
    args = parse_and_validate_args(args_defaults={"tokenizer_type": "NullTokenizer"})
    pretrain(
        pretrain_cfg_container_from_args(args, gpt_config_from_args(args)),
        datasets_provider,
        ModelType.encoder_or_decoder,
        forward_step,
    )
