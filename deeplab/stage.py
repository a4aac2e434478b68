"""How a stage command runs: logging to stderr, and expected failures shown as one clear line."""

from __future__ import annotations

import functools
import logging
import sys
from collections.abc import Callable
from typing import Any

import typer

from deeplab.config import ParamsError
from deeplab.data import DataError

EXPECTED = (ParamsError, DataError, FileNotFoundError, ValueError, RuntimeError)


def command(fn: Callable[..., Any]) -> typer.Typer:
    """Wrap a stage function as a typer app whose known errors exit 1 with a message, not a traceback."""
    app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)

    @app.command(help=fn.__doc__)
    @functools.wraps(fn)
    def run(*args: Any, **kwargs: Any) -> None:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", stream=sys.stderr)
        try:
            fn(*args, **kwargs)
        except EXPECTED as e:
            typer.echo(f"error: {e}", err=True)
            raise typer.Exit(1) from None

    return app
