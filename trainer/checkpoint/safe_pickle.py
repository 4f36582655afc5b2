"""Checkpoint metadata is a pickle (torch.distributed.checkpoint's `.metadata`); unpickling runs
whatever it names. Before torch or megatron read a checkpoint, its `.metadata` is unpickled here with
an allowlist of the checkpoint metadata types only, so a planted pickle is refused, never run.
(`common.pt` goes through torch.load, weights_only by default since torch 2.6.)"""

from __future__ import annotations

import io
import pickle
from pathlib import Path

from resilient.core.errors import CheckpointError

METADATA = ".metadata"
_DCP = "torch.distributed.checkpoint."
_ALLOWED: dict[str, frozenset[str]] = {
    _DCP + "metadata": frozenset({"Metadata", "MetadataIndex", "StorageMeta", "TensorProperties",
                                  "TensorStorageMetadata", "ChunkStorageMetadata", "BytesStorageMetadata",
                                  "_MEM_FORMAT_ENCODING"}),
    _DCP + "planner": frozenset({"SavePlan", "WriteItem", "WriteItemType", "TensorWriteData"}),
    _DCP + "filesystem": frozenset({"_StorageInfo"}),
    "torch.serialization": frozenset({"_get_layout"}),  # looks a layout up by name
    "torch": frozenset({"Size"}),
    "collections": frozenset({"OrderedDict"}),
}


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):  # noqa: ANN201 - pickle's signature
        if name in _ALLOWED.get(module, ()) or (module == "torch" and _is_dtype(name)):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"{module}.{name} is not a checkpoint metadata type")


def _is_dtype(name: str) -> bool:
    import torch  # only here: `ckpt list` and `status` must not pay for importing torch

    return isinstance(getattr(torch, name, None), torch.dtype)


def check_metadata(ckpt_dir: Path) -> None:
    """Unpickle `.metadata` with the allowlist; CheckpointError (one line) when it names anything else."""
    path = Path(ckpt_dir) / METADATA
    try:
        data = path.read_bytes()
    except OSError as err:
        raise CheckpointError(f"{path}: unreadable ({err.strerror or err})") from None
    try:
        _MetadataUnpickler(io.BytesIO(data)).load()
    except Exception as err:  # noqa: BLE001 - any failure to parse it safely is a refusal
        raise CheckpointError(f"refusing to load {path}: {err}") from None
