"""Dataset files without torch: class tables and palette, image/label readers and writers, file lists.

Every dataset is read through one list format written by the prepare stage: ``image_id<TAB>image<TAB>label``,
then the md5 of the image and of the label.
What the model is fed (input tensors, augmentation, the torch Dataset) lives in ``deeplab.loader``, so the
stages that run no model (download, prepare, evaluate) never import torch.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

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
    """RGB uint8 HxWx3, EXIF orientation applied, grayscale/RGBA/palette converted. 16-bit grayscale (PIL modes
    I;16*, and I with values in 0..65535) is scaled to 8 bits as round(x / 257); PIL itself reads 48/64-bit
    RGB(A) PNGs as their high bytes. Float images (mode F) are refused: their value range is unknown."""
    try:
        with Image.open(path) as im:
            im = ImageOps.exif_transpose(im)
            if im.mode == "F":
                raise DataError(f"{path}: floating-point image (mode F) is not supported: its value range is "
                                "unknown; save it as an 8- or 16-bit image")
            if im.mode == "I" or im.mode.startswith("I;16"):  # convert("RGB") would clip these at 255
                wide = np.asarray(im).astype(np.int64)
                if wide.size and (wide.min() < 0 or wide.max() > 65535):
                    raise DataError(f"{path}: 32-bit integer image with values {wide.min()}..{wide.max()}, "
                                    "outside the 16-bit range 0..65535: save it as an 8- or 16-bit image")
                gray = ((2 * wide + 257) // 514).astype(np.uint8)  # round(x / 257), exact in integers
                return np.repeat(gray[..., None], 3, axis=2)
            return np.array(im.convert("RGB"))
    except FileNotFoundError:
        raise DataError(f"{path}: image file not found") from None
    except (UnidentifiedImageError, OSError, SyntaxError) as e:
        raise DataError(f"{path}: cannot read image ({e})") from None


def read_label(path: str | Path, data: bytes | None = None) -> np.ndarray:
    """Class indices uint8 HxW. Palette PNGs are decoded by palette index (never by colour); grayscale ones by
    value, 16-bit too (values up to 255), bilevel ones as 0 and 1. ``data``: the
    file's bytes, already read (``path`` then only names it in errors)."""
    try:
        with Image.open(path if data is None else io.BytesIO(data)) as im:
            if im.format in ("JPEG", "MPO"):
                # Lossy: class values come back shifted near every edge, silently within range for most.
                raise DataError(f"{path}: label is a JPEG file, whose lossy compression changes class values near "
                                "edges: save labels losslessly (PNG)")
            if im.mode == "I" or im.mode.startswith("I;16"):  # 16/32-bit grayscale (OpenCV's uint16 masks)
                wide = np.asarray(im).astype(np.int64)
                if wide.size and (wide.min() < 0 or wide.max() > 255):
                    raise DataError(f"{path}: label of mode {im.mode} with values {wide.min()}..{wide.max()}: "
                                    "class values must be 0..255")
                return wide.astype(np.uint8)
            if im.mode not in ("P", "L", "1"):
                # A colour-coded map (CamVid's, Cityscapes' color.png) is the usual case: say what to do with it.
                colour = (": a colour-coded label map? Convert it to class indices (dataset.custom.colours only "
                          "sets display colours)") if im.mode in ("RGB", "RGBA") else ""
                raise DataError(f"{path}: label must be a palette or grayscale image of class indices, got mode "
                                f"{im.mode}{colour}")
            return np.array(im, dtype=np.uint8)  # mode 1 (bilevel): 0 and 1
    except FileNotFoundError:
        raise DataError(f"{path}: label file not found") from None
    except (UnidentifiedImageError, OSError, SyntaxError) as e:
        raise DataError(f"{path}: cannot read label ({e})") from None


def label_values_error(label: np.ndarray, n_classes: int, ignore: int = IGNORE, lut: np.ndarray | None = None,
                       counts: np.ndarray | None = None) -> str | None:
    """What is wrong with a label map whose values are neither a class (0..n_classes-1) nor ``ignore``, or None.
    Such values would otherwise drop silently out of the confusion matrix or crash the loss. With ``lut`` (file
    value -> label value, 256 entries; 256 + v: class index v, out of range even where v is ``ignore``) the file
    values are judged by what they map to. ``counts``: ``label``'s value counts (``np.bincount``, minlength 256),
    where the caller has them already."""
    counts = np.bincount(label.ravel(), minlength=256) if counts is None else counts.copy()
    if lut is None:
        counts[:n_classes] = 0
        counts[ignore] = 0
    else:
        counts[(lut < n_classes) | (lut == ignore)] = 0
    bad = np.flatnonzero(counts)
    if not bad.size:
        return None
    shown = ", ".join(map(str, bad[:8])) + (", ..." if bad.size > 8 else "")
    mapped = ""
    if lut is not None:
        targets = (str(v) if v < 256 else f"class {v - 256}, not the ignore label" for v in map(int, lut[bad[:8]]))
        mapped = f" after dataset.custom's label_map / reduce_zero_label (they map to {', '.join(targets)})"
    return (f"label values {shown} ({int(counts.sum())} pixels) are outside the allowed 0..{n_classes - 1} "
            f"(dataset.n_classes {n_classes}) and {ignore} (dataset.ignore_label){mapped}")


def check_label_values(label: np.ndarray, path: str | Path, n_classes: int, ignore: int = IGNORE) -> np.ndarray:
    """``label`` itself, or a DataError naming ``path`` and the values out of range."""
    problem = label_values_error(label, n_classes, ignore)
    if problem:
        raise DataError(f"{path}: {problem}")
    return label


def write_label(path: str | Path, label: np.ndarray, colours: np.ndarray | None = None) -> None:
    """Palette PNG with the VOC colour map (or ``colours``, 256 x 3), written atomically."""
    im = Image.fromarray(label.astype(np.uint8), mode="P")
    im.putpalette((PALETTE if colours is None else colours).tobytes())
    atomic_save(im, path)


def atomic_save(im: Image.Image, path: str | Path, **kwargs: object) -> None:
    with atomic_path(path) as tmp:
        im.save(tmp, format=Image.registered_extensions()[Path(path).suffix.lower()], **kwargs)


@dataclass(frozen=True)
class Item:
    image_id: str
    image: Path
    label: Path


def write_list(path: str | Path, items: Sequence[Item], digests: Sequence[tuple[str, str]] | None = None) -> None:
    """One line per item; with ``digests`` (the md5 of each item's image and label) two
    more columns, so the list's own hash changes whenever a listed file's content does: the stages after prepare
    depend on the lists alone in dvc.yaml, not on the dataset folder."""
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
        w = csv.writer(f, delimiter="\t", lineterminator="\n")
        for n, it in enumerate(items):
            w.writerow([it.image_id, it.image.as_posix(), it.label.as_posix(), *(digests[n] if digests else ())])


def read_list(path: str | Path) -> list[Item]:
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: file list not found (run the prepare stage)")
    items = []
    with open(path, newline="") as f:
        for n, row in enumerate(csv.reader(f, delimiter="\t"), 1):
            if len(row) not in (3, 5):  # id, image, label, and the md5s prepare records (unused here)
                raise DataError(f"{path}:{n}: expected 3 (or 5) tab-separated columns, got {len(row)}")
            items.append(Item(row[0], Path(row[1]), Path(row[2])))
    if not items:
        raise DataError(f"{path}: file list is empty")
    return items


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

