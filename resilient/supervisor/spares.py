"""Warm standby ranks: parked processes per local rank (resilient.rank.park), kept ahead of need.

A new attempt hands each local rank to one of its spares (an assignment on the spare's stdin) instead of
paying for interpreter start and imports, a warm one (imports done, said on a pipe) first; spares are
replenished once the new ranks step (`refill_due`), importing at idle priority where they can leave it
again (resilient.rank.park), and their resident memory is reported. Only Python rank commands
(`PYTHON -m MODULE ...`, `PYTHON SCRIPT ...` with the supervisor's own interpreter) can be parked;
any other command is spawned cold.
"""

from __future__ import annotations

import ast
import json
import os
import select
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from resilient.core.errors import StorageFault
from resilient.core.rundir import RunDir
from resilient.rank.env import PARK_READY_FD, RankEnv
from resilient.supervisor.ranks import RankProcess, log_path, open_log, rank_environ

OWN_TRAINER_IMPORTS = (
    "torch",
    "megatron.core",
    "megatron.core.datasets.indexed_dataset",
    "trainer.config",
    "trainer.loop",
    "resilient.rank",
)
"""What `python -m trainer` imports lazily in main(): importing them is most of a rank's start-up."""
MEGATRON_LM_IMPORTS = ("torch", "megatron.core", "megatron.training", "trainer.megatron_lm.wrapper")
"""What `python -m trainer.megatron_lm SCRIPT` imports besides the script's own top-level imports."""
_PAGE = os.sysconf("SC_PAGE_SIZE")


def park_argv(argv: list[str], python: str, extra: Iterable[str] = ()) -> tuple[list[str] | None, str]:
    """The command of a spare for rank command `argv`, or None with the reason no spare can run it."""
    if not argv or argv[0] != python:
        return None, f"rank command {argv[:1]} is not this interpreter ({python}): spawned cold"
    if len(argv) >= 4 and argv[1:3] == ["-m", "trainer.megatron_lm"]:
        imports = [*MEGATRON_LM_IMPORTS, *(script_imports(Path(argv[3])) if Path(argv[3]).is_file() else [])]
        script: list[str] = []
        what = f"Megatron-LM script {argv[3]}"
    elif len(argv) >= 3 and argv[1] == "-m":
        imports = (
            list(OWN_TRAINER_IMPORTS)
            if argv[2] == "trainer"
            else [*module_imports(argv[2]), argv[2].rpartition(".")[0]]
        )
        script = []
        what = f"module {argv[2]}"
    elif len(argv) >= 2 and not argv[1].startswith("-") and Path(argv[1]).is_file():
        imports, script, what = script_imports(Path(argv[1])), ["--script", argv[1]], f"script {argv[1]}"
    else:
        return None, f"interpreter options {argv[1:2]} are not supported by spares: spawned cold"
    modules = [m for m in dict.fromkeys([*imports, *extra]) if m]
    cmd = [python, "-m", "resilient.rank.park", *script]
    for m in modules:
        cmd += ["--import", m]
    return cmd, f"{what} parked with {len(modules)} warm imports"


def script_imports(path: Path) -> list[str]:
    """Absolute modules a script imports at its top level (importing the script itself would run it)."""
    try:
        tree = ast.parse(path.read_text(), str(path))
    except (OSError, SyntaxError, ValueError):
        return []
    out = []
    for node in tree.body:
        if isinstance(node, ast.Import):
            out += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            out.append(node.module)
    return out


def module_imports(name: str) -> list[str]:
    """A `-m` module's top-level imports, read from its source without running it."""
    import importlib.util

    try:
        spec = importlib.util.find_spec(name)
    except (ImportError, ValueError):
        return []
    if spec is None or not spec.origin or not spec.origin.endswith(".py"):
        return []
    if spec.submodule_search_locations:  # a package: `-m pkg` runs pkg/__main__.py
        main = Path(spec.origin).parent / "__main__.py"
        return script_imports(main) if main.exists() else []
    return script_imports(Path(spec.origin))


def refill_due(phases: list[str | None], since_spawn_s: float, delay_s: float, *, spare_left: bool) -> tuple[bool, str]:
    """Whether to start the next spares now. `phases`: each local rank's latest heartbeat phase (None: none
    heard yet); `spare_left`: every local rank still has a spare.

    Never before every new rank is stepping: the imports would compete with the restart itself, even at
    idle priority on few cores (ranks that send no heartbeats: `delay_s` after the spawn). Then at once if a
    local rank has no spare left; while one is left, `delay_s` after the spawn (failures cluster after a
    restart, and its first steps then run without imports beside them)."""
    if phases and all(p in ("step", "checkpoint", "eval", "done") for p in phases):
        if spare_left and since_spawn_s < delay_s:
            return False, f"a spare is left: refilled {delay_s:g}s after the spawn"
        return True, "every local rank is stepping"
    if any(p is not None for p in phases):
        return False, "ranks still starting"
    if since_spawn_s >= delay_s:
        return True, f"no heartbeats {since_spawn_s:.1f}s after the ranks were spawned"
    return False, "no heartbeats yet"


def rss_bytes(pid: int) -> int:
    """Resident memory of one process (0 once it is gone)."""
    try:
        with open(f"/proc/{pid}/statm") as f:
            return int(f.read().split()[1]) * _PAGE
    except (OSError, IndexError, ValueError):
        return 0


def is_parked(pid: int) -> bool:
    """Whether `pid` is a spare still waiting for its assignment (its stdin is the assignment pipe)."""
    try:
        return os.readlink(f"/proc/{pid}/fd/0").startswith("pipe:")
    except OSError:
        return False


@dataclass
class Spare:
    local_rank: int
    proc: subprocess.Popen
    ready_fd: int
    """Read end of the pipe on which the spare says its imports are done."""
    warm: bool = False

    def is_warm(self) -> bool:
        """Whether its imports are done (it said so on its pipe); a spare still importing is not."""
        if not self.warm and select.select([self.ready_fd], [], [], 0)[0]:
            try:
                self.warm = os.read(self.ready_fd, 1) == b"1"
            except OSError:
                pass
        return self.warm

    def close(self) -> None:
        try:
            os.close(self.ready_fd)
        except OSError:
            pass


@dataclass
class Taken:
    """A rank handed to a spare, and whether the spare had finished its imports (warm) when it took it."""

    proc: RankProcess
    warm: bool


class Spares:
    """This node's parked processes, `depth` per local rank: a failure seconds after a restart, while the
    refill still imports, finds the other one warm."""

    def __init__(self, cmd: list[str], run_dir: Path, node: int, depth: int = 1, refill_delay_s: float = 0.0) -> None:
        self.cmd, self.run_dir, self.node, self.depth = cmd, run_dir, node, depth
        self.refill_delay_s = refill_delay_s
        self.parked: dict[int, list[Spare]] = {}
        """Each local rank's spares, oldest first."""
        self._handed_out_at: float | None = None  # an attempt's ranks started then, and no refill since

    def handed_out(self, now: float) -> None:
        """An attempt's ranks were just started (from spares or cold): refill once they step (`refill_due`)."""
        self._handed_out_at = now

    @property
    def refill_pending(self) -> bool:
        return self._handed_out_at is not None

    def refill_if_due(self, now: float, phases: list[str | None], specs: Callable[[], list[RankEnv]]) -> bool:
        """Refill from `specs()` if `refill_due` says so for the ranks' `phases`; whether it refilled."""
        if self._handed_out_at is None:
            return False
        due, _ = refill_due(phases, now - self._handed_out_at, self.refill_delay_s, spare_left=self.left(len(phases)))
        if due:
            self._handed_out_at = None
            self.fill(specs())
        return due

    def fill(self, specs: list[RankEnv]) -> int:
        """Start spares until every local rank in `specs` has `depth`; call from the main thread
        (PR_SET_PDEATHSIG follows the forking thread). Returns how many were started."""
        self._reap()
        log = RunDir(self.run_dir).logs / f"spares.node{self.node}.log"
        started = 0
        for spec in specs:
            pool = self.parked.setdefault(spec.local_rank, [])
            while len(pool) < self.depth:
                spare = self._start(spec, log)
                if spare is None:
                    return started
                pool.append(spare)
                started += 1
        return started

    def _start(self, spec: RankEnv, log: Path) -> Spare | None:
        try:
            fd = open_log(self.run_dir, log)
        except StorageFault as err:
            print(f"resilient: node {self.node}: no spare: {err}", file=sys.stderr)
            return None
        ready_r, ready_w = os.pipe2(os.O_CLOEXEC)
        try:
            proc = subprocess.Popen(
                self.cmd,
                env={**rank_environ(spec, self.cmd), PARK_READY_FD: str(ready_w)},
                stdin=subprocess.PIPE,
                stdout=fd,
                stderr=subprocess.STDOUT,
                process_group=0,
                close_fds=True,
                pass_fds=(ready_w,),
            )
        except OSError as err:
            print(f"resilient: node {self.node}: cannot start a spare: {err}", file=sys.stderr)
            os.close(ready_r)
            return None
        finally:
            os.close(fd)
            os.close(ready_w)
        return Spare(spec.local_rank, proc, ready_r)

    def take(self, spec: RankEnv, argv: list[str]) -> Taken | None:
        """Hand rank `spec` to one of its spares (a warm one first, the oldest first); None when there is
        none left alive: spawn cold then."""
        pool = self.parked.get(spec.local_rank, [])
        for spare in [s for s in pool if s.proc.poll() is not None]:
            pool.remove(spare)
            _discard(spare)
        if not pool:
            return None
        spare = next((s for s in pool if s.is_warm()), pool[0])
        pool.remove(spare)
        warm = spare.is_warm()
        spare.close()
        assert spec.run_dir is not None
        log = log_path(spec)
        # created here, a regular file: the spare appends to it without following links
        os.close(open_log(spec.run_dir, log))
        line = json.dumps({"environ": rank_environ(spec, argv), "argv": argv, "log": str(log)}) + "\n"
        assert spare.proc.stdin is not None
        try:
            spare.proc.stdin.write(line.encode())
            spare.proc.stdin.close()
        except OSError:  # BrokenPipe: it died meanwhile
            _kill(spare.proc)
            return None
        spare.proc.stdin = None
        return Taken(RankProcess(spec, spare.proc, os.pidfd_open(spare.proc.pid), time.monotonic()), warm)

    def all(self) -> list[Spare]:
        return [s for pool in self.parked.values() for s in pool]

    def rss_bytes(self) -> int:
        return sum(rss_bytes(s.proc.pid) for s in self.all())

    def left(self, local_ranks: int) -> bool:
        """Whether every one of `local_ranks` local ranks still has a parked spare."""
        return all(self.parked.get(local) for local in range(local_ranks))

    def warm_count(self) -> int:
        """Spares whose imports are done."""
        return sum(s.is_warm() for s in self.all())

    def summary(self) -> dict[str, int]:
        """What status.json and the metrics say of this node's spares."""
        return {"count": len(self), "warm": self.warm_count(), "rss_bytes": self.rss_bytes()}

    def __len__(self) -> int:
        return len(self.all())

    def _reap(self) -> None:
        for local, pool in self.parked.items():
            for spare in [s for s in pool if s.proc.poll() is not None]:
                print(
                    f"resilient: node {self.node}: spare for local rank {local} exited "
                    f"{spare.proc.returncode}; starting another",
                    file=sys.stderr,
                )
                pool.remove(spare)
                _discard(spare)

    def close(self) -> None:
        """Kill every spare (and whatever it started) and reap it."""
        for spare in self.all():
            _discard(spare)
        self.parked.clear()


def _discard(spare: Spare) -> None:
    _kill(spare.proc)
    spare.close()


def _kill(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    if proc.stdin is not None:
        try:
            proc.stdin.close()
        except OSError:
            pass
    proc.wait()
