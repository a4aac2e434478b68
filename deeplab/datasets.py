"""The datasets DeepLab v2 is measured on, and the synthetic default: where their files are, how a split is
listed, how labels are decoded, which classes they have, and the preparation each needs."""

from __future__ import annotations

import logging
import shutil
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from deeplab.config import DatasetConfig
from deeplab.data import (
    IGNORE,
    SYNTHETIC_CLASSES,
    VOC_CLASSES,
    DataError,
    Item,
    atomic_save,
    check_files,
    item_digests,
    label_values_error,
    read_image,
    read_label,
    voc_layout_items,
    write_label,
    write_list,
)

log = logging.getLogger(__name__)

# COCO-Stuff label index = COCO category id - 1: 91 thing ids (11 without masks) then 91 stuff classes.
COCO_STUFF_CLASSES = (
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat", "traffic light",
    "fire hydrant", "street sign", "stop sign", "parking meter", "bench", "bird", "cat", "dog", "horse", "sheep",
    "cow", "elephant", "bear", "zebra", "giraffe", "hat", "backpack", "umbrella", "shoe", "eye glasses",
    "handbag", "tie", "suitcase", "frisbee", "skis", "snowboard", "sports ball", "kite", "baseball bat",
    "baseball glove", "skateboard", "surfboard", "tennis racket", "bottle", "plate", "wine glass", "cup", "fork",
    "knife", "spoon", "bowl", "banana", "apple", "sandwich", "orange", "broccoli", "carrot", "hot dog", "pizza",
    "donut", "cake", "chair", "couch", "potted plant", "bed", "mirror", "dining table", "window", "desk", "toilet",
    "door", "tv", "laptop", "mouse", "remote", "keyboard", "cell phone", "microwave", "oven", "toaster", "sink",
    "refrigerator", "blender", "book", "clock", "vase", "scissors", "teddy bear", "hair drier", "toothbrush",
    "hair brush",
    "banner", "blanket", "branch", "bridge", "building-other", "bush", "cabinet", "cage", "cardboard", "carpet",
    "ceiling-other", "ceiling-tile", "cloth", "clothes", "clouds", "counter", "cupboard", "curtain", "desk-stuff",
    "dirt", "door-stuff", "fence", "floor-marble", "floor-other", "floor-stone", "floor-tile", "floor-wood",
    "flower", "fog", "food-other", "fruit", "furniture-other", "grass", "gravel", "ground-other", "hill", "house",
    "leaves", "light", "mat", "metal", "mirror-stuff", "moss", "mountain", "mud", "napkin", "net", "paper",
    "pavement", "pillow", "plant-other", "plastic", "platform", "playingfield", "railing", "railroad", "river",
    "road", "rock", "roof", "rug", "salad", "sand", "sea", "shelf", "sky-other", "skyscraper", "snow",
    "solid-other", "stairs", "stone", "straw", "structural-other", "table", "tent", "textile-other", "towel", "tree",
    "vegetable", "wall-brick", "wall-concrete", "wall-other", "wall-panel", "wall-stone", "wall-tile", "wall-wood",
    "water-other", "waterdrops", "window-blind", "window-other", "wood",
)

CLASS_TABLES: dict[str, Sequence[str]] = {
    "synthetic": SYNTHETIC_CLASSES,
    "voc12": VOC_CLASSES,
    "cocostuff10k": COCO_STUFF_CLASSES,
    "cocostuff164k": COCO_STUFF_CLASSES,
}

VOC_DIR = Path("VOCdevkit/VOC2012")

# What must exist under a dataset root (folders end with '/').
LAYOUT: dict[str, list[str]] = {
    "synthetic": ["JPEGImages/", "SegmentationClass/", "ImageSets/Segmentation/"],
    "voc12": [f"{VOC_DIR}/JPEGImages/", f"{VOC_DIR}/SegmentationClassAug/", f"{VOC_DIR}/ImageSets/SegmentationAug/"],
    "cocostuff10k": ["images/", "annotations/", "imageLists/"],
    "cocostuff164k": ["images/", "annotations/"],
}


def class_names(dataset: str, n_classes: int) -> list[str]:
    table = CLASS_TABLES.get(dataset, ())
    return [table[i] if i < len(table) else f"class{i}" for i in range(n_classes)]


def check_layout(cfg: DatasetConfig, root: Path) -> None:
    """Raise naming every expected folder or split list that is missing under ``root``."""
    if not root.is_dir():
        raise DataError(f"dataset.root {root}: folder not found")
    need = list(LAYOUT[cfg.name])
    for split in (cfg.train_split, cfg.val_split):
        need.append({"synthetic": f"ImageSets/Segmentation/{split}.txt",
                     "voc12": f"{VOC_DIR}/ImageSets/SegmentationAug/{split}.txt",
                     "cocostuff10k": f"imageLists/{split}.txt",
                     "cocostuff164k": f"images/{split}/"}[cfg.name])
        if cfg.name == "cocostuff164k":
            need.append(f"annotations/{split}/")
    missing = [n for n in dict.fromkeys(need)
               if not ((root / n).is_dir() if n.endswith("/") else (root / n).is_file())]
    if missing:
        kinds = ", ".join(f"{n.rstrip('/')} ({'folder' if n.endswith('/') else 'file'})" for n in missing)
        raise DataError(f"{cfg.name} dataset at {root} is incomplete: missing {kinds}")


def finish_layout(cfg: DatasetConfig, root: Path) -> None:
    """Move freshly extracted archives into the layout the readers expect."""
    shutil.rmtree(root / VOC_DIR / "__MACOSX", ignore_errors=True)
    if cfg.name == "voc12" and (root / VOC_DIR / "list").is_dir():
        dest = root / VOC_DIR / "ImageSets" / "SegmentationAug"
        shutil.rmtree(dest, ignore_errors=True)
        (root / VOC_DIR / "list").rename(dest)


def read_mat_label(path: Path) -> np.ndarray:
    """COCO-Stuff 10k: field ``S`` holds 0 = unlabeled, 1..182 = classes; DeepLab uses S - 1, unlabeled 255."""
    import scipy.io

    try:
        s = scipy.io.loadmat(path)["S"]
    except FileNotFoundError:
        raise DataError(f"{path}: annotation file not found") from None
    except (KeyError, ValueError, TypeError, OSError, scipy.io.matlab.MatReadError) as e:
        raise DataError(f"{path}: cannot read field 'S' of the annotation ({e})") from None
    label = s.astype(np.int64) - 1  # cast first: S may be uint8 or float64
    label[label < 0] = IGNORE
    return label.astype(np.uint8)


def _voc_aug_items(root: Path, split: str) -> list[Item]:
    base = root / VOC_DIR
    listing = base / "ImageSets" / "SegmentationAug" / f"{split}.txt"
    items = []
    for n, line in enumerate(listing.read_text().splitlines(), 1):
        parts = line.split()
        if not parts:
            continue
        if len(parts) != 2:
            raise DataError(f"{listing}:{n}: expected '/JPEGImages/<id>.jpg /SegmentationClassAug/<id>.png'")
        image, label = (base / p.lstrip("/") for p in parts)
        items.append(Item(image.stem, image, label))
    return items


def split_items(cfg: DatasetConfig, root: Path, split: str) -> list[Item]:
    """Items of one split; for COCO-Stuff 10k the label is the raw ``.mat`` (prepare converts it)."""
    if cfg.name == "synthetic":
        return voc_layout_items(root, split)
    if cfg.name == "voc12":
        items = _voc_aug_items(root, split)
    elif cfg.name == "cocostuff10k":
        ids = (root / "imageLists" / f"{split}.txt").read_text().split()
        items = [Item(i, root / "images" / f"{i}.jpg", root / "annotations" / f"{i}.mat") for i in ids]
    else:
        images = sorted((root / "images" / split).glob("*.jpg"))
        items = [Item(p.stem, p, root / "annotations" / split / f"{p.stem}.png") for p in images]
    if not items:
        raise DataError(f"{cfg.name} split {split!r} under {root} is empty")
    check_files(items, f"{cfg.name} split {split!r}")
    return items


def warp_image(rgb: np.ndarray, size: int) -> np.ndarray:
    """Bilinear without antialiasing (OpenCV's INTER_LINEAR, as the reference), rounded back to uint8."""
    import torch  # only COCO-Stuff 10k's preparation needs it
    import torch.nn.functional as F

    t = torch.from_numpy(rgb).permute(2, 0, 1)[None].float()
    t = F.interpolate(t, size=(size, size), mode="bilinear", align_corners=False)
    return t[0].permute(1, 2, 0).round().clamp(0, 255).to(torch.uint8).numpy()


def _warp_one(item: Item, size: int, out: Path) -> Item:
    image_path, label_path = out / "images" / f"{item.image_id}.png", out / "labels" / f"{item.image_id}.png"
    if not (image_path.exists() and label_path.exists()):
        import torch

        torch.set_num_threads(1)
        label = read_mat_label(item.label)
        atomic_save(Image.fromarray(warp_image(read_image(item.image), size)), image_path)
        write_label(label_path, np.asarray(Image.fromarray(label).resize((size, size), Image.NEAREST)))
    return Item(item.image_id, image_path, label_path)


MAX_REPORTED = 20  # bad pairs listed in one error


def pair_problem(item: Item, n_classes: int, ignore: int) -> str | None:
    """What is wrong with one image/label pair (missing, unreadable, sizes differ, label values out of range),
    or None. The image is read to its header only; the label is decoded."""
    try:
        with Image.open(item.image) as im:
            w, h = im.size
            if im.getexif().get(0x0112, 1) in (5, 6, 7, 8):  # EXIF rotation by 90 degrees: read_image swaps them
                w, h = h, w
    except FileNotFoundError:
        return f"{item.image}: image file not found"
    except (OSError, SyntaxError, ValueError) as e:
        return f"{item.image}: cannot read image ({e})"
    try:
        label = read_label(item.label)
    except DataError as e:
        return str(e)
    if label.shape != (h, w):
        return f"{item.label}: label size {label.shape[1]}x{label.shape[0]} differs from image size {w}x{h}"
    problem = label_values_error(label, n_classes, ignore)
    return f"{item.label}: {problem}" if problem else None


def _problems(chunk: Sequence[Item], n_classes: int, ignore: int) -> list[str]:
    return [msg for it in chunk if (msg := pair_problem(it, n_classes, ignore))]


def check_pairs(items: Sequence[Item], n_classes: int, ignore: int, what: str, n_jobs: int = -1) -> list[str]:
    """Every pair checked once, in parallel (with a progress bar); returns the problems found."""
    size = max(1, min(256, -(-len(items) // 16)))
    chunks = [items[i:i + size] for i in range(0, len(items), size)]
    if len(items) > 1000:
        from joblib import Parallel, delayed

        results = Parallel(n_jobs=n_jobs, return_as="generator")(
            delayed(_problems)(c, n_classes, ignore) for c in chunks)
    else:  # a few hundred small pairs are quicker in this process than starting workers
        results = (_problems(c, n_classes, ignore) for c in chunks)
    bad: list[str] = []
    with tqdm(total=len(items), desc=f"check {what}", unit="pair") as bar:
        for chunk, found in zip(chunks, results, strict=True):
            bad += found
            bar.update(len(chunk))
    return bad


def bad_pairs_error(bad: Sequence[str], n_items: int, what: str) -> DataError:
    shown = "\n  ".join(bad[:MAX_REPORTED])
    more = f"\n  ... and {len(bad) - MAX_REPORTED} more" if len(bad) > MAX_REPORTED else ""
    return DataError(f"{what}: {len(bad)} of {n_items} image/label pairs are bad:\n  {shown}{more}")


def prepare(cfg: DatasetConfig, root: Path, out: Path, n_jobs: int = -1) -> dict[str, int]:
    """Write ``out/<split>.txt`` for the train and val splits once every pair of both has been checked (see
    ``check_pairs``). COCO-Stuff 10k images and labels are warped to ``dataset.warp_size`` squares (PNG, lossless)
    under ``out`` first, since the reference trains and evaluates on them. Returns the item count per split."""
    check_layout(cfg, root)
    splits: dict[str, list[Item]] = {}
    bad: list[str] = []
    for split in dict.fromkeys((cfg.train_split, cfg.val_split)):
        items = split_items(cfg, root, split)
        if cfg.name == "cocostuff10k":
            if cfg.warp_size is None:
                raise DataError("dataset.warp_size: COCO-Stuff 10k needs a warp size (513 in the reference)")
            from joblib import Parallel, delayed  # only this warp runs in parallel

            jobs = (delayed(_warp_one)(it, cfg.warp_size, out) for it in items)
            items = list(tqdm(Parallel(n_jobs=n_jobs, return_as="generator")(jobs), total=len(items),
                              desc=f"warp {split}", unit="img"))
        bad += check_pairs(items, cfg.n_classes, cfg.ignore_label, f"{cfg.name} split {split!r}", n_jobs)
        splits[split] = items
    if bad:
        raise bad_pairs_error(bad, sum(map(len, splits.values())), f"{cfg.name} dataset at {root}")
    for split, items in splits.items():
        write_list(out / f"{split}.txt", items, item_digests(items, n_jobs))
        log.info("%s split %s: %d images", cfg.name, split, len(items))
    return {split: len(items) for split, items in splits.items()}
