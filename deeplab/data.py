"""Datasets: class tables and palette, image/label readers, file lists, augmentation, torch Dataset.

Every dataset is read through one list format written by the prepare stage: ``image_id<TAB>image<TAB>label``.
Images are returned as the reference does (BGR float32 minus the mean, CHW); labels as int64 with 255 ignored.
"""

from __future__ import annotations

import csv
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps, UnidentifiedImageError
from torch.utils.data import Dataset, Sampler

from deeplab.files import atomic_path

IGNORE = 255

SYNTHETIC_CLASSES = ("background", "disc", "box", "triangle", "ring", "stripe-band", "star", "blob")

VOC_CLASSES = (
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor",
)


def palette(n: int = 256) -> np.ndarray:
    """The PASCAL VOC colour map (bit-interleaved), n x 3 uint8; index 255 is the cream ignore colour."""
    cmap = np.zeros((n, 3), dtype=np.uint8)
    for i in range(n):
        c, r, g, b = i, 0, 0, 0
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        cmap[i] = (r, g, b)
    return cmap


PALETTE = palette()


class DataError(ValueError):
    """A dataset file or folder is missing or unreadable; the message names it."""


def read_image(path: str | Path) -> np.ndarray:
    """RGB uint8 HxWx3, EXIF orientation applied, grayscale/RGBA/palette converted."""
    try:
        with Image.open(path) as im:
            im = ImageOps.exif_transpose(im)
            return np.array(im.convert("RGB"))
    except FileNotFoundError:
        raise DataError(f"{path}: image file not found") from None
    except (UnidentifiedImageError, OSError, SyntaxError) as e:
        raise DataError(f"{path}: cannot read image ({e})") from None


def read_label(path: str | Path) -> np.ndarray:
    """Class indices uint8 HxW. Palette PNGs are decoded by palette index (never by colour)."""
    try:
        with Image.open(path) as im:
            if im.mode not in ("P", "L"):
                raise DataError(f"{path}: label must be a palette or grayscale image, got mode {im.mode}")
            return np.array(im, dtype=np.uint8)
    except FileNotFoundError:
        raise DataError(f"{path}: label file not found") from None
    except (UnidentifiedImageError, OSError, SyntaxError) as e:
        raise DataError(f"{path}: cannot read label ({e})") from None


def write_label(path: str | Path, label: np.ndarray) -> None:
    """Palette PNG with the VOC colour map, written atomically."""
    im = Image.fromarray(label.astype(np.uint8), mode="P")
    im.putpalette(PALETTE.tobytes())
    atomic_save(im, path)


def atomic_save(im: Image.Image, path: str | Path, **kwargs: object) -> None:
    with atomic_path(path) as tmp:
        im.save(tmp, format=Image.registered_extensions()[Path(path).suffix.lower()], **kwargs)


@dataclass(frozen=True)
class Item:
    image_id: str
    image: Path
    label: Path


def write_list(path: str | Path, items: Sequence[Item]) -> None:
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
        w = csv.writer(f, delimiter="\t", lineterminator="\n")
        for it in items:
            w.writerow([it.image_id, it.image.as_posix(), it.label.as_posix()])


def read_list(path: str | Path) -> list[Item]:
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: file list not found (run the prepare stage)")
    items = []
    with open(path, newline="") as f:
        for n, row in enumerate(csv.reader(f, delimiter="\t"), 1):
            if len(row) != 3:
                raise DataError(f"{path}:{n}: expected 3 tab-separated columns, got {len(row)}")
            items.append(Item(row[0], Path(row[1]), Path(row[2])))
    if not items:
        raise DataError(f"{path}: file list is empty")
    return items


def to_input(rgb: np.ndarray, mean_bgr: Sequence[float]) -> torch.Tensor:
    """RGB uint8 HxWx3 -> the network's input: BGR float32 minus the mean, CHW (Caffe convention)."""
    bgr = rgb[..., ::-1].astype(np.float32) - np.asarray(mean_bgr, dtype=np.float32)
    return torch.from_numpy(np.ascontiguousarray(bgr.transpose(2, 0, 1)))


@dataclass(frozen=True)
class Augment:
    crop_size: int
    scales: tuple[float, ...]
    flip: bool
    seed: int


def augment(image: torch.Tensor, label: np.ndarray, aug: Augment, rng: np.random.Generator,
            ignore: int = IGNORE) -> tuple[torch.Tensor, np.ndarray]:
    """Reference order: random scale from a discrete set, pad bottom/right (image 0 = the mean after
    subtraction, label ignore), random crop, horizontal flip."""
    h, w = label.shape
    s = float(rng.choice(aug.scales))
    nh, nw = int(h * s), int(w * s)
    if (nh, nw) != (h, w):
        image = F.interpolate(image[None], size=(nh, nw), mode="bilinear", align_corners=False)[0]
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
    return image.contiguous(), np.ascontiguousarray(label)


class SegmentationDataset(Dataset):
    """Reads one file list. With ``aug`` set, the index is ``(item, draw)``: the augmentation is seeded by
    ``(seed, draw)`` so any draw can be replayed exactly, in any worker, after a resume."""

    def __init__(self, list_file: str | Path, mean_bgr: Sequence[float], aug: Augment | None = None) -> None:
        self.items = read_list(list_file)
        self.mean_bgr = tuple(mean_bgr)
        self.aug = aug

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int | tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor, str]:
        i, draw = index if isinstance(index, tuple) else (index, 0)
        it = self.items[i]
        image, label = to_input(read_image(it.image), self.mean_bgr), read_label(it.label)
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


def voc_layout_items(root: Path, split: str) -> list[Item]:
    """Items of ``ImageSets/Segmentation/<split>.txt`` in a VOC-layout root; every file must exist."""
    listing = root / "ImageSets" / "Segmentation" / f"{split}.txt"
    if not listing.is_file():
        raise DataError(f"{listing}: split list not found (dataset root {root})")
    ids = [line.split()[0] for line in listing.read_text().splitlines() if line.strip()]
    items = [Item(i, root / "JPEGImages" / f"{i}.jpg", root / "SegmentationClass" / f"{i}.png") for i in ids]
    check_files(items, f"{root}: {listing.name}")
    return items


def check_files(items: Sequence[Item], source: str) -> None:
    """Raise naming how many image/label files listed by ``source`` are missing, and the first one."""
    missing = [str(p) for it in items for p in (it.image, it.label) if not p.is_file()]
    if missing:
        raise DataError(f"{source}: {len(missing)} listed files are missing, e.g. {missing[0]}")

