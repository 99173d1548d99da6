"""The ``cloudlab`` command line: thin wrappers over library functions.

Each command group lives in its own module and registers itself on :data:`app`.
Modules import heavy libraries (torch, ray, pymatgen) inside the commands so
that ``cloudlab --help`` stays fast. Errors derived from ``CloudlabError`` are
printed as one clear line and exit with status 2.
"""

from __future__ import annotations

import importlib
import sys

import typer

from cloud_model.errors import CloudlabError

app = typer.Typer(
    name="cloudlab",
    help="Closed-loop materials discovery: CLOUD ensembles + BoTorch + lab adapters.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)

# command modules, each calling `register(app)`; listed here so the order of --help is stable
_COMMAND_MODULES = (
    "data",
    "scope",
    "model",
    "lab",
    "campaign",
    "approval",
    "dashboard",
    "bench",
    "generate",
)


@app.callback()
def _root(
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Log at DEBUG level."),
) -> None:
    from loop.cli.live import configure_logging

    configure_logging(verbose)


def _register_commands() -> None:
    for name in _COMMAND_MODULES:
        try:
            module = importlib.import_module(f"loop.cli.{name}")
        except ModuleNotFoundError as exc:
            if exc.name == f"loop.cli.{name}":
                continue  # command group not built yet
            raise
        module.register(app)


_register_commands()


def main() -> None:
    """Console-script entry point."""
    try:
        app()
    except CloudlabError as exc:
        typer.secho(f"error: {exc}", fg=typer.colors.RED, err=True)
        sys.exit(2)
