"""ImageNet initialisation from torchvision's ResNet state dict (``torchvision.models.resnet101`` weights, as
torchvision saves them in its hub cache) for either backbone: the torchvision-style one of v3 / v3+ takes its
keys as they are, the Caffe-style one of v2 under the reference's names. The head stays fresh."""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from deeplab.models import is_v2

# torchvision bottleneck parts -> the Caffe-style block's (deeplab.models.Bottleneck).
CAFFE_PART = {"conv1": "reduce.conv", "bn1": "reduce.bn", "conv2": "conv3x3.conv", "bn2": "conv3x3.bn",
              "conv3": "increase.conv", "bn3": "increase.bn", "downsample.0": "shortcut.conv",
              "downsample.1": "shortcut.bn"}
BLOCK_KEY = re.compile(r"layer([1-4])\.(\d+)\.(conv[1-3]|bn[1-3]|downsample\.[01])\.(\w+)")


def layout(state: Mapping[str, torch.Tensor]) -> tuple[tuple[int, ...], int | None]:
    """(blocks per stage, stem width) of a torchvision ResNet state dict."""
    blocks = tuple(len({m[2] for k in state if (m := BLOCK_KEY.fullmatch(k)) and m[1] == str(i)}) for i in range(1, 5))
    stem = state.get("conv1.weight")
    return blocks, (int(stem.shape[0]) if stem is not None else None)


def caffe_name(key: str) -> str | None:
    """Our v2 name of a torchvision backbone key (None: not a backbone key)."""
    if key.startswith(("conv1.", "bn1.")):
        return f"base.layer1.conv1.{'conv' if key.startswith('conv1.') else 'bn'}.{key.split('.', 1)[1]}"
    m = BLOCK_KEY.fullmatch(key)
    if m is None:
        return None
    return f"base.layer{int(m[1]) + 1}.block{int(m[2]) + 1}.{CAFFE_PART[m[3]]}.{m[4]}"


def load_torchvision(model: nn.Module, state: Mapping[str, torch.Tensor], path: str | Path) -> list[str]:
    """Load the backbone of ``model`` (an MSC-wrapped v2, v3 or v3+) from a torchvision ResNet state dict; every
    backbone tensor must come from it with its shape. Returns log lines: what loaded, what was dropped, which
    tensors stay fresh, and (v2) where the stride sits."""
    v2 = is_v2(model)
    own = model.state_dict()
    mapped, dropped = {}, []
    for key, value in state.items():
        name = caffe_name(key) if v2 else (f"base.backbone.{key}" if key.startswith(("conv1.", "bn1.", "layer"))
                                           else None)
        if name is None:
            dropped.append(key)
        else:
            mapped[name] = value
    backbone = [k for k in own if (k.startswith("base.layer") if v2 else k.startswith("base.backbone."))]
    problems = [f"{k}: missing" for k in backbone if k not in mapped]
    problems += [f"{k}: shape {tuple(mapped[k].shape)}, model needs {tuple(own[k].shape)}"
                 for k in backbone if k in mapped and mapped[k].shape != own[k].shape]
    problems += [f"unexpected {k}" for k in mapped if k not in own]
    if problems:
        blocks, width = layout(state)
        raise ValueError(f"{path}: the torchvision weights (n_blocks {list(blocks)}, width {width}) do not fit the "
                         f"model ({len(problems)} problems: {'; '.join(problems[:5])}); set model.n_blocks and "
                         "model.width to the file's (resnet101: [3, 4, 23, 3] and 64)")
    model.load_state_dict(mapped, strict=False)
    fresh = [k for k in own if k not in mapped]
    parts = sorted({".".join(k.split(".")[:2]) for k in fresh})
    lines = [f"backbone: {len(mapped)} tensors from the torchvision ResNet {path}",
             f"dropped from the file (ImageNet classifier): {', '.join(dropped) or 'nothing'}",
             f"fresh (the head, seeded init): {len(fresh)} tensors of {', '.join(parts)}"]
    if v2:
        lines.append("deeplabv2's Caffe-style backbone strides the first 1x1 conv (reduce) of res3, while "
                     "torchvision's weights were trained with the stride on the 3x3 (conv2), and its max pool "
                     "rounds up: the tensors load, the features differ from torchvision's, training adapts them "
                     "(model.arch deeplabv3 / deeplabv3plus use torchvision's placement)")
    return lines
