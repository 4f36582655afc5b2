"""Write a Megatron-LM-style save directory with megatron-core's dist_checkpointing (torch_dist).

    python -m tests.checkpoint.megatron_lm_writer SAVE_DIR ITERATION...
Each iteration goes to SAVE_DIR/iter_NNNNNNN/; after each save the tracker
(latest_checkpointed_iteration.txt) names it, as Megatron-LM's save_checkpoint does.
"""

import sys
from pathlib import Path

import torch
import torch.distributed as dist


def main(save_dir: Path, iterations: list[int]) -> None:
    from trainer.cpu_bridge import install_cpu_bridge

    install_cpu_bridge()
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing import ShardedTensor

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    torch.manual_seed(0)
    for iteration in iterations:
        def tensor(key: str, *shape: int) -> ShardedTensor:
            return ShardedTensor.from_rank_offsets(key, torch.randn(*shape), replica_id=0)

        state = {
            "model": {"embedding.word_embeddings.weight": tensor("embedding.word_embeddings.weight", 64, 16),
                      "decoder.final_layernorm.weight": tensor("decoder.final_layernorm.weight", 16)},
            "optimizer": {"exp_avg": tensor("optimizer.exp_avg", 64, 16)},
            "iteration": iteration, "checkpoint_version": 3.0, "args": {"micro_batch_size": 1},
        }
        ckpt_dir = save_dir / f"iter_{iteration:07d}"
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        dist_checkpointing.save(state, str(ckpt_dir))
        (save_dir / "latest_checkpointed_iteration.txt").write_text(str(iteration))
    dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]), [int(a) for a in sys.argv[2:]])
