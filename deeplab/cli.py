"""The ``deeplab`` command (console script ``deeplab = "deeplab.cli:app"``).

Commands import what they need when they run, so ``deeplab --help`` stays fast (no torch at import).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

app = typer.Typer(no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False)


@app.callback()
def main() -> None:
    """DeepLab v2 semantic segmentation tools."""


def _fail(message: str) -> typer.Exit:
    typer.echo(f"error: {message}", err=True)
    return typer.Exit(1)


@app.command("caffe-inspect")
def caffe_inspect(
    file: Annotated[Path, typer.Argument(help="A .caffemodel file.", show_default=False)],
    as_json: Annotated[bool, typer.Option("--json", help="Print a JSON list of {name, type, blobs}.")] = False,
) -> None:
    """List the layers of a Caffe model: name, type and blob shapes, in file order."""
    from deeplab.caffe import CaffeError, read_caffemodel

    try:
        layers = read_caffemodel(file)
    except CaffeError as e:
        raise _fail(str(e)) from None
    except OSError as e:  # not found, a directory, no permission
        raise _fail(f"{file}: {e.strerror or e}") from None

    if as_json:
        typer.echo(json.dumps([{"name": layer.name, "type": layer.type, "blobs": [list(b.shape) for b in layer.blobs]}
                               for layer in layers]))
        return
    name_w = max(len(layer.name) for layer in layers)
    type_w = max(len(layer.type) for layer in layers)
    for layer in layers:
        shapes = "  ".join("x".join(map(str, b.shape)) or "scalar" for b in layer.blobs) or "-"
        typer.echo(f"{layer.name:<{name_w}}  {layer.type:<{type_w}}  {shapes}")
    n_values = sum(b.size for layer in layers for b in layer.blobs)
    n_weighted = sum(1 for layer in layers if layer.blobs)
    typer.echo(f"{len(layers)} layers, {n_weighted} with weights, {n_values:,} values")
