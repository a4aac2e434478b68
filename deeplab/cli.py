"""The ``deeplab`` command (console script ``deeplab = "deeplab.cli:app"``).

Commands import what they need when they run, so ``deeplab --help`` stays fast (no torch at import).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Literal

import typer

# Plain click help: typer's rich panels print a value placeholder (`--crf <bool>`) even for flags, which take none.
app = typer.Typer(no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False, rich_markup_mode=None)


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


@app.command("predict")
def predict(
    inputs: Annotated[list[Path], typer.Argument(help="Image files and/or folders of images (not recursive).",
                                                 show_default=False)],
    model: Annotated[Path, typer.Option(
        "--model", "-m", show_default=False,
        help="Weights: data/models/final.pt (it records its model, class names and input mean), a state dict "
             "(.pt/.pth: a converted caffemodel, a checkpoint holding {'model': ...}) or a .caffemodel with a head "
             "for the class count.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder for <stem>_label.png and <stem>_overlay.png.")]
    = Path("predictions"),
    crf: Annotated[bool, typer.Option("--crf", help="Refine with the dense CRF (crf.* from the params).")] = False,
    dataset: Annotated[str | None, typer.Option(
        help="Class names of this dataset (synthetic, voc12, cocostuff10k, cocostuff164k, coco21); when it differs "
             "from the params, also its class count unless --n-classes.", show_default=False)] = None,
    n_classes: Annotated[int | None, typer.Option(
        help="Class count of the weights' head (weights written by train know theirs).", show_default=False)]
    = None,
    params: Annotated[Path | None, typer.Option(
        help="Params file giving the architecture (model.*), dataset, class count and CRF settings; for weights "
             "written by train only crf.* and logits.amp (the rest is in the file). Default: params.yaml if it "
             "exists, else the built-in defaults (ResNet-101). A params file must hold every section.",
        show_default=False)] = None,
    max_size: Annotated[int | None, typer.Option(
        min=1, help="Shrink images whose long side exceeds this before the network (and CRF); labels come back "
                    "at full size. Default: none (any size runs).", show_default=False)] = None,
    device: Annotated[Literal["auto", "cpu", "cuda"], typer.Option(help="auto: CUDA if available.")] = "auto",
) -> None:
    """Segment images with the multi-scale model (as in evaluation): a colour label PNG and an overlay with a
    legend per image. Exits 1 if any input failed (each is named on stderr); the others are still written."""
    from deeplab.config import ParamsError
    from deeplab.data import DataError
    from deeplab.predict import predict_images

    try:
        failed = predict_images(inputs, model, out, params=params, dataset=dataset, n_classes=n_classes, crf=crf,
                                max_size=max_size, device=device, echo=typer.echo,
                                warn=lambda m: typer.echo(f"error: {m}", err=True))
    except (ParamsError, DataError, FileNotFoundError, ValueError, RuntimeError) as e:
        raise _fail(str(e)) from None
    if failed:
        typer.echo(f"{failed} input(s) failed", err=True)
        raise typer.Exit(1)
