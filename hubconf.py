"""torch.hub entry points: ``torch.hub.load("<this repo>", "deeplabv2_resnet101", weights="final.pt")``.

Only torch is needed: the model code lives in ``deeplab.models``, which imports nothing else.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

dependencies = ["torch"]


def deeplabv2_resnet101(n_classes: int | None = None, weights: str | Path | None = None,
                        scales: Sequence[float] | None = None, **kwargs: Any) -> Any:
    """DeepLab v2 ResNet-101 (output stride 8, ASPP rates 6/12/18/24 summed) inside the multi-scale wrapper:
    in eval mode it returns the max over the 1x and ``scales`` logits, (N, n_classes, ~H/8, ~W/8), for
    BGR mean-subtracted input (``deeplab.loader.to_input``).

    ``weights``: a weights file loaded strictly: every tensor must fit, including the head (a file for another
    class count is an error). A file written by the train stage carries its model config, so ``weights`` alone
    builds the right model; its metadata (class names, input mean) is ``model.meta``. ``n_classes`` or
    ``kwargs`` that contradict it are an error; ``scales`` (an inference choice) replaces the trained ones.
    A plain state dict (or ``{"model": state dict}``) needs them given: ``n_classes`` (default 21) and
    ``kwargs`` for ``deeplab.models.build_model`` (``n_blocks``, ``width``, ``atrous_rates``) for smaller
    variants; ``scales`` defaults to (0.5, 0.75). Without ``weights``: that fresh model (``model.meta`` None)."""
    from deeplab.models import build_from_metadata, build_model, conflicts, load_state, read_weights_file

    unknown = sorted(set(kwargs) - {"n_blocks", "width", "atrous_rates"})
    if unknown:
        raise TypeError(f"deeplabv2_resnet101: unexpected argument(s) {', '.join(unknown)}")
    state, meta = read_weights_file(weights) if weights is not None else ({}, None)
    if meta is None:
        n_classes = 21 if n_classes is None else n_classes
        model = build_model(n_classes, scales=(0.5, 0.75) if scales is None else scales, **kwargs)
    else:
        clash = conflicts(meta, n_classes=n_classes, **kwargs)
        if clash:
            detail = "; ".join(f"{k}={given} given, the file's metadata says {k}={have}" for k, have, given in clash)
            raise ValueError(f"{weights}: {detail} (leave them out to use the file's)")
        model = build_from_metadata(meta, scales)
    model.meta = meta  # class names and input mean for the caller (None for a plain state dict)
    if weights is not None:
        fresh = load_state(model, state, weights)
        if fresh:
            head = state.get(fresh[0])
            have = f"{head.shape[0]} classes" if head is not None else f"no {fresh[0]}"
            raise ValueError(f"{weights}: the ASPP head does not fit n_classes={n_classes} (the file has {have})")
    return model.eval()
