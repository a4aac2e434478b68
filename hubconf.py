"""torch.hub entry points: ``torch.hub.load("<this repo>", "deeplabv2_resnet101", weights="final.pt")``, or in
the reference's (kazuto1011/deeplab-pytorch) style ``..., pretrained="cocostuff164k", n_classes=182)``.

Only torch is needed: the model code lives in ``deeplab.models``, which imports nothing else. ``pretrained=``
downloads through ``deeplab.download``, which also needs this project's requirements (requests, tqdm, pydantic).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

dependencies = ["torch"]

# The reference's class count for a model built without weights.
DEFAULT_N_CLASSES = 182


def deeplabv2_resnet101(pretrained: str | None = None, n_classes: int | None = None,
                        scales: Sequence[float] | None = None, weights: str | Path | None = None,
                        base_url: str | None = None, **kwargs: Any) -> Any:
    """DeepLab v2 ResNet-101 (output stride 8, ASPP rates 6/12/18/24 summed) inside the multi-scale wrapper:
    in eval mode it returns the max over the 1x and ``scales`` logits, (N, n_classes, ~H/8, ~W/8), for
    BGR mean-subtracted input (``deeplab.loader.to_input``).

    ``pretrained``: as in the reference, one of its released weights, ``cocostuff164k``, ``cocostuff10k``
    (182 classes) or ``voc12`` (21), downloaded once (resumed, retried, size and SHA-256 recorded on the first
    download) into ``torch.hub.get_dir()/checkpoints``, from ``base_url`` if given (a mirror serving the
    release's file names). ``n_classes`` defaults to the release's and must match it; the model is returned
    in train mode, as the reference returns it (call ``.eval()`` for inference).

    ``weights``: a weights file loaded strictly: every tensor must fit, including the head (a file for another
    class count is an error). A file written by the train stage carries its model config, so ``weights`` alone
    builds the right model; its metadata (class names, input mean) is ``model.meta``. ``n_classes`` or
    ``kwargs`` that contradict it are an error; ``scales`` (an inference choice) replaces the trained ones.
    A plain state dict (or ``{"model": state dict}``) takes ``n_classes`` from its head unless given, and
    ``kwargs`` for ``deeplab.models.build_model`` (``n_blocks``, ``width``, ``atrous_rates``) for smaller
    variants; ``scales`` defaults to (0.5, 0.75). Returned in eval mode. Without ``weights`` or
    ``pretrained``: a fresh model (``n_classes`` default 182 as in the reference, eval mode, ``model.meta``
    None)."""
    if pretrained is not None:
        if weights is not None:
            raise TypeError("deeplabv2_resnet101: give pretrained= (a released name) or weights= (a file), not both")
        import torch

        from deeplab.download import RELEASED, fetch_released

        if pretrained not in RELEASED:
            raise ValueError(f"pretrained={pretrained!r}: not a released model (known: {', '.join(RELEASED)})")
        release_classes = RELEASED[pretrained][1]
        if n_classes is not None and n_classes != release_classes:
            raise ValueError(f"pretrained={pretrained!r} has {release_classes} classes, n_classes={n_classes} given")
        weights = fetch_released(pretrained, Path(torch.hub.get_dir()) / "checkpoints", base_url)
        n_classes = release_classes
    model = _load("deeplabv2", n_classes, weights, scales, None, kwargs)
    return model if pretrained is not None else model.eval()


# DeepLab v3 / v3+ (model.arch deeplabv3 / deeplabv3plus), loaded by the same rules as deeplabv2_resnet101.
def deeplabv3_resnet101(n_classes: int | None = None, weights: str | Path | None = None,
                        scales: Sequence[float] | None = None, output_stride: int | None = None,
                        **kwargs: Any) -> Any:
    """DeepLab v3 ResNet-101 (torchvision-style backbone, multi-grid 1/2/4, ASPP with image pooling) inside the
    multi-scale wrapper: in eval mode (N, n_classes, ~H/os, ~W/os) logits at ``output_stride`` (8 or 16).

    Input: ``deeplab.loader.to_input(rgb, model.meta["mean_bgr"], model.meta["normalization"])`` for a file
    written by train (its metadata says how the network was fed: ``imagenet`` or ``caffe``). Arguments as
    ``deeplabv2_resnet101``; ``output_stride`` defaults to the file's, else 16; ``kwargs``: ``n_blocks``,
    ``width``, ``atrous_rates``. A file of another arch is an error naming the entry that loads it (for
    ``deeplabv2_resnet101`` too)."""
    return _v3_family("deeplabv3", n_classes, weights, scales, output_stride, kwargs)


def deeplabv3plus_resnet101(n_classes: int | None = None, weights: str | Path | None = None,
                            scales: Sequence[float] | None = None, output_stride: int | None = None,
                            **kwargs: Any) -> Any:
    """DeepLab v3+ ResNet-101: the v3 encoder plus the decoder on the stride-4 features; logits come at the
    input size. Input and arguments as ``deeplabv3_resnet101``."""
    return _v3_family("deeplabv3plus", n_classes, weights, scales, output_stride, kwargs)


def _v3_family(arch: str, n_classes: int | None, weights: str | Path | None, scales: Sequence[float] | None,
               output_stride: int | None, kwargs: dict) -> Any:
    return _load(arch, n_classes, weights, scales, output_stride, kwargs).eval()


# The head tensor whose rows are the classes, per arch: a plain state dict's class count.
HEADS = {"deeplabv2": "base.aspp.c0.bias", "deeplabv3": "base.classifier.bias", "deeplabv3plus": "base.classifier.bias"}


def _load(arch: str, n_classes: int | None, weights: str | Path | None, scales: Sequence[float] | None,
          output_stride: int | None, kwargs: dict) -> Any:
    """The ``arch`` model a hub entry returns: from a weights file's metadata, else from the arguments, with the
    file's tensors loaded strictly."""
    from deeplab.models import build_from_metadata, build_model, conflicts, load_state, read_weights_file

    entry = f"{arch}_resnet101"
    unknown = sorted(set(kwargs) - {"n_blocks", "width", "atrous_rates"})
    if unknown:
        raise TypeError(f"{entry}: unexpected argument(s) {', '.join(unknown)}")
    # As model.scales in a params file: a scale of 0 or below (or NaN) would fail only at the first forward.
    if scales is not None and not all(isinstance(x, (int, float)) and 0 < x < float("inf") for x in scales):
        raise ValueError(f"{entry}: scales must be positive numbers, got {list(scales)}")
    state, meta = read_weights_file(weights) if weights is not None else ({}, None)
    if meta is None:
        head = state.get(HEADS[arch])
        if n_classes is None:
            n_classes = int(head.shape[0]) if head is not None else DEFAULT_N_CLASSES
        stride = 8 if arch == "deeplabv2" else 16 if output_stride is None else output_stride
        model = build_model(n_classes, scales=(0.5, 0.75) if scales is None else scales, arch=arch,
                            output_stride=stride, **kwargs)
    else:
        if meta["arch"] != arch:
            raise ValueError(f"{weights}: the file holds a {meta['arch']} network: load it with "
                             f"{meta['arch']}_resnet101")
        clash = conflicts(meta, n_classes=n_classes, output_stride=output_stride, **kwargs)
        if clash:
            detail = "; ".join(f"{k}={given} given, the file's metadata says {k}={have}" for k, have, given in clash)
            raise ValueError(f"{weights}: {detail} (leave them out to use the file's)")
        model = build_from_metadata(meta, scales)
    model.meta = meta  # class names, input mean and normalization for the caller (None for a plain state dict)
    if weights is not None:
        fresh = load_state(model, state, weights)
        if fresh:
            head = state.get(fresh[0])
            have = f"{head.shape[0]} classes" if head is not None else f"no {fresh[0]}"
            raise ValueError(f"{weights}: the head does not fit n_classes={n_classes} (the file has {have})")
    return model
