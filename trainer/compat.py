"""The one place where megatron-core's releases differ for the trainer.

Supported: 0.16.1 (the newest release for Python 3.11) and the current line (0.19.x, Python >= 3.12,
installable on 3.11 for tests). Every call whose signature or default changed between them goes
through a function here, so the rest of the trainer is written against one API.
"""

from __future__ import annotations

import inspect
from functools import cache
from importlib.metadata import version
from pathlib import Path
from typing import Any

import torch
from megatron.core import dist_checkpointing
from megatron.core import utils as mcore_utils
from packaging.version import Version

from resilient.core.errors import ConfigError

RELEASE = Version(version("megatron-core"))
"""The installed megatron-core release (where a difference is a format, not a signature)."""


@cache
def _has_param(func: Any, name: str) -> bool:
    return name in inspect.signature(func).parameters


def split_for_context_parallel(
    batch: dict[str, torch.Tensor], cp_group: torch.distributed.ProcessGroup
) -> dict[str, torch.Tensor]:
    """This context-parallel rank's 2 of 2*cp load-balanced sequence chunks, split over `cp_group`.

    0.18 made the group an argument that defaults to None, which splits over the whole world (silently
    wrong data on every data-parallel replica), and added `is_hybrid_cp`: both are always passed."""
    if _has_param(mcore_utils.get_batch_on_this_cp_rank, "is_hybrid_cp"):
        return mcore_utils.get_batch_on_this_cp_rank(batch, is_hybrid_cp=False, cp_group=cp_group)
    return mcore_utils.get_batch_on_this_cp_rank(batch, cp_group=cp_group)


def save_async(sharded_state: dict, ckpt_dir: str, strategy: Any) -> Any:
    """`dist_checkpointing.save` returning megatron's own AsyncRequest (its "mcore" async strategy).

    Since 0.17 the default strategy is "nvrx", which needs nvidia-resiliency-ext and returns another
    request type; the trainer's writer replaces the request's write function, so it asks for "mcore"."""
    kwargs: dict[str, Any] = {"async_sharded_save": True}
    if _has_param(dist_checkpointing.save, "async_strategy"):
        kwargs["async_strategy"] = "mcore"
    return dist_checkpointing.save(sharded_state, ckpt_dir, strategy, **kwargs)


def load_common(ckpt_dir: Path) -> dict[str, Any]:
    """The non-tensor state of a torch_dist checkpoint. 0.19 keeps it inside the shards (no `common.pt`),
    which 0.16.1 cannot read: such a checkpoint is refused with one line instead of a crash."""
    if not (ckpt_dir / "common.pt").exists() and RELEASE < Version("0.19"):
        raise ConfigError(
            f"{ckpt_dir.name} was written by megatron-core >= 0.19 (its common state is inside the "
            "shards); this megatron-core cannot read it: run the current megatron-core line"
        )
    return dist_checkpointing.load_common_state_dict(str(ckpt_dir))


def use_packaged_dataset_helpers() -> None:
    """megatron.training compiles its C++ dataset helpers with `make` in the package directory, which only
    a Megatron-LM source checkout has a Makefile for; a pip-installed megatron-core ships them built."""
    try:
        from megatron.core.datasets import helpers_cpp  # noqa: F401
    except ImportError:
        return
    from megatron.core.datasets import utils

    utils.compile_helpers = lambda: None
