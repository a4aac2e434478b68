"""torchvision-style ResNet backbone for DeepLab v3 / v3+: the stride sits on the 3x3 conv of a stage's first
block (not on the first 1x1 as in the Caffe-style v2 backbone of ``deeplab.models``), which is what
torchvision's ImageNet weights were trained with. Module names are torchvision's (``conv1``, ``bn1``,
``layer1.0.conv2``, ``layer1.0.downsample.0``, ...), so its ``resnet101`` state dict loads without renaming.

Later stages trade stride for dilation (output stride 8 or 16), and the last stage multiplies its dilation by
the multi-grid unit rates (1, 2, 4), as in the DeepLab v3 paper.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn


class Bottleneck(nn.Module):
    """torchvision's ResNet v1.5 bottleneck: 1x1 reduce, 3x3 (stride, dilation), 1x1 expand, BN after each."""

    def __init__(self, cin: int, cout: int, stride: int, dilation: int, downsample: bool) -> None:
        super().__init__()
        mid = cout // 4
        self.conv1 = nn.Conv2d(cin, mid, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(mid)
        self.conv2 = nn.Conv2d(mid, mid, 3, stride, padding=dilation, dilation=dilation, bias=False)
        self.bn2 = nn.BatchNorm2d(mid)
        self.conv3 = nn.Conv2d(mid, cout, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(cout)
        self.downsample = (nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
                           if downsample else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return F.relu(out + (x if self.downsample is None else self.downsample(x)))


def stage(n_blocks: int, cin: int, cout: int, stride: int, dilations: Sequence[int]) -> nn.Sequential:
    """``n_blocks`` bottlenecks, block i dilated by ``dilations[i]``; the first one strides and projects."""
    return nn.Sequential(*(Bottleneck(cin if i == 0 else cout, cout, stride if i == 0 else 1, dilations[i],
                                      downsample=i == 0) for i in range(n_blocks)))


# Stage strides and dilations (layer1..layer4) per output stride: stride is traded for dilation from the
# stage that would reach the output stride on (DeepLab v3 / v3+; both seeds use these).
LAYOUT = {8: ((1, 2, 1, 1), (1, 1, 2, 4)), 16: ((1, 2, 2, 1), (1, 1, 1, 2)), 32: ((1, 2, 2, 2), (1, 1, 1, 1))}


class ResNet(nn.Module):
    """Returns the stride-4 features of ``layer1`` (v3+'s low-level input) and the last stage's features."""

    def __init__(self, n_blocks: Sequence[int] = (3, 4, 23, 3), width: int = 64, output_stride: int = 16,
                 multi_grid: Sequence[int] = (1, 2, 4)) -> None:
        super().__init__()
        strides, dilations = LAYOUT[output_stride]
        ch = [width * 4, width * 8, width * 16, width * 32]
        self.conv1 = nn.Conv2d(3, width, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        cin = width
        for i, (n, cout, s, d) in enumerate(zip(n_blocks, ch, strides, dilations, strict=True)):
            # Multi-grid: the last stage's blocks dilate by d x the unit rates (cycled if it has more blocks).
            rates = [d * multi_grid[j % len(multi_grid)] for j in range(n)] if i == 3 else [d] * n
            self.add_module(f"layer{i + 1}", stage(n, cin, cout, s, rates))
            cin = cout
        self.channels = ch

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.maxpool(F.relu(self.bn1(self.conv1(x))))
        low = self.layer1(x)
        return low, self.layer4(self.layer3(self.layer2(low)))
