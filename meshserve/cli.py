"""The `meshserve` command: one Typer app; each subcommand is a thin door over the library."""

from __future__ import annotations

import sys

import typer

from meshserve.errors import InputError
from meshserve.wafer.cli import app as wafer_app

app = typer.Typer(
    help="meshserve: serve MoE/dense LLMs and plan expert-parallel deployment on wafer-scale chips.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
app.add_typer(wafer_app, name="wafer", help="Wafer-scale MoE simulator and planner (MoEntwine).")


@app.command()
def demo(out: str = typer.Option("out", help="Folder for plots and JSON results.")) -> None:
    """The main job on the embedded defaults: the wafer communication comparison, with plots."""
    from meshserve.demo import run_demo

    run_demo(out)


def main() -> None:
    """Console entry point: bad input becomes one line on stderr and exit code 2, no traceback."""
    try:
        app()
    except InputError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
