"""Who must agree with whom, and the one small collective a check needs."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from resilient.rank.env import RankEnv


@dataclass(frozen=True)
class Topology:
    """Every global rank's place, gathered once per attempt (indexed by global rank)."""

    positions: tuple[int, ...]
    """The rank's tensor- and pipeline-parallel place: ranks of one position hold the same parameters."""
    replicas: tuple[int, ...]
    """The rank's data-parallel index: ranks of one replica compute one forward together."""
    nodes: tuple[int, ...]
    """The rank's node index."""
    node_names: tuple[str, ...]

    @classmethod
    def gather(cls, env: RankEnv) -> Topology:
        """All ranks call it (one all_gather_object)."""
        tp = parallel_state.get_tensor_model_parallel_world_size()
        model_rank = (
            parallel_state.get_pipeline_model_parallel_rank() * tp + parallel_state.get_tensor_model_parallel_rank()
        )
        mine = (model_rank, parallel_state.get_data_parallel_rank(), env.node_rank, env.node_name)
        rows: list[tuple[int, int, int, str]] = [None] * dist.get_world_size()  # type: ignore[list-item]
        dist.all_gather_object(rows, mine)
        return cls(*(tuple(column) for column in zip(*rows, strict=True)))

    def nodes_of(self, ranks: tuple[int, ...] | list[int]) -> list[int]:
        return sorted({self.nodes[r] for r in ranks})


def gather_int(value: int, device: torch.device) -> list[int]:
    """Every rank's signed 64-bit `value`, by global rank (one all-gather of 8 bytes per rank)."""
    mine = torch.tensor([value], dtype=torch.int64, device=device)
    out = torch.empty(dist.get_world_size(), dtype=torch.int64, device=device)
    dist.all_gather_into_tensor(out, mine)
    return out.tolist()
