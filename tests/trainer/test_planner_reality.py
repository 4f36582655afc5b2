"""The planner's model against megatron-core objects: 405B stage parameter counts built on the meta
device, and the bytes a real PP2 x DP2 distributed-optimizer rank holds, per component."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch.multiprocessing as mp

from resilient import planner
from resilient.config import load_config
from resilient.supervisor.ranks import free_port
from trainer.presets import PRESETS

REPO = Path(__file__).resolve().parents[2]
EXAMPLE_405B = REPO / "examples" / "llama31-405b.yaml"


def test_405b_example_first_and_last_stage_parameters_match_the_planner(single_process_megatron):
    from trainer.model import ModelBuild, stage_parameter_count

    cfg = load_config(EXAMPLE_405B, [])
    arch, p = cfg.model.architecture(), cfg.parallel
    assert (cfg.world_size, p.tp, p.pp, p.cp, cfg.dp(cfg.world_size)) == (1024, 8, 8, 2, 8)
    # Built at TP=1: a one-process group cannot hold TP=8 shapes (megatron sizes them from the real
    # TP group); the planner divides these matrices by TP and keeps the norms whole.
    layout = planner.Layout(tp=1, pp=p.pp, cp=p.cp, dp=cfg.dp(cfg.world_size))
    stages = planner.memory_per_stage(arch, layout, seq_len=cfg.seq_len, micro_batch=1, grad_accum=cfg.grad_accum)
    for pp_rank in (0, p.pp - 1):
        built = stage_parameter_count(arch, ModelBuild(pp=p.pp), pp_rank=pp_rank)
        assert built == stages[pp_rank].params, pp_rank
    assert stages[0].params == stages[-1].params - arch.hidden_size  # 15 layers + embedding / + output, norm
    full_layout = planner.Layout(tp=p.tp, pp=p.pp, cp=p.cp, dp=cfg.dp(cfg.world_size))
    plan = planner.make_plan(
        arch, full_layout, seq_len=cfg.seq_len, micro_batch=cfg.train.micro_batch, global_batch=cfg.train.global_batch
    )
    assert plan.memory.total < 80 * 2**30


def _measure(rank: int, world: int, port: int, out: str) -> None:
    """One rank of a PP2 x DP2 distributed-optimizer build: bytes of parameters, gradient buffers
    and optimizer state, as megatron allocated them."""
    os.environ["OMP_NUM_THREADS"] = "1"
    from megatron.core import parallel_state

    from resilient.rank.env import RankEnv
    from trainer import distributed
    from trainer.config import TrainConfig
    from trainer.model import ModelBuild, build_model
    from trainer.optim import build_optimizer

    env = RankEnv(
        rank=rank, local_rank=rank, world_size=world, local_world_size=world, master_addr="127.0.0.1", master_port=port
    )
    build = ModelBuild(pp=2, distributed_optimizer=True)
    device = distributed.init_distributed(env, build, timeout_s=120)
    chunks = build_model(PRESETS["tiny"].model_copy(update={"num_layers": 4}), build, device=device)
    optimizer = build_optimizer(chunks, TrainConfig(), build)
    params = sum(p.numel() * p.element_size() for c in chunks for p in c.parameters())
    grads = sum(b.grad_data.numel() * b.grad_data.element_size() for c in chunks for b in c.buffers)
    moments = 0
    for inner in (o.optimizer for o in optimizer.chained_optimizers):
        for st in inner.state.values():
            moments += sum(v.numel() * v.element_size() for k, v in st.items() if k != "step")
    record = {
        "rank": rank,
        "stage": parallel_state.get_pipeline_model_parallel_rank(),
        "params": params,
        "grads": grads,
        "optimizer": moments,
    }
    Path(out, f"rank{rank}.json").write_text(json.dumps(record))
    distributed.shutdown()


@pytest.mark.slow
def test_planner_memory_components_match_a_real_pp2_dp2_distributed_optimizer_rank(tmp_path):
    world = 4
    mp.start_processes(_measure, args=(world, free_port(), str(tmp_path)), nprocs=world, start_method="spawn")
    arch = PRESETS["tiny"].model_copy(update={"num_layers": 4})
    stages = planner.memory_per_stage(
        arch,
        planner.Layout(tp=1, pp=2, cp=1, dp=2),
        seq_len=128,
        micro_batch=2,
        grad_accum=2,
        state=planner.StateBytes.fp32(),
    )
    for rank in range(world):
        got = json.loads((tmp_path / f"rank{rank}.json").read_text())
        want = stages[got["stage"]]
        assert got["params"] == pytest.approx(want.weights, rel=0.05), got
        assert got["grads"] == pytest.approx(want.grads, rel=0.05), got
        assert got["optimizer"] == pytest.approx(want.optimizer, rel=0.05), got
