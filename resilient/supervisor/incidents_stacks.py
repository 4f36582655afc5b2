"""Reading rank stacks: py-spy's text dump and a Python traceback in a log, as plain frames. Pure."""

from __future__ import annotations

import re
from dataclasses import dataclass

_THREAD = re.compile(r'^Thread (?:0x)?[0-9a-fA-F]+ \((?P<state>[^)]*)\): "(?P<name>[^"]*)"')
_FRAME = re.compile(r"^\s+(?P<func>\S.*?) \((?P<file>[^()]*?):(?P<line>\d+)\)\s*$")
_TRACEBACK_FRAME = re.compile(r'^\s*File "(?P<file>[^"]+)", line (?P<line>\d+), in (?P<func>\S+)')

# Where a rank waits for its peers: torch.distributed and megatron's communication wrappers. A bare
# `wait` is only a collective under these packages: threading's Condition.wait is a data stall.
_COLLECTIVE_FILES = (
    "torch/distributed/",
    "torch/nn/parallel/distributed",
    "megatron/core/distributed/",
    "megatron/core/tensor_parallel/mappings",
    "megatron/core/pipeline_parallel/p2p",
)
_COLLECTIVE_FUNCS = frozenset(
    {
        "all_reduce",
        "all_gather",
        "all_gather_into_tensor",
        "all_gather_object",
        "reduce_scatter",
        "reduce_scatter_tensor",
        "broadcast",
        "broadcast_object_list",
        "barrier",
        "monitored_barrier",
        "all_to_all",
        "all_to_all_single",
        "reduce",
        "gather",
        "scatter",
        "send",
        "recv",
        "isend",
        "irecv",
        "batch_isend_irecv",
    }
)


@dataclass(frozen=True)
class Frame:
    func: str
    file: str
    line: int

    def __str__(self) -> str:
        return f"{self.func} ({self.file}:{self.line})"

    @property
    def in_collective(self) -> bool:
        path = self.file.replace("\\", "/")
        # py-spy >= 0.4 qualifies methods (ProcessGroup.allreduce, Condition.wait)
        return self.func.rsplit(".", 1)[-1] in _COLLECTIVE_FUNCS or any(p in path for p in _COLLECTIVE_FILES)


@dataclass(frozen=True)
class Thread:
    name: str
    state: str
    frames: tuple[Frame, ...]
    """Innermost first, as py-spy prints them."""


def parse_pyspy(text: str) -> list[Thread]:
    """The threads of a `py-spy dump` text; anything unrecognised (headers, errors) is skipped."""
    threads: list[Thread] = []
    current: tuple[str, str, list[Frame]] | None = None
    for line in text.splitlines():
        if m := _THREAD.match(line):
            if current:
                threads.append(Thread(current[0], current[1], tuple(current[2])))
            current = (m["name"], m["state"], [])
        elif current and (m := _FRAME.match(line)):
            current[2].append(Frame(m["func"], m["file"], int(m["line"])))
    if current:
        threads.append(Thread(current[0], current[1], tuple(current[2])))
    return threads


def parse_frame(text: str) -> Frame | None:
    """A frame back from its `str()` form, 'func (file:line)' (as summaries store them)."""
    m = _FRAME.match(" " + text)
    return Frame(m["func"], m["file"], int(m["line"])) if m else None


def main_stack(threads: list[Thread]) -> tuple[Frame, ...]:
    """The main thread's frames (where the training loop runs), else the first thread's."""
    main = next((t for t in threads if t.name == "MainThread"), threads[0] if threads else None)
    return main.frames if main else ()


def in_collective(frames: tuple[Frame, ...]) -> bool:
    return any(f.in_collective for f in frames)


def last_traceback_frame(lines: list[str]) -> Frame | None:
    """The innermost frame of the last Python traceback in a log tail (where a crashed rank died)."""
    last = None
    for line in lines:
        if m := _TRACEBACK_FRAME.match(line):
            last = Frame(m["func"], m["file"], int(m["line"]))
    return last
