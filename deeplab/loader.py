"""What the model is fed: input tensors (BGR float32 minus the mean, CHW, as the reference; or ImageNet-standardised
RGB for torchvision weights), augmentation,
the torch Dataset over a prepared file list and its replayable sampler. Labels come as int64, 255 ignored."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import Dataset, Sampler

from deeplab.data import IGNORE, DataError, check_label_values, read_image, read_label, read_list

if TYPE_CHECKING:
    from deeplab.config import DatasetConfig

# torchvision's ImageNet weights expect RGB in [0, 1] standardised by these (per channel, RGB order).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def to_input(rgb: np.ndarray, mean_bgr: Sequence[float], normalization: str = "caffe") -> torch.Tensor:
    """RGB uint8 HxWx3 -> the network's input, float32 CHW: ``caffe``, BGR minus ``mean_bgr`` (the DeepLab
    caffemodels); ``imagenet``, RGB / 255 minus ImageNet's mean, over its std (torchvision's weights). Either
    way 0 is the mean colour, which augmentation pads with."""
    if normalization == "imagenet":
        x = (rgb.astype(np.float32) / 255 - np.asarray(IMAGENET_MEAN, np.float32)) / np.asarray(IMAGENET_STD,
                                                                                               np.float32)
    elif normalization == "caffe":
        x = rgb[..., ::-1].astype(np.float32) - np.asarray(mean_bgr, dtype=np.float32)
    else:
        raise ValueError(f"dataset.normalization: expected caffe or imagenet, got {normalization!r}")
    return torch.from_numpy(np.ascontiguousarray(x.transpose(2, 0, 1)))


@dataclass(frozen=True)
class Augment:
    crop_size: int
    scales: tuple[float, ...]
    flip: bool
    seed: int
    # The DeepLab v3+ capstone's options, off by default: a continuous scale range instead of ``scales``, and
    # Gaussian blur with this probability.
    scale_range: tuple[float, float] | None = None
    blur_prob: float = 0.0


def resize_bilinear(image: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """CHW float image resized bilinearly (align_corners=False, no antialias), with the same bits on any number
    of threads. Given a (1, 3, H, W) image on one thread, torch takes another kernel whose sums round
    differently (ATen's upsample_bilinear2d_kernel_impl_float: "get_num_threads() == 1 && C == 3"), so crops
    made in a DataLoader worker (one thread) or under OMP_NUM_THREADS=1 differed from the main process's, and
    train.num_workers changed the weights. Each channel resized as its own one-channel image takes the kernel
    a 3-channel image gets on two threads or more, on any thread count: the 2-core stream is unchanged."""
    return F.interpolate(image[:, None], size=size, mode="bilinear", align_corners=False)[:, 0]


def gaussian_blur(image: torch.Tensor, sigma: float) -> torch.Tensor:
    """CHW float image blurred by a separable Gaussian of ``sigma`` pixels, truncated at 3 sigma and mirrored at
    the borders (scipy.ndimage.gaussian_filter's mode "mirror"); the image itself where the kernel is one tap.
    Blurring commutes with the mean subtraction: the kernel sums to 1."""
    radius = min(int(3 * sigma + 0.5), *(n - 1 for n in image.shape[-2:]))
    if sigma <= 0 or radius < 1:
        return image
    x = torch.arange(-radius, radius + 1, dtype=torch.float64)
    k = torch.exp(-0.5 * (x / sigma) ** 2)
    k = (k / k.sum()).to(image.dtype)
    c = image.shape[0]
    out = F.pad(image[None], (radius, radius, radius, radius), mode="reflect")
    out = F.conv2d(out, k.view(1, 1, 1, -1).expand(c, 1, 1, -1), groups=c)
    return F.conv2d(out, k.view(1, 1, -1, 1).expand(c, 1, -1, 1), groups=c)[0]


def augment(image: torch.Tensor, label: np.ndarray, aug: Augment, rng: np.random.Generator,
            ignore: int = IGNORE) -> tuple[torch.Tensor, np.ndarray]:
    """Reference order: random scale from a discrete set (or uniform in ``scale_range``), pad bottom/right
    (image 0 = the mean after subtraction, label ignore), random crop, horizontal flip; then, with
    ``blur_prob``, Gaussian blur of the image crop, sigma uniform in [0, 1) as the capstone's (which blurs
    after its scale-pad-crop too). Options that are off draw no random numbers: the v2 stream is unchanged."""
    h, w = label.shape
    s = float(rng.uniform(*aug.scale_range)) if aug.scale_range else float(rng.choice(aug.scales))
    nh, nw = int(h * s), int(w * s)
    if (nh, nw) != (h, w):
        image = resize_bilinear(image, (nh, nw))
        label = np.asarray(Image.fromarray(label).resize((nw, nh), Image.NEAREST))
    c = aug.crop_size
    ph, pw = max(c - nh, 0), max(c - nw, 0)
    if ph or pw:
        image = F.pad(image, (0, pw, 0, ph), value=0.0)
        label = np.pad(label, ((0, ph), (0, pw)), constant_values=ignore)
    y = int(rng.integers(0, label.shape[0] - c + 1))
    x = int(rng.integers(0, label.shape[1] - c + 1))
    image, label = image[:, y:y + c, x:x + c], label[y:y + c, x:x + c]
    if aug.flip and rng.random() < 0.5:
        image, label = image.flip(-1), label[:, ::-1]
    if aug.blur_prob and rng.random() < aug.blur_prob:
        image = gaussian_blur(image.contiguous(), float(rng.random()))
    return image.contiguous(), np.ascontiguousarray(label)


class SegmentationDataset(Dataset):
    """Reads one file list. With ``aug`` set, the index is ``(item, draw)``: the augmentation is seeded by
    ``(seed, draw)`` so any draw can be replayed exactly, in any worker, after a resume."""

    def __init__(self, list_file: str | Path, mean_bgr: Sequence[float], aug: Augment | None = None,
                 n_classes: int | None = None, ignore: int = IGNORE, normalization: str = "caffe") -> None:
        self.items = read_list(list_file)
        self.mean_bgr = tuple(mean_bgr)
        self.normalization = normalization
        self.aug = aug
        self.n_classes, self.ignore = n_classes, ignore  # with n_classes set, label values are checked

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int | tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor, str]:
        i, draw = index if isinstance(index, tuple) else (index, 0)
        it = self.items[i]
        image, label = to_input(read_image(it.image), self.mean_bgr, self.normalization), read_label(it.label)
        if self.n_classes is not None:
            check_label_values(label, it.label, self.n_classes, self.ignore)
        if image.shape[-2:] != label.shape:
            raise DataError(f"{it.label}: label size {label.shape} differs from image size {tuple(image.shape[-2:])}")
        if self.aug is not None:
            image, label = augment(image, label, self.aug, np.random.default_rng([self.aug.seed, draw]))
        return image, torch.from_numpy(label.astype(np.int64)), it.image_id


class DrawSampler(Sampler):
    """Endless shuffled stream of ``(item, draw)`` where draw counts samples from 0. Epoch e is a permutation
    seeded by ``(seed, e)``, so starting at ``start`` reproduces exactly the stream a run would have reached."""

    def __init__(self, n: int, seed: int, start: int = 0, stride: int = 1, offset: int = 0) -> None:
        self.n, self.seed, self.start, self.stride, self.offset = n, seed, start, stride, offset

    def __iter__(self) -> Iterator[tuple[int, int]]:
        draw = self.start * self.stride + self.offset
        epoch, perm = -1, np.empty(0, dtype=np.int64)
        while True:
            e, pos = divmod(draw, self.n)
            if e != epoch:
                epoch, perm = e, np.random.default_rng([self.seed, e]).permutation(self.n)
            yield int(perm[pos]), draw
            draw += self.stride


def calibration_batches(train_list: Path, dcfg: DatasetConfig, crop_size: int, seed: int, n_batches: int = 8,
                        batch_size: int = 8) -> Iterator[torch.Tensor]:
    """Unflipped random crops of training images at scale 1, for BatchNorm calibration (the init stage's: here,
    with the data pipeline it reads through, among the init stage's code dependencies)."""
    dataset = SegmentationDataset(train_list, dcfg.mean_bgr, Augment(crop_size, (1.0,), False, seed),
                                  normalization=dcfg.normalization)
    sampler = iter(DrawSampler(len(dataset), seed))
    for _ in range(min(n_batches, -(-len(dataset) // batch_size))):
        yield torch.stack([dataset[next(sampler)][0] for _ in range(batch_size)])


def worker_error(e: DataError) -> DataError:
    """The error a DataLoader worker raised, without the worker traceback the loader pastes into its message."""
    lines = [line for line in str(e).splitlines() if line.strip()]
    if len(lines) > 1 and lines[0].startswith("Caught "):
        last = lines[-1]
        prefix = f"{type(e).__module__}.{type(e).__name__}: "
        return DataError(last.removeprefix(prefix).removeprefix(f"{type(e).__name__}: "))
    return e
