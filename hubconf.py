"""torch.hub entry points: ``torch.hub.load("<this repo>", "deeplabv2_resnet101", n_classes=21, weights=...)``.

Only torch is needed: the model code lives in ``deeplab.models``, which imports nothing else.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

dependencies = ["torch"]


def deeplabv2_resnet101(n_classes: int = 21, weights: str | Path | None = None,
                        scales: Sequence[float] = (0.5, 0.75), **kwargs: Any) -> Any:
    """DeepLab v2 ResNet-101 (output stride 8, ASPP rates 6/12/18/24 summed) inside the multi-scale wrapper:
    in eval mode it returns the max over the 1x and ``scales`` logits, (N, n_classes, ~H/8, ~W/8), for
    BGR mean-subtracted input (``deeplab.loader.to_input``).

    ``weights``: a state-dict file (plain, or a checkpoint holding it under ``model``) loaded strictly: every
    tensor must fit, including the head (a weights file for another class count is an error). ``kwargs`` go
    to ``deeplab.models.build_model`` (``n_blocks``, ``width``, ``atrous_rates``) for smaller variants."""
    from deeplab.models import build_model, load_weights, read_state_dict

    model = build_model(n_classes, scales=scales, **kwargs)
    if weights is not None:
        fresh = load_weights(model, weights)
        if fresh:
            head = read_state_dict(weights).get(fresh[0])
            have = f"{head.shape[0]} classes" if head is not None else f"no {fresh[0]}"
            raise ValueError(f"{weights}: the ASPP head does not fit n_classes={n_classes} (the file has {have})")
    return model.eval()
