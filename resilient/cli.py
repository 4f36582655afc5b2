"""The `resilient` command line: one typer app; each component registers its own commands."""

from __future__ import annotations

import sys
import warnings

import typer

from resilient.core.errors import ResilientError

app = typer.Typer(
    name="resilient",
    help="Fault-tolerant megatron-core pretraining: run, supervise, launch on Slurm, inspect.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)


def _register_all() -> None:
    # Each component owns its commands; imported here so `resilient --help` lists them all.
    from resilient.health_commands import register as register_health
    from resilient.chaos.commands import register as register_chaos
    from resilient.metrics.commands import register as register_metrics
    from resilient.slurm.commands import register as register_slurm
    from resilient.supervisor.commands import register as register_supervisor
    from trainer.checkpoint.commands import register as register_ckpt
    from trainer.data.commands import register as register_data

    for register in (register_supervisor, register_slurm, register_ckpt, register_data,
                     register_health, register_metrics, register_chaos):
        register(app)


def main() -> None:
    """Console entry point: expected failures print one line and exit with their code."""
    # megatron-core warns at import about optional fused kernels; operators need none of it.
    warnings.filterwarnings("ignore", category=UserWarning)
    warnings.filterwarnings("ignore", category=FutureWarning)
    _register_all()
    try:
        code = app(standalone_mode=False)  # click returns the code of a typer.Exit here
    except ResilientError as err:
        print(f"resilient: {err.one_line()}", file=sys.stderr)
        sys.exit(int(err.exit_code))
    except typer.Exit as ex:
        sys.exit(ex.exit_code)
    except typer.Abort:
        sys.exit(130)
    except Exception as err:  # click usage errors
        import click

        if isinstance(err, click.ClickException):
            err.show()
            sys.exit(err.exit_code)
        raise
    sys.exit(code if isinstance(code, int) else 0)


if __name__ == "__main__":
    main()
