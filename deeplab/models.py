"""DeepLab v2: Caffe-style dilated ResNet + ASPP (summed), wrapped in the multi-scale (MSC) max fusion; and
``build_model``, which also builds DeepLab v3 / v3+ (``deeplab.deeplabv3``) inside the same wrapper.

Module names follow the reference implementation, so its released weights (keys ``base.layer*``,
``base.aspp.c*``) load without renaming.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from deeplab.arch import ARCHS, atrous_rates_for

BN_EPS = 1e-5


class ConvBnReLU(nn.Sequential):
    def __init__(self, cin: int, cout: int, kernel: int, stride: int, padding: int, dilation: int,
                 relu: bool = True) -> None:
        super().__init__()
        self.add_module("conv", nn.Conv2d(cin, cout, kernel, stride, padding, dilation, bias=False))
        self.add_module("bn", nn.BatchNorm2d(cout, eps=BN_EPS, momentum=0.001))
        if relu:
            self.add_module("relu", nn.ReLU())


class Bottleneck(nn.Module):
    """MSRA/Caffe bottleneck: the stride sits on the first 1x1 conv, not on the 3x3."""

    def __init__(self, cin: int, cout: int, stride: int, dilation: int, downsample: bool) -> None:
        super().__init__()
        mid = cout // 4
        self.reduce = ConvBnReLU(cin, mid, 1, stride, 0, 1)
        self.conv3x3 = ConvBnReLU(mid, mid, 3, 1, dilation, dilation)
        self.increase = ConvBnReLU(mid, cout, 1, 1, 0, 1, relu=False)
        self.shortcut = ConvBnReLU(cin, cout, 1, stride, 0, 1, relu=False) if downsample else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.increase(self.conv3x3(self.reduce(x))) + self.shortcut(x))


def res_layer(n_blocks: int, cin: int, cout: int, stride: int, dilation: int) -> nn.Sequential:
    layer = nn.Sequential()
    for i in range(n_blocks):
        first = i == 0
        layer.add_module(f"block{i + 1}", Bottleneck(cin if first else cout, cout, stride if first else 1,
                                                      dilation, downsample=first))
    return layer


def stem(width: int) -> nn.Sequential:
    s = nn.Sequential()
    s.add_module("conv1", ConvBnReLU(3, width, 7, 2, 3, 1))
    s.add_module("pool", nn.MaxPool2d(3, 2, padding=1, ceil_mode=True))
    return s


class ASPP(nn.Module):
    """Four parallel dilated 3x3 convs whose outputs are summed (DeepLab v2, not v3's concat)."""

    def __init__(self, cin: int, n_classes: int, rates: Sequence[int]) -> None:
        super().__init__()
        for i, r in enumerate(rates):
            self.add_module(f"c{i}", nn.Conv2d(cin, n_classes, 3, padding=r, dilation=r, bias=True))
        for m in self.children():
            nn.init.normal_(m.weight, 0, 0.01)
            nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return sum(stage(x) for stage in self.children())


class DeepLabV2(nn.Sequential):
    """Output stride 8: res4 and res5 keep resolution with dilation 2 and 4."""

    def __init__(self, n_classes: int, n_blocks: Sequence[int] = (3, 4, 23, 3), width: int = 64,
                 atrous_rates: Sequence[int] = (6, 12, 18, 24)) -> None:
        super().__init__()
        ch = [width * 4, width * 8, width * 16, width * 32]
        self.add_module("layer1", stem(width))
        self.add_module("layer2", res_layer(n_blocks[0], width, ch[0], 1, 1))
        self.add_module("layer3", res_layer(n_blocks[1], ch[0], ch[1], 2, 1))
        self.add_module("layer4", res_layer(n_blocks[2], ch[1], ch[2], 1, 2))
        self.add_module("layer5", res_layer(n_blocks[3], ch[2], ch[3], 1, 4))
        self.add_module("aspp", ASPP(ch[3], n_classes, atrous_rates))


class MSC(nn.Module):
    """Multi-scale inputs: the base runs at 1x and each extra scale, outputs are resized to the 1x logits
    and max-fused. Training returns ``[1x, *scales, max]`` (every one gets a loss); eval returns the max."""

    def __init__(self, base: nn.Module, scales: Sequence[float] = (0.5, 0.75)) -> None:
        super().__init__()
        self.base = base
        self.scales = tuple(scales)

    def forward(self, x: torch.Tensor) -> torch.Tensor | list[torch.Tensor]:
        logits = self.base(x)
        if not self.scales:  # single scale: one output, one loss (a fused copy would count the loss twice)
            return [logits] if self.training else logits
        size = logits.shape[-2:]
        pyramid = [self.base(F.interpolate(x, scale_factor=s, mode="bilinear", align_corners=False))
                   for s in self.scales]
        fused = torch.stack(
            [logits] + [F.interpolate(p, size=size, mode="bilinear", align_corners=False) for p in pyramid]
        ).amax(dim=0)
        if self.training:
            return [logits, *pyramid, fused]
        return fused


def build_model(n_classes: int, n_blocks: Sequence[int] = (3, 4, 23, 3), width: int = 64,
                atrous_rates: Sequence[int] | None = None,
                scales: Sequence[float] = (0.5, 0.75), arch: str = "deeplabv2", output_stride: int = 8) -> MSC:
    """``arch`` in the MSC wrapper; ``atrous_rates`` None: the arch's own (v2: 6/12/18/24)."""
    rates = atrous_rates_for(arch, output_stride, atrous_rates)
    if arch == "deeplabv2":
        return MSC(DeepLabV2(n_classes, n_blocks, width, rates), scales)
    from deeplab.deeplabv3 import DeepLabV3, DeepLabV3Plus

    net = DeepLabV3 if arch == "deeplabv3" else DeepLabV3Plus
    return MSC(net(n_classes, n_blocks, width, output_stride, rates), scales)


def is_v2(model: nn.Module) -> bool:
    return isinstance(getattr(model, "base", model), DeepLabV2)


def init_from_scratch(model: nn.Module, seed: int) -> None:
    """Seeded He initialisation of the backbone; v2's ASPP keeps DeepLab's N(0, 0.01). v3 / v3+: He for every
    conv, biases zero (BatchNorm keeps its identity init)."""
    gen = torch.Generator().manual_seed(seed)
    if not is_v2(model):
        for m in model.modules():
            if isinstance(m, nn.Conv2d):
                fan_out = m.out_channels * m.kernel_size[0] * m.kernel_size[1]
                with torch.no_grad():
                    m.weight.normal_(0, (2.0 / fan_out) ** 0.5, generator=gen)
                    if m.bias is not None:
                        m.bias.zero_()
        return
    for name, m in model.named_modules():
        if isinstance(m, nn.Conv2d) and ".aspp." not in f".{name}.":
            fan_out = m.out_channels * m.kernel_size[0] * m.kernel_size[1]
            with torch.no_grad():
                m.weight.normal_(0, (2.0 / fan_out) ** 0.5, generator=gen)
        elif isinstance(m, nn.Conv2d):
            with torch.no_grad():
                m.weight.normal_(0, 0.01, generator=gen)
                m.bias.zero_()


def freeze_bn(model: nn.Module) -> None:
    """Put every BatchNorm in eval mode and stop its affine parameters from learning (DeepLab v2)."""
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.eval()
            m.weight.requires_grad_(False)
            m.bias.requires_grad_(False)


def output_size(size: int) -> int:
    """Logit size for an input side of ``size`` (conv1 stride 2, ceil-mode pool, res3 stride 2)."""
    size = (size + 2 * 3 - 7) // 2 + 1
    size = -(-(size + 2 - 3) // 2) + 1
    return (size - 1) // 2 + 1


# Weights files written by train: {"model": state dict, "deeplab": metadata}. The metadata holds only str, int,
# float and lists, so the file still loads with torch.load(weights_only=True); plain state dicts load as before.
META_KEY = "deeplab"
META_FORMAT = 1
ARCH = "deeplabv2"
# The input the network was trained on, per dataset.normalization (loader.to_input): caffe, RGB images converted
# to BGR with mean_bgr subtracted (the DeepLab caffemodels); imagenet, RGB / 255 standardised by ImageNet's mean
# and std (torchvision's weights).
INPUT_CONVENTION = "bgr_mean_subtracted"
INPUT_CONVENTIONS = {"caffe": INPUT_CONVENTION, "imagenet": "rgb_imagenet"}
# Metadata keys that describe the network's shape, in build_model's terms.
SHAPE_KEYS = ("n_classes", "n_blocks", "width", "atrous_rates")


def weights_file(state: dict[str, torch.Tensor], *, n_classes: int, n_blocks: Sequence[int], width: int,
                 atrous_rates: Sequence[int] | None, scales: Sequence[float], class_names: Sequence[str], dataset: str,
                 mean_bgr: Sequence[float], colours: Sequence[Sequence[int]] | None = None, arch: str = ARCH,
                 output_stride: int = 8, normalization: str = "caffe") -> dict:
    """What train saves: the state dict under ``model`` and, under ``deeplab``, what rebuilding and feeding the
    model needs, so hub, predict and init load it by path alone. A deeplabv2 file is written as before this
    code had other archs (no ``output_stride``: always 8), so older code still reads it."""
    if len(class_names) != n_classes:
        raise ValueError(f"{len(class_names)} class names for {n_classes} classes")
    rates = atrous_rates_for(arch, output_stride, atrous_rates)
    meta = {"format": META_FORMAT, "arch": arch, "n_classes": int(n_classes), "n_blocks": [int(b) for b in n_blocks],
            "width": int(width), "atrous_rates": [int(r) for r in rates], "scales": [float(s) for s in scales],
            "class_names": [str(c) for c in class_names], "dataset": str(dataset),
            "input": INPUT_CONVENTIONS[normalization], "mean_bgr": [float(m) for m in mean_bgr]}
    if arch != ARCH:
        meta["output_stride"] = int(output_stride)
    if colours:  # a custom dataset's class colours, for predict's label maps and legends
        meta["colours"] = [[int(c) for c in rgb] for rgb in colours]
    return {"model": state, META_KEY: meta}


def normalize(key: str, value: object) -> object:
    """A metadata or build_model value in one comparable form: tuples for sequences, int or float scalars."""
    if key in ("n_blocks", "atrous_rates"):
        return tuple(int(v) for v in value)  # type: ignore[union-attr]
    if key in ("scales", "mean_bgr"):
        return tuple(float(v) for v in value)  # type: ignore[union-attr]
    if key in ("n_classes", "width", "output_stride"):
        return int(value)  # type: ignore[call-overload]
    return value


def check_metadata(path: str | Path, meta: object) -> dict:
    """The ``deeplab`` metadata of ``path`` with sequences as tuples; raises ValueError naming the file and the
    key for metadata this code cannot use (another format version or architecture, a missing or bad key)."""
    if not isinstance(meta, dict):
        raise ValueError(f"{path}: the '{META_KEY}' metadata is not a mapping")
    if meta.get("format") != META_FORMAT:
        raise ValueError(f"{path}: weights metadata format {meta.get('format')!r}, this code reads "
                         f"format {META_FORMAT}")
    for key, want in (("arch", ARCHS), ("input", tuple(INPUT_CONVENTIONS.values()))):
        if meta.get(key) not in want:
            raise ValueError(f"{path}: weights metadata {key} is {meta.get(key)!r}, this code supports "
                             f"{', '.join(map(repr, want))}")
    out = dict(meta)
    out["normalization"] = {v: k for k, v in INPUT_CONVENTIONS.items()}[meta["input"]]
    out.setdefault("output_stride", 8)
    try:
        for key in (*SHAPE_KEYS, "scales", "mean_bgr", "output_stride"):
            out[key] = normalize(key, out[key])
        out["class_names"] = tuple(str(c) for c in meta["class_names"])
        out["dataset"] = str(meta["dataset"])
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"{path}: weights metadata is incomplete or malformed ({type(e).__name__}: {e})") from None
    if len(out["n_blocks"]) != 4 or len(out["mean_bgr"]) != 3 or len(out["class_names"]) != out["n_classes"]:
        raise ValueError(f"{path}: weights metadata is inconsistent (n_blocks {out['n_blocks']}, mean_bgr "
                         f"{out['mean_bgr']}, {len(out['class_names'])} class names for {out['n_classes']} classes)")
    return out


def conflicts(meta: dict, **given: object) -> list[tuple[str, object, object]]:
    """(key, the file's value, the given value) for every given value (None: not given) that differs from
    the metadata."""
    return [(k, meta[k], normalize(k, v)) for k, v in given.items()
            if v is not None and normalize(k, v) != meta[k]]


def build_from_metadata(meta: dict, scales: Sequence[float] | None = None) -> MSC:
    """The model the metadata describes (with other extra input ``scales`` if given)."""
    try:
        return build_model(meta["n_classes"], meta["n_blocks"], meta["width"], meta["atrous_rates"],
                           meta["scales"] if scales is None else scales, meta["arch"], meta["output_stride"])
    except ValueError as e:  # e.g. 4 rates for a v3 arch
        raise ValueError(f"weights metadata does not describe a model: {e}") from None


def refusal_message(path: str | Path, e: Exception) -> str:
    """Why torch.load refused ``path``, without torch's advice to load it with ``weights_only=False``."""
    text = str(e)
    if "Weights only load failed" in text and "Unsupported operand" not in text:
        found = re.search(r"GLOBAL ([\w.]+)", text)
        what = f" ({found[1]})" if found else ""
        return (f"{path}: not a plain weights file: it holds pickled Python objects{what}, which are not loaded "
                "because unpickling can run arbitrary code. If you trust the file, load it in the code that wrote it "
                "and save only the tensors, e.g. torch.save(model.state_dict(), 'weights.pt'), then use that file")
    if "weights_only" in text or "Weights only" in text:
        return f"{path}: not a PyTorch weights file"
    first = text.strip().splitlines()[0] if text.strip() else type(e).__name__
    return f"{path}: not a PyTorch weights file ({first})"


def read_weights_file(path: str | Path) -> tuple[dict[str, torch.Tensor], dict | None]:
    """The state dict of a weights file (a plain state dict, or a checkpoint holding one under ``model``) and
    its ``deeplab`` metadata (``check_metadata``), None when it has none. Loaded with ``weights_only=True``:
    no pickled code runs."""
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: weights file not found") from None
    except Exception as e:  # torch raises several types for non-checkpoint files
        raise ValueError(refusal_message(path, e)) from None
    meta = None
    if isinstance(obj, dict) and isinstance(obj.get("model"), dict):
        if META_KEY in obj:
            meta = check_metadata(path, obj[META_KEY])
        obj = obj["model"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ValueError(f"{path}: expected a state dict of tensors")
    return obj, meta


def from_v1_layout(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], list[str]]:
    """A state dict in the reference's DeepLabV1 layout (its converted COCO init, deeplabv1_resnet101-coco.pth:
    the backbone without MSC's ``base.`` prefix and a 1x1 ``fc`` classifier instead of ASPP) in this model's
    layout, and the ``fc`` keys dropped (the ASPP head then starts fresh, as in the reference's training).
    Any other state dict is returned as it is."""
    if any(k.startswith("base.") for k in state) or not any(k.startswith("layer1.") for k in state):
        return state, []
    dropped = sorted(k for k in state if k.startswith("fc."))
    return {f"base.{k}": v for k, v in state.items() if not k.startswith("fc.")}, dropped


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """The state dict of a weights file (see ``read_weights_file``), without its metadata."""
    return read_weights_file(path)[0]


def load_weights(model: nn.Module, path: str | Path) -> list[str]:
    """Load ``path`` into ``model`` (see ``load_state``). Returns the names of the tensors left fresh."""
    return load_state(model, read_state_dict(path), path)


def load_state(model: nn.Module, state: dict[str, torch.Tensor], path: str | Path) -> list[str]:
    """Load ``state`` (read from ``path``, named in errors) into ``model``. Every backbone tensor must be
    present with the right shape; ASPP tensors of another shape (a different class count) are left at their
    fresh initialisation (v3 / v3+: the classifier). Returns the names of the tensors left fresh."""
    own, v2 = model.state_dict(), is_v2(model)
    fresh, problems = [], []
    for name, ref in own.items():
        src = state.get(name)
        is_head = ".classifier." in name or (v2 and ".aspp." in name)
        if src is None or src.shape != ref.shape:
            if is_head:
                fresh.append(name)
            elif src is None:
                problems.append(f"{name}: missing")
            else:
                problems.append(f"{name}: shape {tuple(src.shape)}, model needs {tuple(ref.shape)}")
    extra = sorted(set(state) - set(own))
    if problems or extra:
        detail = "; ".join(problems[:5] + [f"unexpected {k}" for k in extra[:5]])
        raise ValueError(f"{path}: weights do not fit the model ({len(problems)} problems, "
                         f"{len(extra)} unexpected keys): {detail}")
    model.load_state_dict({k: v for k, v in state.items() if k not in fresh}, strict=False)
    return fresh


@torch.no_grad()
def calibrate_bn(model: MSC, batches: Iterable[torch.Tensor]) -> int:
    """Set every BatchNorm's running statistics to the cumulative batch statistics of ``batches``.

    A from-scratch network has no statistics, and DeepLab freezes BN: without this, frozen identity BN
    passes raw mean-subtracted pixels (about +-128) through and the first step diverges. Pretrained
    (caffemodel) weights bring real statistics instead."""
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    saved = [m.momentum for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative moving average
    model.base.train()
    n = 0
    for images in batches:
        model.base(images)
        n += images.shape[0]
    for m, mom in zip(bns, saved, strict=True):
        m.momentum = mom
    model.eval()
    return n
