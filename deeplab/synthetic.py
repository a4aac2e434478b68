"""The embedded default dataset: generated deterministically from a seed, written in the PASCAL VOC layout.

Each class has its own shape family, colour and texture; objects overlap on a textured background, the
image is blurred and noised, and labels follow the colour edges (with a thin 255 outline as VOC has), so a
model has something to learn and the dense CRF has real boundaries to refine.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter
from tqdm import tqdm

from deeplab.data import IGNORE, SYNTHETIC_CLASSES, atomic_save, write_label

# Per object class: base RGB colour and texture kind.
STYLE = {
    1: ((220, 60, 50), "smooth"),
    2: ((50, 110, 220), "stripes"),
    3: ((240, 200, 40), "checker"),
    4: ((60, 180, 80), "grain"),
    5: ((170, 70, 200), "stripes"),
    6: ((240, 130, 30), "grain"),
    7: ((40, 190, 190), "checker"),
}


def _texture(kind: str, colour: tuple[int, int, int], h: int, w: int, rng: np.random.Generator) -> np.ndarray:
    base = np.asarray(colour, np.float32) * rng.uniform(0.8, 1.15, size=3).astype(np.float32)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    if kind == "stripes":
        theta, period = rng.uniform(0, math.pi), rng.uniform(5, 9)
        t = 0.5 + 0.5 * np.sin(2 * math.pi * (xx * math.cos(theta) + yy * math.sin(theta)) / period)
        shade = 0.65 + 0.35 * t
    elif kind == "checker":
        cell = int(rng.integers(4, 8))
        shade = np.where(((yy // cell + xx // cell) % 2) == 0, 1.0, 0.7)
    elif kind == "grain":
        shade = 0.75 + 0.25 * rng.random((h, w), dtype=np.float32)
    else:
        gy, gx = rng.uniform(-0.003, 0.003, size=2)
        shade = 0.85 + (gy * (yy - h / 2) + gx * (xx - w / 2))
    return np.clip(base[None, None, :] * shade[..., None], 0, 255)


def _background(h: int, w: int, rng: np.random.Generator) -> np.ndarray:
    """Low-frequency muted colour field: bilinear upsampling of a coarse random grid."""
    coarse = rng.uniform(70, 170, size=(4, 4, 3)).astype(np.uint8)
    smooth = np.asarray(Image.fromarray(coarse).resize((w, h), Image.BICUBIC), np.float32)
    return np.clip(smooth + rng.normal(0, 6, size=(h, w, 3)), 0, 255)


def _polygon(cls: int, cx: float, cy: float, r: float, rng: np.random.Generator) -> list[tuple[float, float]]:
    rot = rng.uniform(0, 2 * math.pi)
    if cls == 2:  # box: rotated rectangle
        a, b = r, r * rng.uniform(0.5, 0.9)
        pts = [(-a, -b), (a, -b), (a, b), (-a, b)]
    elif cls == 3:  # triangle
        pts = [(r * math.cos(k * 2 * math.pi / 3), r * math.sin(k * 2 * math.pi / 3)) for k in range(3)]
    elif cls == 5:  # band: long thin rectangle
        pts = [(-1.6 * r, -0.35 * r), (1.6 * r, -0.35 * r), (1.6 * r, 0.35 * r), (-1.6 * r, 0.35 * r)]
    elif cls == 6:  # star
        pts = [((r if k % 2 == 0 else 0.45 * r) * math.cos(k * math.pi / 5),
                (r if k % 2 == 0 else 0.45 * r) * math.sin(k * math.pi / 5)) for k in range(10)]
    else:  # blob: irregular polygon
        pts = [(r * rng.uniform(0.6, 1.1) * math.cos(k * 2 * math.pi / 9),
                r * rng.uniform(0.6, 1.1) * math.sin(k * 2 * math.pi / 9)) for k in range(9)]
    c, s = math.cos(rot), math.sin(rot)
    return [(cx + x * c - y * s, cy + x * s + y * c) for x, y in pts]


def make_sample(h: int, w: int, n_classes: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """One RGB uint8 image and its uint8 label map."""
    image = _background(h, w, rng)
    label = np.zeros((h, w), np.uint8)
    outline = np.zeros((h, w), bool)
    for _ in range(int(rng.integers(2, 6))):
        cls = int(rng.integers(1, n_classes))
        r = rng.uniform(0.12, 0.28) * min(h, w)
        cx, cy = rng.uniform(0.1 * w, 0.9 * w), rng.uniform(0.1 * h, 0.9 * h)
        mask_im = Image.new("L", (w, h), 0)
        draw = ImageDraw.Draw(mask_im)
        if cls in (1, 4):  # disc, ring
            bbox = (cx - r, cy - r * rng.uniform(0.7, 1.0), cx + r, cy + r)
            draw.ellipse(bbox, fill=1)
            if cls == 4:
                k = r * 0.5
                draw.ellipse((cx - k, cy - k, cx + k, cy + k), fill=0)
        else:
            draw.polygon(_polygon(cls, cx, cy, r, rng), fill=1)
        mask = np.asarray(mask_im, bool)
        colour, kind = STYLE[(cls - 1) % len(STYLE) + 1]
        image[mask] = _texture(kind, colour, h, w, rng)[mask]
        label[mask] = cls
        # Later objects occlude earlier outlines; the new object's border becomes the ignore band.
        outline &= ~mask
        edge = np.asarray(mask_im.filter(ImageFilter.MaxFilter(3)), bool) & ~np.asarray(
            mask_im.filter(ImageFilter.MinFilter(3)), bool)
        outline |= edge
    label[outline] = IGNORE
    blurred = Image.fromarray(image.astype(np.uint8)).filter(ImageFilter.GaussianBlur(rng.uniform(0.6, 1.4)))
    noisy = np.asarray(blurred, np.float32) + rng.normal(0, rng.uniform(3, 9), size=(h, w, 3))
    return np.clip(noisy, 0, 255).astype(np.uint8), label


def generate(root: str | Path, n_train: int, n_val: int, height: int, width: int, n_classes: int,
             seed: int) -> None:
    """Write JPEGImages/, SegmentationClass/ and ImageSets/Segmentation/{train,val}.txt under ``root``."""
    if not 2 <= n_classes <= len(SYNTHETIC_CLASSES):
        raise ValueError(f"dataset.n_classes: the synthetic dataset supports 2..{len(SYNTHETIC_CLASSES)} "
                         f"classes, got {n_classes}")
    root = Path(root)
    splits = {"train": [f"train_{i:05d}" for i in range(n_train)], "val": [f"val_{i:05d}" for i in range(n_val)]}
    for split, ids in splits.items():
        for i, image_id in enumerate(tqdm(ids, desc=f"synthetic {split}", unit="img")):
            rng = np.random.default_rng([seed, 0 if split == "train" else 1, i])
            image, label = make_sample(height, width, n_classes, rng)
            atomic_save(Image.fromarray(image), root / "JPEGImages" / f"{image_id}.jpg", quality=92)
            write_label(root / "SegmentationClass" / f"{image_id}.png", label)
    sets = root / "ImageSets" / "Segmentation"
    sets.mkdir(parents=True, exist_ok=True)
    for split, ids in splits.items():
        (sets / f"{split}.txt").write_text("".join(f"{i}\n" for i in ids))
