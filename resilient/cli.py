"""The `resilient` command line: one typer app; each component registers its own commands.

Registration is lazy: a command's module (and whatever it imports: torch, megatron-core, the
pydantic config) is imported only when that command runs, so `status`, `ckpt list`, `report` and
`--help` answer at once. COMMANDS lists each top-level command, the module whose `register(app)`
adds it, and its one-line help for `resilient --help` (tests keep both in step with the modules).
"""

from __future__ import annotations

import importlib
import sys
import warnings
from typing import Any

import typer
import typer.core
import typer.main

from resilient.core.errors import ResilientError

COMMANDS: dict[str, tuple[str, str]] = {
    "run": (
        "resilient.supervisor.commands",
        "Train on this machine: one supervisor (node 0 of 1) spawning supervisor.nproc_per_node ranks.",
    ),
    "supervise": (
        "resilient.supervisor.commands",
        "Supervise this node's ranks as one node of a multi-node job (one per node, e.g. under srun).",
    ),
    "status": (
        "resilient.status",
        "Show a run's state, attempt, step, checkpoint, ranks and last failure (from RUN_DIR/status.json).",
    ),
    "report": (
        "resilient.report.commands",
        "Write one self-contained HTML report: loss, throughput/MFU, step time per rank, timeline, goodput.",
    ),
    "launch": ("resilient.slurm.commands", "Validate the config, render the sbatch script into RUN_DIR and submit it."),
    "slurm": ("resilient.slurm.commands", "Slurm helpers used by the batch script."),
    "ckpt": (
        "trainer.checkpoint.commands",
        "Inspect, check and repair checkpoints (DIR: RUN_DIR, RUN_DIR/checkpoints or a Megatron-LM save directory).",
    ),
    "data": ("trainer.data.commands", "Prepare (pre-tokenize) and inspect C4-format training data."),
    "health": (
        "resilient.health_commands",
        "Node health: GPUs (NVML), checkpoint disk, memory, /dev/shm, collectives.",
    ),
    "plan": (
        "resilient.metrics.commands",
        "Parameters, memory per GPU, checkpoint cost, Young/Daly checkpoint intervals, spare nodes and "
        "predicted goodput.",
    ),
    "chaos": (
        "resilient.chaos.commands",
        "Run CONFIG under a seeded fault schedule, relaunching after preemption, supervisor death and "
        "unhealthy-node exits like a requeue; print a JSON report; exit 1 when a check failed.",
    ),
}


def load_command(name: str) -> Any:
    """Import the module that owns `name` and return its click command."""
    if name not in COMMANDS:
        return None
    sub = typer.Typer()
    importlib.import_module(COMMANDS[name][0]).register(sub)
    return typer.main.get_group(sub).commands.get(name)


class LazyGroup(typer.core.TyperGroup):
    """Lists COMMANDS without importing them; imports one only to run it (or show its own help)."""

    _listing = False

    def list_commands(self, ctx: Any) -> list[str]:
        return list(COMMANDS)

    def get_command(self, ctx: Any, cmd_name: str) -> Any:
        if cmd_name in COMMANDS and self._listing:  # the top-level help needs names and help lines only
            return typer.core.TyperCommand(cmd_name, help=COMMANDS[cmd_name][1])
        return load_command(cmd_name)

    def format_help(self, ctx: Any, formatter: Any) -> None:
        self._listing = True
        try:
            super().format_help(ctx, formatter)
        finally:
            self._listing = False


app = typer.Typer(
    name="resilient",
    cls=LazyGroup,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)


@app.callback()
def _root() -> None:
    """Fault-tolerant megatron-core pretraining: run, supervise, launch on Slurm, inspect."""


def main() -> None:
    """Console entry point: expected failures print one line and exit with their code."""
    # megatron-core warns at import about optional fused kernels; operators need none of it.
    warnings.filterwarnings("ignore", category=UserWarning)
    warnings.filterwarnings("ignore", category=FutureWarning)
    try:
        code = app(standalone_mode=False)  # click returns the code of a typer.Exit here
    except ResilientError as err:
        print(f"resilient: {err.one_line()}", file=sys.stderr)
        sys.exit(int(err.exit_code))
    except typer.Exit as ex:
        sys.exit(ex.exit_code)
    except typer.Abort:
        sys.exit(130)
    except typer.TyperException as err:  # usage errors (typer's own click)
        err.show()
        sys.exit(err.exit_code)
    sys.exit(code if isinstance(code, int) else 0)


if __name__ == "__main__":
    main()
