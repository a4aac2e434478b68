"""DeepLab v3 and v3+ over the torchvision-style ResNet (``deeplab.resnet``), with trainable BatchNorm.

v3: ASPP of a 1x1 branch, three dilated 3x3 branches and image-level pooling, each conv + BN + ReLU, concatenated
and projected to 256 channels, then a 1x1 classifier: logits at the output stride (8 or 16), as v2's at 8.
v3+: the same encoder plus a decoder: ``layer1``'s stride-4 features reduced to 48 channels, concatenated with
the encoder output upsampled to them, two 3x3 convs, the classifier, then upsampled to the input size.
Dropout (0.5 after the ASPP projection, 0.5 and 0.1 in the decoder) follows jfzhang95/pytorch-deeplab-xception.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from deeplab.arch import RATES
from deeplab.resnet import ResNet

ASPP_CHANNELS = 256
LOW_LEVEL_CHANNELS = 48


def conv_bn_relu(cin: int, cout: int, kernel: int, dilation: int = 1) -> nn.Sequential:
    pad = dilation * (kernel // 2)
    return nn.Sequential(nn.Conv2d(cin, cout, kernel, padding=pad, dilation=dilation, bias=False),
                         nn.BatchNorm2d(cout), nn.ReLU())


class ASPP(nn.Module):
    """v3's ASPP: parallel branches concatenated (v2's are summed classifiers) and projected."""

    def __init__(self, cin: int, rates: Sequence[int], cout: int = ASPP_CHANNELS) -> None:
        super().__init__()
        self.branches = nn.ModuleList([conv_bn_relu(cin, cout, 1)] + [conv_bn_relu(cin, cout, 3, r) for r in rates])
        self.pool = conv_bn_relu(cin, cout, 1)  # applied to the globally averaged features
        self.project = conv_bn_relu(cout * (len(rates) + 2), cout, 1)
        self.dropout = nn.Dropout(0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pooled = self.pool(F.adaptive_avg_pool2d(x, 1))
        outs = [b(x) for b in self.branches] + [pooled.expand(-1, -1, *x.shape[-2:])]
        return self.dropout(self.project(torch.cat(outs, dim=1)))


class DeepLabV3(nn.Module):
    def __init__(self, n_classes: int, n_blocks: Sequence[int] = (3, 4, 23, 3), width: int = 64,
                 output_stride: int = 16, atrous_rates: Sequence[int] | None = None,
                 multi_grid: Sequence[int] = (1, 2, 4)) -> None:
        super().__init__()
        self.backbone = ResNet(n_blocks, width, output_stride, multi_grid)
        self.aspp = ASPP(self.backbone.channels[3], RATES[output_stride] if atrous_rates is None else atrous_rates)
        self.classifier = nn.Conv2d(ASPP_CHANNELS, n_classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.aspp(self.backbone(x)[1]))


class Decoder(nn.Module):
    def __init__(self, low_channels: int) -> None:
        super().__init__()
        self.reduce = conv_bn_relu(low_channels, LOW_LEVEL_CHANNELS, 1)
        self.fuse = nn.Sequential(conv_bn_relu(ASPP_CHANNELS + LOW_LEVEL_CHANNELS, ASPP_CHANNELS, 3), nn.Dropout(0.5),
                                  conv_bn_relu(ASPP_CHANNELS, ASPP_CHANNELS, 3), nn.Dropout(0.1))

    def forward(self, encoded: torch.Tensor, low: torch.Tensor) -> torch.Tensor:
        up = F.interpolate(encoded, size=low.shape[-2:], mode="bilinear", align_corners=False)
        return self.fuse(torch.cat([up, self.reduce(low)], dim=1))


class DeepLabV3Plus(DeepLabV3):
    def __init__(self, n_classes: int, n_blocks: Sequence[int] = (3, 4, 23, 3), width: int = 64,
                 output_stride: int = 16, atrous_rates: Sequence[int] | None = None,
                 multi_grid: Sequence[int] = (1, 2, 4)) -> None:
        super().__init__(n_classes, n_blocks, width, output_stride, atrous_rates, multi_grid)
        self.decoder = Decoder(self.backbone.channels[0])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        low, high = self.backbone(x)
        logits = self.classifier(self.decoder(self.aspp(high), low))
        return F.interpolate(logits, size=x.shape[-2:], mode="bilinear", align_corners=False)
