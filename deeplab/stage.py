"""How a stage command runs: logging to stderr, and expected failures shown as one clear line."""

from __future__ import annotations

import functools
import logging
import os
import signal
import subprocess
import sys
from collections.abc import Callable
from typing import Any

import typer

from deeplab.config import ParamsError
from deeplab.data import DataError
from deeplab.tracking import Terminated

EXPECTED = (ParamsError, DataError, FileNotFoundError, ValueError, RuntimeError)


def command(fn: Callable[..., Any]) -> typer.Typer:
    """Wrap a stage function as a typer app whose known errors exit 1 with a message, not a traceback."""
    # Plain click help: typer's rich panels print a <bool> placeholder after flags, as if they took a value.
    app = typer.Typer(add_completion=False, pretty_exceptions_enable=False, rich_markup_mode=None)

    @app.command(help=fn.__doc__)
    @functools.wraps(fn)
    def run(*args: Any, **kwargs: Any) -> None:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", stream=sys.stderr)
        try:
            fn(*args, **kwargs)
        except EXPECTED as e:
            typer.echo(f"error: {e}", err=True)
            raise typer.Exit(1) from None
        except Terminated as e:
            # The MLflow run is closed (KILLED); now end by the signal itself, as dvc or a shell expects.
            signal.signal(e.signum, signal.SIG_DFL)
            os.kill(os.getpid(), e.signum)
            raise SystemExit(128 + e.signum) from None

    return app


def under_torchrun() -> bool:
    return "LOCAL_RANK" in os.environ


def torchrun(module: str, args: list[str], nproc_per_node: int, nnodes: int = 1,
             rdzv_endpoint: str | None = None) -> None:
    """Run ``python -m module args`` in ``nproc_per_node`` processes per node through torchrun."""
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc_per_node}"]
    if nnodes > 1:
        if not rdzv_endpoint:
            raise ValueError("train.rdzv_endpoint: needed (host:port) when train.nnodes > 1")
        cmd += [f"--nnodes={nnodes}", "--rdzv-backend=c10d", f"--rdzv-endpoint={rdzv_endpoint}",
                f"--rdzv-id={os.environ.get('DVC_EXP_NAME', 'deeplab')}"]
    else:
        cmd.append("--standalone")
    cmd += ["-m", module, *args]
    logging.getLogger(__name__).info("launching %s", " ".join(cmd))
    res = subprocess.run(cmd)
    if res.returncode != 0:
        raise RuntimeError(f"torchrun {module} failed with exit code {res.returncode}")
