"""Checkpoint metadata is a pickle (torch.distributed.checkpoint's `.metadata`); unpickling runs
whatever it names. Before torch or megatron read a checkpoint, and whenever resilient reads one's
storage layout, its `.metadata` is unpickled here: only the checkpoint metadata types are admitted,
and even those are rebuilt as inert records (their fields as data), so nothing named in the file is
imported or called, and reading needs no torch. (`common.pt` goes through torch.load, weights_only by
default since torch 2.6.)"""

from __future__ import annotations

import collections
import io
import pickle
from pathlib import Path
from typing import Any

from resilient.core.errors import CheckpointError

METADATA = ".metadata"
_DCP = "torch.distributed.checkpoint."
_ALLOWED: dict[str, frozenset[str]] = {
    _DCP + "metadata": frozenset(
        {
            "Metadata",
            "MetadataIndex",
            "StorageMeta",
            "TensorProperties",
            "TensorStorageMetadata",
            "ChunkStorageMetadata",
            "BytesStorageMetadata",
            "_MEM_FORMAT_ENCODING",
        }
    ),
    _DCP + "planner": frozenset({"SavePlan", "WriteItem", "WriteItemType", "TensorWriteData"}),
    _DCP + "filesystem": frozenset({"_StorageInfo"}),
    "torch.serialization": frozenset({"_get_layout"}),  # looks a layout up by name
    "torch": frozenset({"Size"}),
    "pathlib": frozenset({"PosixPath"}),  # StorageMeta.checkpoint_id of a torch.distributed.checkpoint save
}
# torch pickles a dtype as the global `torch.<name>`; tests keep this in step with the installed torch.
DTYPES = frozenset(
    {
        "bfloat16",
        "bool",
        "complex32",
        "complex64",
        "complex128",
        "float16",
        "float32",
        "float64",
        "float4_e2m1fn_x2",
        "float8_e4m3fn",
        "float8_e4m3fnuz",
        "float8_e5m2",
        "float8_e5m2fnuz",
        "float8_e8m0fnu",
        "int8",
        "int16",
        "int32",
        "int64",
        "uint8",
        "uint16",
        "uint32",
        "uint64",
        "qint8",
        "qint32",
        "quint8",
        "quint2x4",
        "quint4x2",
        "bits8",
        "bits16",
        "bits1x8",
        "bits2x4",
        "bits4x2",
        *(f"{sign}int{bits}" for sign in ("", "u") for bits in range(1, 8)),
    }
)


class Record:
    """An admitted global rebuilt inert: what the pickle passes to it (constructor arguments, state)
    is kept as data; none of the real class's code runs. Fields read as attributes."""

    global_name = "?"

    def __new__(cls, *args: Any, **kwargs: Any) -> Record:
        record = super().__new__(cls)
        record.args = args
        return record

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __setstate__(self, state: Any) -> None:
        for part in state if isinstance(state, tuple) else (state,):  # (dict, slots) or dict
            if isinstance(part, dict):
                self.__dict__.update(part)

    def __repr__(self) -> str:
        return f"{self.global_name}{self.args or ''}"


_RECORDS: dict[str, type[Record]] = {}


def _record_type(module: str, name: str) -> type[Record]:
    key = f"{module}.{name}"
    if key not in _RECORDS:
        _RECORDS[key] = type(name, (Record,), {"global_name": key})
    return _RECORDS[key]


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):  # noqa: ANN201 - pickle's signature
        if (module, name) == ("collections", "OrderedDict"):
            return collections.OrderedDict  # a plain mapping: filled item by item, runs nothing else
        if name in _ALLOWED.get(module, ()) or (module == "torch" and name in DTYPES):
            return _record_type(module, name)
        raise pickle.UnpicklingError(f"{module}.{name} is not a checkpoint metadata type")


def load_metadata(ckpt_dir: Path) -> Any:
    """`.metadata` as inert records (torch.distributed.checkpoint's Metadata: `storage_data` maps each
    item's index to its file, offset and length; `state_dict_metadata` maps item names to their kind);
    CheckpointError (one line) when it is unreadable, names anything else or is no pickle at all."""
    path = Path(ckpt_dir) / METADATA
    try:
        data = path.read_bytes()
    except OSError as err:
        raise CheckpointError(f"{path}: unreadable ({err.strerror or err})") from None
    try:
        return _MetadataUnpickler(io.BytesIO(data)).load()
    except Exception as err:  # noqa: BLE001 - any failure to parse it safely is a refusal
        raise CheckpointError(f"refusing to load {path}: {err}") from None


def check_metadata(ckpt_dir: Path) -> None:
    """Unpickle `.metadata` with the allowlist; CheckpointError (one line) when it names anything else."""
    load_metadata(ckpt_dir)
