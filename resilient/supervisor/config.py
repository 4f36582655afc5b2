"""Supervisor configuration (owned by the supervisor package)."""

import enum
import itertools
import re
import signal
import sys
from pathlib import Path

from pydantic import Field, field_validator, model_validator

from resilient.core.configbase import Section

PLACEHOLDERS = ("config", "run_dir", "python")
_PLACEHOLDER = re.compile(r"\{([^{}]*)\}")


def save_dir_of(argv: list[str]) -> Path | None:
    """The directory a Megatron-LM command line saves to (`--save DIR` / `--save=DIR`), with `{run_dir}/`
    made relative to the run directory; None when it names none."""
    value = next((b for a, b in itertools.pairwise(argv) if a == "--save"), None)
    value = value or next((a.partition("=")[2] for a in argv if a.startswith("--save=")), None)
    if not value:
        return None
    return Path(value.removeprefix("{run_dir}/")) if value.startswith("{run_dir}/") else Path(value).absolute()


def _default_rank_command() -> list[str]:
    return [sys.executable, "-m", "trainer", "--config", "{config}"]


class RankProtocol(enum.StrEnum):
    """How the supervisor learns what a rank is doing."""

    HEARTBEAT = "heartbeat"
    """Ranks use the rank protocol (docs/rank-protocol.md): heartbeats, hang detection, progress."""
    EXIT_ONLY = "exit_only"
    """Any torchrun-style script: crashes by exit, progress from checkpoints, stop by signal."""


class SupervisorConfig(Section):
    """How the per-node supervisor spawns, watches and restarts ranks."""

    nproc_per_node: int = Field(2, ge=1)
    """Ranks spawned on each node (GPUs per node on GPU clusters)."""
    rank_command: list[str] = Field(default_factory=_default_rank_command, min_length=1)
    """Argv of one rank; `{config}` becomes RUN_DIR/config.yaml, `{run_dir}` the run directory and
    `{python}` the supervisor's own interpreter, in every argument. Nothing is appended."""
    rank_protocol: RankProtocol = RankProtocol.HEARTBEAT
    """`heartbeat` (ranks speak the rank protocol) or `exit_only` (any script; see docs/rank-protocol.md)."""
    rank_stop_signal: str | None = None
    """Signal that asks a rank to save and exit (default: SIGUSR1 with heartbeats, SIGTERM in exit_only,
    which Megatron-LM's --exit-signal-handler listens for)."""
    progress_dir: Path | None = None
    """Checkpoint directory whose newest complete step measures exit-only progress and holds the final
    save the supervisor checks (ours or Megatron-LM's format). Default: the rank command's `--save`
    directory (Megatron-LM), else checkpoint.dir, else RUN_DIR/checkpoints; relative: to RUN_DIR."""
    final_save_check: bool | None = None
    """Whether a run ends "finished" only once the final step is in a committed checkpoint in
    `progress_dir` (a refused save then ends the run `storage_fault`, exit 82). Default: on for the own
    trainer; for another script, on once a checkpoint in a format the supervisor reads exists there.
    Set it for a script that saves in such a format, so that a run whose every save was refused is
    caught too."""
    warm_spares: bool = True
    """Keep one parked process per local rank (torch, megatron-core and the rank command's imports loaded,
    no process group yet) that takes the rank of the next attempt instead of a cold start; replenished
    once the new ranks step; costs their resident memory (status.json, resilient_spares_rss_bytes).
    Python rank commands only (`{python} -m MODULE ...` or `{python} SCRIPT ...`)."""
    spares_per_rank: int = Field(2, ge=1, le=4)
    """Parked processes per local rank (with `warm_spares`). Two: a failure seconds after a restart finds
    the second one warm while the one taken is not replaced yet (see `spare_refill_delay_s`; the imports
    take 10-40 s at idle priority next to ranks that keep every core busy). Each costs its resident memory (~0.4 GB with
    torch and megatron-core imported, no CUDA context)."""
    warm_imports: list[str] = Field(default_factory=list)
    """Modules a spare imports besides the defaults (own trainer: torch, megatron.core, its modules;
    another script: its top-level imports)."""
    spare_refill_delay_s: float = Field(15.0, ge=0)
    """Replace the spares a restart took once every local rank reports a step: at once if a local rank has
    none left, else this long after the spawn (failures cluster after a restart: its first steps run
    without the imports beside them). Ranks that send no heartbeats: this long after the spawn."""
    allow_shared_dir: bool = False
    """Use a run or checkpoint directory that another user owns or can write (refused by default: that
    user could plant checkpoints or configs)."""
    store_port: int = Field(29400, ge=0, le=65535)
    """TCP port of the coordination store (the coordinator's host; after the k-th election `store_port + k`;
    `resilient run` picks a free one)."""
    store_timeout_s: float = Field(300.0, gt=0)
    """How long a supervisor waits for the others where that may legitimately take long (the first
    connection, an attempt's barrier behind a slow pre-flight, reports of nodes that hold their lease);
    liveness is `node_lease_s`."""
    poll_interval_s: float = Field(0.25, gt=0, le=1.0)
    """Longest sleep of the watch loop: hang checks and store polls happen at least this often."""
    status_interval_s: float = Field(1.0, gt=0)
    """How often status.json is rewritten."""
    store_ops_budget: float = Field(8000.0, gt=0)
    """Store round trips per second all supervisors together may cost the coordinator's store at steady state;
    large jobs poll and publish status less often to stay within it (see docs/scale.md)."""
    node_lease_s: float = Field(4.0, ge=0.5, le=120.0)
    """Node liveness: every supervisor renews a lease in the store four times per this period; a node whose
    lease is not renewed for this long is lost (frozen, cut off, dead), whatever its ranks are doing, and a
    store call that gets no answer within it means the coordinator is lost (an election follows)."""
    store_max_keys: int = Field(100_000, ge=100)
    """Keys the coordination store holds at most (a write past it is refused and logged)."""
    store_max_bytes: int = Field(512 << 20, ge=1 << 20)
    """Bytes (keys and values) the coordination store holds at most (a write past it is refused and logged)."""

    init_timeout_s: float = Field(600.0, gt=0)
    """A rank may take this long from spawn (or its `init` heartbeat: imports, process groups) to its next
    phase."""
    build_timeout_s: float = Field(1800.0, gt=0)
    """Longest `build` phase (model, optimizer and data pipeline construction) before the rank counts as hung."""
    restore_timeout_s: float = Field(900.0, gt=0)
    """Longest `restore` phase (checkpoint load) before the rank counts as hung."""
    checkpoint_timeout_s: float = Field(900.0, gt=0)
    """Longest `checkpoint` phase (blocking save; calibrated lower once saves were seen), and longest
    `finalize` (waiting for a whole write in flight) or `done` phase, before a hang is declared."""
    eval_timeout_s: float = Field(900.0, gt=0)
    """Longest `eval` phase before a hang is declared."""
    step_timeout_initial_s: float = Field(600.0, gt=0)
    """Step timeout until enough step times were observed to calibrate it, and for each rank's first step of an
    attempt (lazy communicator setup, data-loader workers and compilation make it slower than the rest)."""
    step_timeout_factor: float = Field(5.0, ge=1.0)
    """Calibrated step timeout = factor x the longest recent step time (but at least the floor)."""
    step_timeout_floor_s: float = Field(30.0, gt=0)
    """Smallest calibrated step timeout (absorbs jitter of very short steps)."""
    step_timeout_min_samples: int = Field(5, ge=1)
    """Step times needed before the step timeout is calibrated."""
    step_timeout_window: int = Field(50, ge=1)
    """Recent step times the calibration looks at."""

    done_grace_s: float = Field(20.0, gt=0)
    """Once every local rank reported `done`, how long one may take to exit before it is stopped and the
    attempt counts as finished (the coordinator still requires the final step to be committed)."""
    termination_grace_s: float = Field(10.0, ge=0)
    """After SIGTERM to a rank's process group, wait this long before SIGKILL (ranks left at a clean end or
    when the supervisor stops; the ranks of a failed attempt are SIGKILLed at once)."""
    preempt_signal: str = "SIGUSR2"
    """Signal (besides SIGTERM) that means preemption, e.g. Slurm's `--signal=USR2@120`."""
    preempt_grace_s: float = Field(120.0, gt=0)
    """After a preemption request, ranks get this long to save and exit before SIGKILL."""

    max_restarts: int = Field(10, ge=0)
    """In-job restarts allowed before giving up with RESTART_BUDGET_EXHAUSTED."""
    max_attempts_without_progress: int = Field(3, ge=1)
    """Consecutive failed attempts that completed no step before giving up with NO_PROGRESS."""
    backoff_initial_s: float = Field(1.0, ge=0)
    """Wait before a restart after an attempt that made no progress; doubles with every further restart.
    An attempt that made progress is restarted at once."""
    backoff_max_s: float = Field(60.0, ge=0)
    """Upper bound of the restart backoff."""

    @field_validator("preempt_signal", "rank_stop_signal")
    @classmethod
    def _known_signal(cls, name: str | None) -> str | None:
        if name is not None and name not in signal.Signals.__members__:
            raise ValueError(f"unknown signal {name!r} (e.g. SIGUSR2)")
        return name

    @field_validator("rank_command")
    @classmethod
    def _known_placeholders(cls, argv: list[str]) -> list[str]:
        for arg in argv:
            for name in _PLACEHOLDER.findall(arg):
                if name not in PLACEHOLDERS:
                    raise ValueError(
                        f"unknown placeholder {{{name}}} in {arg!r} (known: "
                        + ", ".join(f"{{{p}}}" for p in PLACEHOLDERS)
                        + ")"
                    )
        return argv

    @model_validator(mode="after")
    def _progress_in_save_dir(self) -> "SupervisorConfig":
        if self.progress_dir is None:
            self.progress_dir = save_dir_of(self.rank_command)
        return self

    def stop_signal(self) -> signal.Signals:
        """The signal that asks a rank to save and exit."""
        if self.rank_stop_signal is not None:
            return signal.Signals[self.rank_stop_signal]
        return signal.SIGTERM if self.rank_protocol is RankProtocol.EXIT_ONLY else signal.SIGUSR1

    @property
    def runs_own_trainer(self) -> bool:
        """Whether the ranks are this project's trainer (`python -m trainer ...`)."""
        return self.rank_command[1:3] == ["-m", "trainer"]

    def rank_argv(self, config: Path, run_dir: Path) -> list[str]:
        """`rank_command` with its placeholders filled in."""
        values = {"config": str(config), "run_dir": str(run_dir), "python": sys.executable}
        return [_PLACEHOLDER.sub(lambda m: values[m.group(1)], arg) for arg in self.rank_command]
