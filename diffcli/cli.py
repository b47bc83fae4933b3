"""The Typer app: parse options, call one core function, print. No tensor maths here.

Conventions (documented in the README): results go to stdout, logs and progress to stderr; library
errors are DiffcliError subclasses, turned into one `Error: ...` line and their exit code.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Callable, List, Optional, TypeVar

import typer

from diffcli import __version__
from diffcli.errors import DiffcliError

app = typer.Typer(
    name="diffcli",
    help="Train and sample diffusion transformers (DiT) on your own images.",
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)

T = TypeVar("T")


def _err(message: str) -> None:
    print(f"Error: {message}", file=sys.stderr)


def run_core(fn: Callable[[], T]) -> T:
    """Run a core call; map library exceptions to `Error: ...` and the class's exit code."""
    try:
        return fn()
    except DiffcliError as e:
        if os.environ.get("DIFFCLI_DEBUG"):
            raise
        _err(str(e))
        raise typer.Exit(e.exit_code)
    except KeyboardInterrupt:
        _err("interrupted")
        raise typer.Exit(130)


def version_callback(value: bool) -> None:
    if value:
        print(f"diffcli {__version__}")
        raise typer.Exit(0)


@app.callback()
def root(
    version: bool = typer.Option(
        False, "--version", help="Print the version and exit.", callback=version_callback, is_eager=True
    ),
) -> None:
    """Train and sample diffusion transformers (DiT) on your own images.

    Results go to stdout, logs and progress to stderr. Exit codes: 0 ok, 1 runtime failure,
    2 usage error, 3 output exists, 4 bad or missing input, 130 interrupted.
    Set DIFFCLI_DEBUG=1 to see tracebacks.
    """


# --------------------------------------------------------------------------------------------------
# inspect-schedule
# --------------------------------------------------------------------------------------------------
# (filled in below)


# --------------------------------------------------------------------------------------------------
# sample
# --------------------------------------------------------------------------------------------------


@app.command()
def sample() -> None:
    """Turn noise into PNGs with a trained model (not yet available)."""
    _err("`diffcli sample` is not available yet")
    raise typer.Exit(1)


# --------------------------------------------------------------------------------------------------
# train
# --------------------------------------------------------------------------------------------------


@app.command()
def train() -> None:
    """Train a diffusion transformer on a folder of images (not yet available)."""
    _err("`diffcli train` is not available yet")
    raise typer.Exit(1)


def main() -> None:
    try:
        app(standalone_mode=True)
    except KeyboardInterrupt:
        _err("interrupted")
        sys.exit(130)
