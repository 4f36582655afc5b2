"""Write every checkpoint format Megatron-LM writes, with the real save calls of each megatron-core line.

    python3 -m tests.checkpoint.megatron_lm_writer core16 OUT
        megatron-core 0.16.1 (no megatron.training in that line): a tiny GPT with the distributed
        optimizer, saved the ways Megatron-LM's save_checkpoint of that line saves it:
        OUT/torch_dist   iter 10, 20: dist_checkpointing.save (common.pt, metadata.json, .metadata, .distcp)
        OUT/torch_dcp    iter 10: torch.distributed.checkpoint.save with a FileSystemWriter
        OUT/torch        iter 10: torch.save of mp_rank_00/model_optim_rng.pt and the distributed
                         optimizer's save_parameter_state into mp_rank_00/distrib_optim.pt
    .venv/mcore-current/bin/python -m tests.checkpoint.megatron_lm_writer training OUT
        megatron-core 0.19 with Megatron-LM's own loop: initialize_megatron once (world size 1, gloo),
        one real train_step, then megatron.training.checkpointing.save_checkpoint for each format:
        OUT/torch_dist   iter 10, 20 (common state inside the .distcp files, no common.pt), and a
                         global non-persistent save at 25 (non_persistent/ with its own tracker)
        OUT/integrity    iter 10 with --verify-integrity (integrity.json)
        OUT/release      release/ and the tracker `release`
        OUT/torch_dcp    iter 10 with --ckpt-format torch_dcp
        OUT/torch        iter 10 with --ckpt-format torch and --use-distributed-optimizer, for a 2 x 2 grid
                         of (tensor, pipeline) ranks: save_checkpoint's explicit tensor_rank/pipeline_rank,
                         as Megatron-LM's checkpoint converter writes every rank's files from one process
    .venv/mcore-current/bin/python -m tests.checkpoint.megatron_lm_writer fsdp OUT
        OUT/fsdp_dtensor iter 10 with --use-megatron-fsdp --ckpt-format fsdp_dtensor (needs einops)

Each save directory's tracker is written the way each line's Megatron-LM writes it. Tests use
`write_all` (one session fixture, tests/conftest.py) and the SAVE_FORMATS table.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from dataclasses import dataclass
from functools import partial
from pathlib import Path

TRACKER = "latest_checkpointed_iteration.txt"
REPO = Path(__file__).resolve().parents[2]
MCORE_CURRENT = REPO / ".venv" / "mcore-current" / "bin" / "python"  # scripts/setup.sh --test


@dataclass(frozen=True)
class SaveFormat:
    """One save directory the writers leave: which writer, where, and what it must hold."""

    writer: str
    subdir: str
    format: str
    tracked: int | str
    """What its (persistent) tracker names."""
    newest: int | None
    """The newest complete iteration of any tier: what exit-only progress must see."""


SAVE_FORMATS = {
    "core16-torch_dist-common.pt": SaveFormat("core16", "16/torch_dist", "torch_dist", 20, 20),
    "core16-torch_dcp": SaveFormat("core16", "16/torch_dcp", "torch_dcp/fsdp_dtensor", 10, 10),
    "core16-torch-distrib_optim": SaveFormat("core16", "16/torch", "torch", 10, 10),
    "core19-torch_dist+non_persistent": SaveFormat("training", "19/torch_dist", "torch_dist", 20, 25),
    "core19-verify_integrity": SaveFormat("training", "19/integrity", "torch_dist", 10, 10),
    "core19-release": SaveFormat("training", "19/release", "torch_dist", "release", None),
    "core19-torch_dcp": SaveFormat("training", "19/torch_dcp", "torch_dcp/fsdp_dtensor", 10, 10),
    "core19-torch-distrib_optim-2x2": SaveFormat("training", "19/torch", "torch", 10, 10),
    "core19-fsdp_dtensor": SaveFormat("fsdp", "19/fsdp_dtensor", "torch_dcp/fsdp_dtensor", 10, 10),
}


class Saves:
    """The written save directories; a format whose writer failed fails the tests that use it."""

    def __init__(self, root: Path, failures: dict[str, str]) -> None:
        self.root, self.failures = root, failures

    def path(self, name: str) -> Path:
        fmt = SAVE_FORMATS[name]
        assert fmt.writer not in self.failures, f"writer {fmt.writer} failed:\n{self.failures[fmt.writer]}"
        return self.root / fmt.subdir


def write_all(out: Path) -> Saves:
    """Run the three writers side by side (each one process) into `out`."""
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
        "OMP_NUM_THREADS": "1",
        "PYTHONWARNINGS": "ignore",
    }
    python = {"core16": sys.executable, "training": str(MCORE_CURRENT), "fsdp": str(MCORE_CURRENT)}
    target = {"core16": out / "16", "training": out / "19", "fsdp": out / "19"}
    failures, running = {}, {}
    for writer, interpreter in python.items():
        if not Path(interpreter).exists():
            failures[writer] = f"{interpreter} is missing: run scripts/setup.sh --test"
            continue
        log = open(out / f"{writer}.log", "wb")
        running[writer] = subprocess.Popen(
            [interpreter, "-m", "tests.checkpoint.megatron_lm_writer", writer, str(target[writer])],
            cwd=REPO,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        log.close()
    for writer, proc in running.items():
        if proc.wait(timeout=600) != 0:
            failures[writer] = (out / f"{writer}.log").read_text(errors="replace")[-3000:]
    return Saves(out, failures)


# -- megatron-core 0.16.1 ------------------------------------------------------------------------------


def write_core16(out: Path) -> None:
    import torch
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from megatron.core import dist_checkpointing, parallel_state

    from trainer.checkpoint.state import OPTIMIZER_SHARDING
    from trainer.config import TrainConfig
    from trainer.cpu_bridge import install_cpu_bridge
    from trainer.model import ModelBuild, build_model, unwrap
    from trainer.optim import build_optimizer
    from trainer.presets import PRESETS

    install_cpu_bridge()
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    parallel_state.initialize_model_parallel()
    torch.manual_seed(0)
    build = ModelBuild(distributed_optimizer=True)
    arch = PRESETS["tiny"].model_copy(
        update={"num_layers": 1, "hidden_size": 32, "ffn_hidden_size": 64, "vocab_size": 128}
    )
    [chunk] = build_model(arch, build, device=torch.device("cpu"))
    optimizer = build_optimizer([chunk], TrainConfig(), build)
    args = argparse.Namespace(
        tensor_model_parallel_size=1, pipeline_model_parallel_size=1, use_distributed_optimizer=True
    )

    def common(iteration: int) -> dict:
        return {"args": args, "checkpoint_version": 3.0, "iteration": iteration}

    save = out / "torch_dist"
    for iteration in (10, 20):
        ckpt = _iteration_dir(save, iteration)
        ckpt.mkdir(parents=True)
        model_sd = unwrap(chunk).sharded_state_dict()
        dist_checkpointing.save(
            {
                **common(iteration),
                "model": model_sd,
                "optimizer": optimizer.sharded_state_dict(model_sd, metadata=OPTIMIZER_SHARDING),
            },
            str(ckpt),
        )
        _write_tracker(save, iteration)

    save = out / "torch_dcp"
    dcp.save(
        {**common(10), "model": unwrap(chunk).state_dict_for_save_checkpoint(), "optimizer": optimizer.state_dict()},
        storage_writer=dcp.FileSystemWriter(str(_iteration_dir(save, 10))),
    )
    _write_tracker(save, 10)

    save = out / "torch"
    rank_dir = _iteration_dir(save, 10) / "mp_rank_00"
    rank_dir.mkdir(parents=True)
    optimizer.save_parameter_state(str(rank_dir / "distrib_optim.pt"))
    torch.save(
        {**common(10), "model": unwrap(chunk).state_dict_for_save_checkpoint(), "optimizer": optimizer.state_dict()},
        rank_dir / "model_optim_rng.pt",
    )
    _write_tracker(save, 10)
    dist.destroy_process_group()


def _iteration_dir(save: Path, iteration: int) -> Path:
    return save / f"iter_{iteration:07d}"


def _write_tracker(save: Path, iteration: int) -> None:
    (save / TRACKER).write_text(str(iteration))  # as Megatron-LM's save_checkpoint: a plain write


# -- megatron-core 0.19: Megatron-LM's own save_checkpoint ---------------------------------------------

_MODEL = (
    "--num-layers 1 --hidden-size 16 --num-attention-heads 2 --seq-length 16 --max-position-embeddings 16 "
    "--micro-batch-size 1 --global-batch-size 1 --train-iters 100 --lr 1e-3 --vocab-size 64 "
    "--tokenizer-type NullTokenizer --mock-data --distributed-backend gloo --transformer-impl local "
    "--no-gradient-accumulation-fusion --no-masked-softmax-fusion --no-bias-gelu-fusion "
    "--no-bias-dropout-fusion --no-rope-fusion --no-persist-layer-norm --normalization RMSNorm "
    "--position-embedding-type rope --use-distributed-optimizer --save-interval 10"
).split()


def _bridge_megatron_training() -> None:
    """Megatron-LM's loop on a CPU-only machine, as `python -m trainer.megatron_lm` runs it."""
    from trainer.compat import use_packaged_dataset_helpers
    from trainer.cpu_bridge import install_megatron_training_bridge

    install_megatron_training_bridge()
    use_packaged_dataset_helpers()


def write_training(out: Path, fsdp: bool) -> None:
    if fsdp:
        try:
            import einops  # noqa: F401 - Megatron-FSDP's device mesh needs it
        except ModuleNotFoundError:
            sys.exit("einops is missing from this environment (scripts/setup.sh --test installs it)")
    _bridge_megatron_training()
    import torch.distributed as dist
    from megatron.core.enums import ModelType
    from megatron.core.pipeline_parallel import get_forward_backward_func
    from megatron.core.process_groups_config import ProcessGroupCollection
    from megatron.core.rerun_state_machine import RerunDataIterator
    from megatron.core.utils import get_model_config
    from megatron.training.argument_utils import gpt_config_from_args, pretrain_cfg_container_from_args
    from megatron.training.arguments import parse_and_validate_args
    from megatron.training.checkpointing import save_checkpoint
    from megatron.training.initialize import initialize_megatron
    from megatron.training.training import setup_model_and_optimizer, train_step

    fmt = (
        ["--ckpt-format", "fsdp_dtensor", "--use-megatron-fsdp", "--no-gradient-reduce-div-fusion"]
        if fsdp
        else ["--ckpt-format", "torch_dist", "--non-persistent-ckpt-type", "global"]
    )
    sys.argv = ["pretrain", *_MODEL, "--save", str(out / "unused"), *fmt]
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1")
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    args = parse_and_validate_args()
    cfg = pretrain_cfg_container_from_args(args, gpt_config_from_args(args))
    initialize_megatron(allow_no_cuda=True)
    model, optimizer, scheduler = setup_model_and_optimizer(
        ModelType.encoder_or_decoder,
        checkpointing_context={},
        cfg_container=cfg,
        pg_collection=ProcessGroupCollection.use_mpu_process_groups(),
    )
    # One real step, so the optimizer holds the state it saves (Adam moments, step).
    train_step(
        _forward_step,
        RerunDataIterator(_batches(args.seq_length, args.padded_vocab_size)),
        model,
        optimizer,
        scheduler,
        get_model_config(model[0]),
        get_forward_backward_func(),
        iteration=0,
    )

    def save(directory: str, iteration: int, ckpt_format: str, **kwargs) -> None:
        args.save, args.ckpt_format, args.use_dist_ckpt = str(out / directory), ckpt_format, ckpt_format != "torch"
        save_checkpoint(iteration, model, optimizer, scheduler, 0, checkpointing_context={}, **kwargs)

    if fsdp:
        save("fsdp_dtensor", 10, "fsdp_dtensor")
        return
    save("torch_dist", 10, "torch_dist")
    save("torch_dist", 20, "torch_dist")
    save("torch_dist", 25, "torch_dist", non_persistent_ckpt=True)
    save("release", 0, "torch_dist", release=True)
    save("torch_dcp", 10, "torch_dcp")
    for tp in (0, 1):
        for pp in (0, 1):
            save("torch", 10, "torch", tensor_rank=tp, pipeline_rank=pp, pipeline_parallel=True)
    args.verify_integrity = True
    save("integrity", 10, "torch_dist")


def _forward_step(data_iterator, model):
    import torch

    batch = next(data_iterator)

    def loss_func(loss_mask, output):
        loss = torch.sum(output.view(-1).float() * loss_mask.view(-1))
        tokens = loss_mask.sum().to(torch.int)
        return loss, tokens, {"lm loss": torch.cat([loss.detach().view(1), tokens.view(1)])}

    output = model(batch["tokens"], batch["position_ids"], None, labels=batch["labels"])
    return output, partial(loss_func, batch["loss_mask"])


def _batches(seq_length: int, vocab: int):
    import torch

    generator = torch.Generator().manual_seed(0)
    while True:
        tokens = torch.randint(0, vocab, (1, seq_length + 1), generator=generator)
        yield {
            "tokens": tokens[:, :-1],
            "labels": tokens[:, 1:],
            "loss_mask": torch.ones(1, seq_length),
            "position_ids": torch.arange(seq_length).unsqueeze(0),
        }


if __name__ == "__main__":
    mode, target = sys.argv[1], Path(sys.argv[2])
    if mode == "core16":
        write_core16(target)
    else:
        write_training(target, fsdp=mode == "fsdp")
