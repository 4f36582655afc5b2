"""CLI commands of this component."""

import typer


def register(app: typer.Typer) -> None:
    """Add this component's commands to the `resilient` app."""
