"""Every dataset the pipeline reads, each described once in ``DATASETS``: the archives to download, the layout
checked under its root, how a split is listed, how its labels decode, its class names, and the preparation it
needs. The download, prepare and evaluate stages read these entries and nothing else; adding a dataset means
adding one entry (and its tests).

The labels every stage after prepare reads are palette or grayscale images holding class indices and
``dataset.ignore_label``; a dataset whose files hold something else (COCO-Stuff 10k's ``.mat``, a custom
dataset's ``label_map``) is converted into ``data/prepared`` by prepare, after every pair has been checked."""

from __future__ import annotations

import glob
import hashlib
import inspect
import io
import logging
import re
import shutil
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from deeplab import synthetic
from deeplab.config import DatasetConfig, class_names_problem
from deeplab.data import (
    IGNORE,
    PALETTE,
    SYNTHETIC_CLASSES,
    VOC_CLASSES,
    DataError,
    Item,
    atomic_save,
    check_files,
    label_values_error,
    read_image,
    read_label,
    voc_layout_items,
    write_label,
    write_list,
)
from deeplab.download import Archive
from deeplab.files import file_hash, fingerprint, write_json, write_text

log = logging.getLogger(__name__)

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

VOC_DIR = Path("VOCdevkit/VOC2012")


@dataclass(frozen=True)
class Dataset:
    """What the stages know of one dataset. Paths are relative to its root; ``{split}`` stands for the train
    and validation split names."""

    # Class names, index order; empty: given by the params (dataset.custom.classes).
    classes: tuple[str, ...]
    # How a split is listed: (params, root, split) -> its items, label paths as stored (see ``convert``).
    items: Callable[[DatasetConfig, Path, str], list[Item]]
    # What must exist under the root (folders end with '/'), checked before anything is read.
    layout: tuple[str, ...] = ()
    # Downloaded and extracted, each into its folder, when dataset.root is not set; none: see ``generate``.
    archives: tuple[Archive, ...] = ()
    # Made instead of downloaded: (params, root).
    generate: Callable[[DatasetConfig, Path], None] | None = None
    # Moves freshly extracted archives into ``layout``: (root).
    finish: Callable[[Path], None] | None = None
    # prepare's conversion of a split's items into readable labels under the prepared folder before they are
    # checked: (params, items, out, split, n_jobs) -> the converted items.
    convert: Callable[[DatasetConfig, list[Item], Path, str, int], list[Item]] | None = None


def table_names(table: Sequence[str], n_classes: int) -> list[str]:
    """The first ``n_classes`` names of a table; indices past its end are named ``class<i>``."""
    return [table[i] if i < len(table) else f"class{i}" for i in range(n_classes)]


def source_digest(*functions: Callable) -> str:
    """Digest of the source of the functions a conversion runs: its resumable results are keyed by it, as the
    CRF's and train's are by their code (DVC reruns prepare when datasets.py changes, the results must follow)."""
    return fingerprint(*(inspect.getsource(f) for f in functions))


# --- synthetic: generated in the VOC layout ---------------------------------------------------------------

def _generate_synthetic(cfg: DatasetConfig, root: Path) -> None:
    s = cfg.synthetic
    synthetic.generate(root, s.n_train, s.n_val, s.height, s.width, cfg.n_classes, s.seed)


def _synthetic_items(cfg: DatasetConfig, root: Path, split: str) -> list[Item]:
    return voc_layout_items(root, split)


# --- PASCAL VOC 2012 with SBD's augmented labels ----------------------------------------------------------

def _voc_aug_items(cfg: DatasetConfig, root: Path, split: str) -> list[Item]:
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
    check_files(items, f"{cfg.name} split {split!r}")
    return items


def _finish_voc(root: Path) -> None:
    shutil.rmtree(root / VOC_DIR / "__MACOSX", ignore_errors=True)
    if (root / VOC_DIR / "list").is_dir():  # DeepLab's list.zip: list/ -> ImageSets/SegmentationAug/
        dest = root / VOC_DIR / "ImageSets" / "SegmentationAug"
        shutil.rmtree(dest, ignore_errors=True)
        (root / VOC_DIR / "list").rename(dest)


# --- COCO-Stuff 10k: .mat labels, warped to squares by prepare --------------------------------------------

def _cocostuff10k_items(cfg: DatasetConfig, root: Path, split: str) -> list[Item]:
    ids = (root / "imageLists" / f"{split}.txt").read_text().split()
    items = [Item(i, root / "images" / f"{i}.jpg", root / "annotations" / f"{i}.mat") for i in ids]
    check_files(items, f"{cfg.name} split {split!r}")
    return items


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


def warp_image(rgb: np.ndarray, size: int) -> np.ndarray:
    """Bilinear without antialiasing (OpenCV's INTER_LINEAR, as the reference), rounded back to uint8."""
    import torch  # only COCO-Stuff 10k's preparation needs it
    import torch.nn.functional as F

    t = torch.from_numpy(rgb).permute(2, 0, 1)[None].float()
    t = F.interpolate(t, size=(size, size), mode="bilinear", align_corners=False)
    return t[0].permute(1, 2, 0).round().clamp(0, 255).to(torch.uint8).numpy()


def _warp_one(item: Item, size: int, out: Path, code: str) -> Item:
    # Named by what makes them (warp size, code, source image and .mat): prepare's output persists (dvc.yaml),
    # so a rerun for another warp_size or edited sources must never take an earlier warp as finished.
    key = fingerprint(size, code, file_hash(item.image), file_hash(item.label))
    image_path, label_path = (out / folder / f"{item.image_id}.{key}.png" for folder in ("images", "labels"))
    if not (image_path.exists() and label_path.exists()):
        import torch

        torch.set_num_threads(1)
        label = read_mat_label(item.label)
        atomic_save(Image.fromarray(warp_image(read_image(item.image), size)), image_path)
        write_label(label_path, np.asarray(Image.fromarray(label).resize((size, size), Image.NEAREST)))
    return Item(item.image_id, image_path, label_path)


def _warp_cocostuff10k(cfg: DatasetConfig, items: list[Item], out: Path, split: str, n_jobs: int) -> list[Item]:
    """Images and labels warped to ``dataset.warp_size`` squares (PNG, lossless), as the reference trains and
    evaluates on them; warps an earlier run made from the same inputs are reused (the rest are pruned)."""
    if cfg.warp_size is None:
        raise DataError("dataset.warp_size: COCO-Stuff 10k needs a warp size (513 in the reference)")
    from joblib import Parallel, delayed  # only this warp runs in parallel

    code = source_digest(read_mat_label, warp_image, _warp_one)
    jobs = (delayed(_warp_one)(it, cfg.warp_size, out, code) for it in items)
    return list(tqdm(Parallel(n_jobs=n_jobs, return_as="generator")(jobs), total=len(items),
                     desc=f"warp {split}", unit="img"))


# --- COCO-Stuff 164k: COCO 2017 images, stuffthingmaps PNGs -----------------------------------------------

def _cocostuff164k_items(cfg: DatasetConfig, root: Path, split: str) -> list[Item]:
    images = sorted((root / "images" / split).glob("*.jpg"))
    items = [Item(p.stem, p, root / "annotations" / split / f"{p.stem}.png") for p in images]
    check_files(items, f"{cfg.name} split {split!r}")
    return items


# --- COCO 2017 mapped to the 20 PASCAL VOC classes (21 with background) -------------------------------------

# The COCO 2017 images, shared by cocostuff164k and coco21 (published md5, sha1 and size).
COCO2017_IMAGES = (
    Archive("http://images.cocodataset.org/zips/train2017.zip", "images",
            md5="cced6f7f71b7629ddf16f17bbcfab6b2", sha1="10ad623668ab00c62c096f0ed636d6aff41faca5",
            size=19_336_861_798),
    Archive("http://images.cocodataset.org/zips/val2017.zip", "images",
            md5="442b8da7639aecaf257c1dceb8ba8c80", sha1="4950dc9d00dbe1c933ee0170f5797584351d2a41",
            size=815_585_330),
)
# COCO category id of each class index (0: background), the capstone's (jfzhang95's coco loader) list: the 20
# VOC categories in VOC order.
COCO21_CATEGORIES = (0, 5, 2, 16, 9, 44, 6, 3, 17, 62, 21, 67, 18, 19, 4, 1, 64, 20, 63, 7, 72)
# Images whose mask has at most this many labelled (non-background) pixels are dropped, in both splits (the
# capstone filters whichever split it loads).
COCO21_MIN_PIXELS = 1000


def _coco21_items(cfg: DatasetConfig, root: Path, split: str) -> list[Item]:
    """The split's images; the label "as stored" is the split's instance annotations (prepare renders it)."""
    annotations = root / "annotations" / f"instances_{split}.json"
    images = sorted((root / "images" / split).glob("*.jpg"))
    items = [Item(p.stem, p, annotations) for p in images]
    check_files(items, f"{cfg.name} split {split!r}")
    return items


def coco21_mask(instances: Sequence[tuple[list | dict, int]], height: int, width: int) -> np.ndarray:
    """The class-index mask of one image's instances ((segmentation, class index), in annotation order) as the
    capstone renders it: polygons and RLE alike, crowd regions painted as their class like any instance (not
    ignored), each pixel keeping the first instance that covers it, the rest background (0)."""
    from pycocotools import mask as coco_mask

    label = np.zeros((height, width), np.uint8)
    for segmentation, c in instances:
        if not segmentation:
            continue
        if isinstance(segmentation, dict) and not isinstance(segmentation["counts"], list):
            rle = segmentation  # compressed RLE, decodable as it is
        else:  # polygons (a list of them), or uncompressed RLE (crowd regions)
            rle = coco_mask.frPyObjects(segmentation, height, width)
        m = coco_mask.decode(rle)
        covered = m.any(axis=2) if m.ndim == 3 else m.astype(bool)
        label[covered & (label == 0)] = c
    return label


def _render_coco21(chunk: Sequence[tuple[str, int, int, list]], folder: Path) -> list[str]:
    """Render and write each image's mask; returns the ids kept. A dropped image leaves an empty
    ``<id>.small``, so that a resumed prepare skips it too."""
    kept = []
    for image_id, height, width, instances in chunk:
        label = coco21_mask(instances, height, width)
        if np.count_nonzero(label) > COCO21_MIN_PIXELS:
            write_label(folder / f"{image_id}.png", label)  # atomic: a partial PNG never counts as finished
            kept.append(image_id)
        else:
            (folder / f"{image_id}.small").touch()
    return kept


def _render_coco21_split(cfg: DatasetConfig, items: list[Item], out: Path, split: str, n_jobs: int) -> list[Item]:
    """Masks rendered once from the instance annotations into ``out/labels/<split>/<id>.png`` (in parallel);
    masks already there from an interrupted run on the same annotations are kept. Returns the images kept
    (more than ``COCO21_MIN_PIXELS`` labelled pixels)."""
    import hashlib
    import json

    annotations = items[0].label
    try:
        data = annotations.read_bytes()
        coco = json.loads(data)
        by_file = {im["file_name"]: im for im in coco["images"]}
        instances: dict[int, list] = {im["id"]: [] for im in coco["images"]}
        index = {cat: c for c, cat in enumerate(COCO21_CATEGORIES) if c}
        for ann in coco["annotations"]:
            if ann["category_id"] in index:
                instances[ann["image_id"]].append((ann["segmentation"], index[ann["category_id"]]))
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise DataError(f"{annotations}: cannot read the COCO instance annotations ({type(e).__name__}: {e})") from None
    unknown = [it.image.name for it in items if it.image.name not in by_file]
    if unknown:
        raise DataError(f"{annotations}: {len(unknown)} images of split {split!r} have no entry, e.g. {unknown[0]}")
    folder = out / "labels" / split
    # Masks of other annotations (a changed file under the same name), or made by another rule (class table,
    # threshold, rendering code: DVC reruns prepare when datasets.py changes), are never taken as finished.
    rule = fingerprint(COCO21_CATEGORIES, COCO21_MIN_PIXELS,
                       source_digest(coco21_mask, _render_coco21, _render_coco21_split))
    source, digest = folder / ".annotations.sha256", f"{hashlib.sha256(data).hexdigest()} {rule}"
    if not source.is_file() or source.read_text() != digest:
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        write_text(source, digest)
    todo = [(it.image_id, by_file[it.image.name]["height"], by_file[it.image.name]["width"],
             instances[by_file[it.image.name]["id"]]) for it in items
            if not (folder / f"{it.image_id}.png").exists() and not (folder / f"{it.image_id}.small").exists()]
    log.info("%s split %s: %d of %d masks to render", cfg.name, split, len(todo), len(items))
    if todo:
        _chunked(todo, partial(_render_coco21, folder=folder), f"render {split}", "mask", n_jobs)
    kept = [Item(it.image_id, it.image, folder / f"{it.image_id}.png") for it in items
            if (folder / f"{it.image_id}.png").exists()]
    log.info("%s split %s: %d of %d images have more than %d labelled pixels", cfg.name, split, len(kept),
             len(items), COCO21_MIN_PIXELS)
    return kept


# --- custom: the user's own files, described by dataset.custom --------------------------------------------

def _under(root: Path, name: str) -> Path:
    return root / name.lstrip("/")


def _user_text(path: Path, what: str) -> str:
    """A text file the user wrote (a class file, a split list): UTF-8, where the byte-order mark Windows
    editors put first is no part of the first line (it was, invisibly: a class named '\ufeffsky', an id not
    found)."""
    try:
        return path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: {what} is not UTF-8 text (byte {e.start}: {e.reason}): save it as UTF-8") from None


def custom_classes(cfg: DatasetConfig) -> list[str]:
    """dataset.custom.classes: the list, or the names in its text file (one per line; relative to the root)."""
    classes = cfg.custom.classes if cfg.custom else []
    if isinstance(classes, str):
        path = Path(classes) if Path(classes).is_absolute() or not cfg.root else _under(Path(cfg.root), classes)
        try:
            names = [line.strip() for line in _user_text(path, "dataset.custom.classes").splitlines() if line.strip()]
        except (FileNotFoundError, IsADirectoryError) as e:
            raise DataError(f"{path}: cannot read dataset.custom.classes ({type(e).__name__})") from None
        if len(names) != cfg.n_classes:
            raise DataError(f"{path}: {len(names)} class names (dataset.custom.classes), but dataset.n_classes is "
                            f"{cfg.n_classes}: they must be equal")
        if problem := class_names_problem(names):
            raise DataError(f"{path}: {problem} (dataset.custom.classes, one name per line, blank lines skipped)")
        return names
    return list(classes)


def label_lut(cfg: DatasetConfig) -> np.ndarray | None:
    """File label value -> class index or ignore (256 int16 entries) for a custom dataset that remaps values
    (dataset.custom.reduce_zero_label, then its label_map on top), or None where the values are used as
    they are."""
    c = cfg.custom
    if cfg.name != "custom" or c is None or not (c.label_map or c.reduce_zero_label):
        return None
    lut = np.arange(256, dtype=np.int16)
    if c.reduce_zero_label:  # mmsegmentation: 0 is ignored, 1..254 shift down, 255 stays ignored
        lut[1:255] = np.arange(0, 254)
        lut[0] = lut[255] = cfg.ignore_label
        if cfg.ignore_label < 254:
            # File value ignore_label + 1 shifts onto class index ignore_label, which is no class: 256 + it marks
            # it out of range (label_values_error names it) instead of silently ignoring its pixels.
            lut[cfg.ignore_label + 1] = 256 + cfg.ignore_label
    for value, new in c.label_map.items():
        lut[value] = new
    return lut


def _id_glob(pattern: str, split: str, any_case: bool = False) -> tuple[str, re.Pattern[str]]:
    """A glob for the files of ``pattern`` (with ``{split}`` filled; under the root, as ``_under``) and a regex
    capturing their ``{id}``; with ``any_case`` both match letters in either case."""
    before, after = pattern.lstrip("/").format(split=split, id="\0").split("\0")
    fixed = (lambda t: "".join(f"[{c.lower()}{c.upper()}]" if c.isalpha() else c for c in glob.escape(t))) \
        if any_case else glob.escape
    return (fixed(before) + "*" + fixed(after),
            re.compile(re.escape(before) + "(.+)" + re.escape(after), re.IGNORECASE if any_case else 0))


def _glob_ids(root: Path, pattern: str, split: str) -> tuple[dict[str, str], list[str]]:
    """The files under ``root`` that ``pattern`` matches (``_id_glob``), hidden ones skipped: path -> id; and,
    from the same walk, those that match it but for the case of letters."""
    found, any_case = _id_glob(pattern, split, any_case=True)
    _, exact = _id_glob(pattern, split)
    matched: dict[str, str] = {}
    other_case: list[str] = []
    for p in root.glob(found):
        rel = p.relative_to(root).as_posix()
        if not p.is_file() or not (m := any_case.fullmatch(rel)) or m.group(1).startswith("."):
            continue
        if m := exact.fullmatch(rel):
            matched[rel] = m.group(1)
        else:
            other_case.append(rel)
    return matched, sorted(other_case)


def _custom_items(cfg: DatasetConfig, root: Path, split: str) -> list[Item]:
    """The ids of ``dataset.custom.split_list`` (one per line, or '<image> <label>' paths), else the files
    that match the image pattern; missing files are left to prepare's check, which names them all."""
    c = cfg.custom
    assert c is not None  # the config requires it for dataset.name custom
    paths = (lambda i: (_under(root, c.images.format(split=split, id=i)),
                        _under(root, c.labels.format(split=split, id=i)))) if c.images and c.labels else None
    items: list[Item] = []
    if c.split_list:
        listing = _under(root, c.split_list.format(split=split))
        if not listing.is_file():
            raise DataError(f"{listing}: split list of split {split!r} not found (dataset.custom.split_list "
                            f"{c.split_list!r} under dataset.root {root})")
        for n, line in enumerate(_user_text(listing, "the split list").splitlines(), 1):
            parts = line.split()
            if len(parts) == 1 and paths:
                items.append(Item(parts[0], *paths(parts[0])))
            elif len(parts) > 1 and paths and paths(line.strip())[0].is_file():  # an id holding spaces
                items.append(Item(line.strip(), *paths(line.strip())))
            elif len(parts) == 2:
                image, label = (_under(root, p) for p in parts)
                items.append(Item(image.stem, image, label))
            elif parts:
                want = "'<id>' or '<image> <label>'" if paths else ("'<image> <label>' (one id per line needs "
                                                                     "dataset.custom.images and labels)")
                raise DataError(f"{listing}:{n}: expected {want}, got {len(parts)} columns")
    else:
        assert paths is not None and c.images is not None  # the config requires patterns without a split list
        matched, other_case = _glob_ids(root, c.images, split)
        # Files that differ from the pattern in case alone (IMG_1.JPG for {id}.jpg) would be left out silently.
        if other_case:
            raise DataError(f"{root / other_case[0]}: matches dataset.custom.images {c.images!r} of split {split!r} "
                            f"but for the case of letters ({len(other_case)} such files, which would be left out): "
                            "rename them to the pattern's case")
        if not matched:
            raise DataError(f"{cfg.name} split {split!r}: no files match dataset.custom.images {c.images!r} "
                            f"({_id_glob(c.images, split)[0]} under {root})")
        # Labels beside the images, of the same type ({id}.png and {id}_mask.png): the images pattern matches
        # the label files too; a file that is the label of a matched id is no image of its own.
        _, label_id = _id_glob(c.labels, split)
        found = set(matched.values())
        ids = sorted(i for rel, i in matched.items()
                     if not ((m := label_id.fullmatch(rel)) and m.group(1) in found and m.group(1) != i))
        items = [Item(i, *paths(i)) for i in ids]
    return items


def class_colours(cfg: DatasetConfig) -> list[list[int]] | None:
    """dataset.custom.colours (an RGB per class), or None for the VOC palette."""
    colours = cfg.custom.colours if cfg.name == "custom" and cfg.custom else None
    return [[int(c) for c in rgb] for rgb in colours] if colours else None


def colour_table(cfg_or_colours: DatasetConfig | Sequence[Sequence[int]] | None) -> np.ndarray:
    """256 x 3 uint8 colours of label values: a dataset's class colours (its params', or as the weights'
    metadata records them) over the VOC palette."""
    colours = class_colours(cfg_or_colours) if isinstance(cfg_or_colours, DatasetConfig) else cfg_or_colours
    if not colours:
        return PALETTE
    table = PALETTE.copy()
    table[:len(colours)] = np.asarray(colours, np.uint8)
    return table


DATASETS: dict[str, Dataset] = {
    # The embedded default: generated from dataset.synthetic, in the PASCAL VOC layout.
    "synthetic": Dataset(
        classes=SYNTHETIC_CLASSES,
        items=_synthetic_items,
        layout=("JPEGImages/", "SegmentationClass/", "ImageSets/Segmentation/", "ImageSets/Segmentation/{split}.txt"),
        generate=_generate_synthetic,
    ),
    # PASCAL VOC 2012 images with SBD's augmented labels (grayscale PNGs) and DeepLab's train_aug / val lists.
    "voc12": Dataset(
        classes=VOC_CLASSES,
        items=_voc_aug_items,
        layout=(f"{VOC_DIR}/JPEGImages/", f"{VOC_DIR}/SegmentationClassAug/", f"{VOC_DIR}/ImageSets/SegmentationAug/",
                f"{VOC_DIR}/ImageSets/SegmentationAug/{{split}}.txt"),
        archives=(
            Archive("http://host.robots.ox.ac.uk/pascal/VOC/voc2012/VOCtrainval_11-May-2012.tar", ".",
                    md5="6cd6e144f989b92b3379bac3b3de84fd", size=1_999_639_040),
            # SBD-augmented labels as distributed by DrSleep (no checksum published).
            Archive("https://www.dropbox.com/s/oeu149j8qtbs1x0/SegmentationClassAug.zip?dl=1", str(VOC_DIR)),
            # DeepLab's train_aug / val lists (folder list/ -> ImageSets/SegmentationAug/).
            Archive("https://github.com/kazuto1011/deeplab-pytorch/files/2945588/list.zip", str(VOC_DIR)),
        ),
        finish=_finish_voc,
    ),
    # COCO-Stuff 10k v1.1: labels are .mat files (S - 1, unlabeled 255), warped with the images to squares.
    "cocostuff10k": Dataset(
        classes=COCO_STUFF_CLASSES,
        items=_cocostuff10k_items,
        layout=("images/", "annotations/", "imageLists/", "imageLists/{split}.txt"),
        archives=(Archive("http://calvin.inf.ed.ac.uk/wp-content/uploads/data/cocostuffdataset/"
                          "cocostuff-10k-v1.1.zip"),),
        convert=_warp_cocostuff10k,
    ),
    # COCO-Stuff 164k: COCO 2017 images, stuffthingmaps grayscale PNGs (0..181, 255), a folder per split.
    "cocostuff164k": Dataset(
        classes=COCO_STUFF_CLASSES,
        items=_cocostuff164k_items,
        layout=("images/", "annotations/", "images/{split}/", "annotations/{split}/"),
        archives=(
            *COCO2017_IMAGES,
            Archive("http://calvin.inf.ed.ac.uk/wp-content/uploads/data/cocostuffdataset/"
                    "stuffthingmaps_trainval2017.zip", "annotations"),
        ),
    ),
    # COCO 2017 instance masks mapped to the 20 VOC classes + background (the DeepLab v3+ COCO capstone's data):
    # masks rendered by prepare from annotations/instances_<split>.json, small ones dropped.
    "coco21": Dataset(
        classes=VOC_CLASSES,
        items=_coco21_items,
        layout=("images/{split}/", "annotations/instances_{split}.json"),
        archives=(
            *COCO2017_IMAGES,
            Archive("http://images.cocodataset.org/annotations/annotations_trainval2017.zip", ".",
                    sha1="8551ee4bb5860311e79dace7e79cb91e432e78b3"),
        ),
        convert=_render_coco21_split,
    ),
    # The user's own files under dataset.root, described by dataset.custom (README, "Your own dataset").
    "custom": Dataset(classes=(), items=_custom_items),
}


def class_names(cfg: DatasetConfig) -> list[str]:
    """The ``dataset.n_classes`` class names of the configured dataset."""
    table = DATASETS[cfg.name].classes
    return table_names(table, cfg.n_classes) if table else custom_classes(cfg)


def check_layout(cfg: DatasetConfig, root: Path) -> None:
    """Raise naming every expected folder or split list that is missing under ``root``."""
    if not root.is_dir():
        # E.g. a clone of a repo whose dataset.root is outside it: DVC pulls outputs, not the folder.
        hint = " (`dvc repro -f download` downloads the dataset into it)" if DATASETS[cfg.name].archives else ""
        raise DataError(f"dataset.root {root}: folder not found{hint}")
    missing = layout_missing(cfg, root)
    if missing:
        raise DataError(f"{cfg.name} dataset at {root} is incomplete: missing {missing}")


def layout_missing(cfg: DatasetConfig, root: Path) -> str | None:
    """The expected folders and split lists missing under the folder ``root`` ("VOC2012/JPEGImages (folder),
    ..."), or None."""
    layout = DATASETS[cfg.name].layout
    splits = dict.fromkeys((cfg.train_split, cfg.val_split))
    need = [n for n in layout if "{split}" not in n] + [n.format(split=s) for s in splits for n in layout
                                                          if "{split}" in n]
    missing = [n for n in dict.fromkeys(need)
               if not ((root / n).is_dir() if n.endswith("/") else (root / n).is_file())]
    return ", ".join(f"{n.rstrip('/')} ({'folder' if n.endswith('/') else 'file'})" for n in missing) or None


def finish_layout(cfg: DatasetConfig, root: Path) -> None:
    """Move freshly extracted archives into the layout the readers expect."""
    finish = DATASETS[cfg.name].finish
    if finish is not None:
        finish(root)


def _inside(image_id: str) -> bool:
    """Whether ``folder / f"{image_id}.npy"`` stays inside ``folder`` whatever the folder."""
    return all(part not in ("", ".", "..") for part in image_id.split("/"))


def split_items(cfg: DatasetConfig, root: Path, split: str) -> list[Item]:
    """Items of one split, labels as stored (for COCO-Stuff 10k the raw ``.mat``: prepare converts it)."""
    items = DATASETS[cfg.name].items(cfg, root, split)
    if not items:
        raise DataError(f"{cfg.name} split {split!r} under {root} is empty")
    # Ids name the files the stages write (data/logits/<id>.npy, predictions, remapped labels): an absolute id
    # or one with '..' would write outside those folders, where DVC tracks nothing (or anywhere on disk).
    escaping = [it.image_id for it in items if not _inside(it.image_id)]
    if escaping:
        raise DataError(f"{cfg.name} split {split!r}: image id {escaping[0]!r} is not a relative path inside its "
                        f"folder ({len(escaping)} such ids): ids name the files written for each image "
                        "(data/logits/<id>.npy), so they may hold '/' but not start with it, nor hold '.' or '..' "
                        "parts")
    # Any dataset's list (a hand-edited VOC or COCO-Stuff 10k list too): a repeated id would be scored twice.
    twice = [i for i, n in Counter(it.image_id for it in items).items() if n > 1]
    if twice:
        raise DataError(f"{cfg.name} split {split!r}: image id {twice[0]!r} is listed more than once "
                        f"({len(twice)} such ids; ids name the predictions, so they must be unique)")
    return items


MAX_REPORTED = 20  # bad pairs listed in one error


def check_pair(item: Item, n_classes: int, ignore: int, lut: np.ndarray | None = None,
               ) -> tuple[str | None, tuple[str, str], tuple[int, ...]]:
    """What is wrong with one image/label pair (missing, unreadable, sizes differ, label values out of range
    after ``lut``), or None; the md5 of its image and label (the list's digest columns, as DVC computes
    them); and the values its label file holds (none if it could not be read). Each file is read once: the
    image's bytes hashed and decoded to its header only, the label's hashed and decoded."""
    digests = ("", "")
    try:
        data = item.image.read_bytes()
        digests = (hashlib.md5(data).hexdigest(), "")
        with Image.open(io.BytesIO(data)) as im:
            w, h = im.size
            if im.getexif().get(0x0112, 1) in (5, 6, 7, 8):  # EXIF rotation by 90 degrees: read_image swaps them
                w, h = h, w
    except FileNotFoundError:
        return f"{item.image}: image file not found", digests, ()
    except (OSError, SyntaxError, ValueError) as e:
        return f"{item.image}: cannot read image ({e})", digests, ()
    try:
        data = item.label.read_bytes()
        digests = (digests[0], hashlib.md5(data).hexdigest())
    except OSError:  # missing or unreadable: read_label below opens it itself and names what is wrong
        data = None
    try:
        label = read_label(item.label, data)
    except DataError as e:
        return str(e), digests, ()
    counts = np.bincount(label.ravel(), minlength=256)  # one count serves the values and their check
    values = tuple(int(v) for v in np.flatnonzero(counts))
    if label.shape != (h, w):
        return (f"{item.label}: label size {label.shape[1]}x{label.shape[0]} differs from image size {w}x{h}",
                digests, values)
    problem = label_values_error(label, n_classes, ignore, lut, counts)
    return (f"{item.label}: {problem}" if problem else None), digests, values


def _check_chunk(chunk: Sequence[Item], n_classes: int, ignore: int,
                 lut: np.ndarray | None) -> list[tuple[str | None, tuple[str, str], tuple[int, ...]]]:
    return [check_pair(it, n_classes, ignore, lut) for it in chunk]


def _chunked(items: Sequence[Item], work: Callable[[Sequence[Item]], list], desc: str, unit: str,
             n_jobs: int) -> list:
    """``work`` over chunks of ``items``, in joblib workers past a thousand items, with a progress bar; the
    chunks' results concatenated in order."""
    size = max(1, min(256, -(-len(items) // 16)))
    chunks = [items[i:i + size] for i in range(0, len(items), size)]
    if len(items) > 1000:
        from joblib import Parallel, delayed

        results = Parallel(n_jobs=n_jobs, return_as="generator")(delayed(work)(c) for c in chunks)
    else:  # a few hundred small pairs are quicker in this process than starting workers
        results = (work(c) for c in chunks)
    out: list = []
    with tqdm(total=len(items), desc=desc, unit=unit) as bar:
        for chunk, found in zip(chunks, results, strict=True):
            out += found
            bar.update(len(chunk))
    return out


def check_pairs(items: Sequence[Item], n_classes: int, ignore: int, what: str, n_jobs: int = -1,
                lut: np.ndarray | None = None) -> tuple[list[str], list[tuple[str, str]], set[int]]:
    """Every pair checked and hashed in one pass, in parallel (with a progress bar): the problems found, each
    item's (image md5, label md5) in order, and the label values the files hold."""
    results = _chunked(items, partial(_check_chunk, n_classes=n_classes, ignore=ignore, lut=lut), f"check {what}",
                       "pair", n_jobs)
    return [p for p, _, _ in results if p], [d for _, d, _ in results], {v for _, _, vs in results for v in vs}


def classes_to_learn_error(cfg: DatasetConfig, values: set[int], lut: np.ndarray | None,
                           names: Sequence[str]) -> DataError | None:
    """The error for a training split whose labels hold at most one class (after ``lut``), or None; a model
    can learn nothing from it, and evaluate scores the rest as absent. Binary masks saved as 0/255 are the usual
    cause: 255 is the ignore label, so every foreground pixel is ignored and mean IoU comes out 1.0."""
    classes = sorted({int(lut[v]) if lut is not None else v for v in values} & set(range(cfg.n_classes)))
    if len(classes) > 1:
        return None
    held = f"only class {classes[0]} ({names[classes[0]]})" if classes else "no class"
    mapped = {v for v in values if (int(lut[v]) if lut is not None else v) == cfg.ignore_label}
    hint = (f": file value(s) {', '.join(map(str, sorted(mapped)))} give dataset.ignore_label {cfg.ignore_label}, "
            "which is ignored") if mapped else ""
    if 255 in mapped and cfg.name == "custom":
        hint += " (binary masks saved as 0/255? dataset.custom.label_map {255: 1} makes 255 class 1)"
    return DataError(f"{cfg.name} split {cfg.train_split!r}: the labels hold {held} of dataset.n_classes "
                     f"{cfg.n_classes}, nothing to learn the others from{hint}")


def bad_pairs_error(bad: Sequence[str], n_items: int, what: str) -> DataError:
    shown = "\n  ".join(bad[:MAX_REPORTED])
    more = f"\n  ... and {len(bad) - MAX_REPORTED} more" if len(bad) > MAX_REPORTED else ""
    return DataError(f"{what}: {len(bad)} of {n_items} image/label pairs are bad:\n  {shown}{more}")


def _remap(chunk: Sequence[Item], lut: np.ndarray, folder: Path) -> list[tuple[Item, str]]:
    """Each label written remapped under ``folder``; the new item and the md5 of the file written."""
    out = []
    for it in chunk:
        path = folder / f"{it.image_id}.png"
        write_label(path, lut[read_label(it.label)])
        out.append((Item(it.image_id, it.image, path), file_hash(path)))
    return out


def prepare(cfg: DatasetConfig, root: Path, out: Path, n_jobs: int = -1) -> dict[str, int]:
    """Write ``out/<split>.txt`` for the train and val splits (and ``out/classes.json``, the class names) once
    every pair of both has been checked (see
    ``check_pairs``), after the dataset's conversion (``Dataset.convert``, e.g. COCO-Stuff 10k's warp). Labels
    whose values a custom dataset remaps are written remapped under ``out/labels/<split>/`` once all pairs
    are good. Returns the item count per split."""
    ds = DATASETS[cfg.name]
    check_layout(cfg, root)
    names = class_names(cfg)  # a custom class file that does not fit fails here, before any image is read
    lut = label_lut(cfg)
    splits: dict[str, tuple[list[Item], list[tuple[str, str]]]] = {}
    bad: list[str] = []
    train_values: set[int] = set()
    for split in dict.fromkeys((cfg.train_split, cfg.val_split)):
        items = split_items(cfg, root, split)
        if ds.convert is not None:
            items = ds.convert(cfg, items, out, split, n_jobs)
        found, digests, values = check_pairs(items, cfg.n_classes, cfg.ignore_label, f"{cfg.name} split {split!r}",
                                             n_jobs, lut)
        bad += found
        splits[split] = items, digests
        if split == cfg.train_split:
            train_values = values
    if bad:
        raise bad_pairs_error(bad, sum(len(items) for items, _ in splits.values()), f"{cfg.name} dataset at {root}")
    if (error := classes_to_learn_error(cfg, train_values, lut, names)) is not None:
        raise error
    # The class names, where later stages can depend on them (dvc.yaml): a custom dataset's class file is read
    # by train (the weights' metadata) and evaluate, and its edits change no list.
    write_json(out / "classes.json", names)
    keep = {out / "classes.json"}
    for split, (items, digests) in splits.items():
        if lut is not None:  # the list names the remapped label: its digest is the written file's
            remapped = _chunked(items, partial(_remap, lut=lut, folder=out / "labels" / split), f"remap {split}",
                                "label", n_jobs)
            items = [it for it, _ in remapped]
            digests = [(image_md5, label_md5) for (image_md5, _), (_, label_md5) in zip(digests, remapped,
                                                                                       strict=True)]
        write_list(out / f"{split}.txt", items, digests)
        log.info("%s split %s: %d images", cfg.name, split, len(items))
        keep |= {out / f"{split}.txt", *(p for it in items for p in (it.image, it.label))}
    prune(out, keep)
    return {split: len(items) for split, (items, _) in splits.items()}


# DVC walks a dataset folder inside the repository twice per `dvc status` (as the download stage's output and as
# prepare's dependency), a stat and a hash look-up per file, and copies it into its cache on ext4: at COCO-Stuff
# 164k's 246,574 files 16-18 s per no-op `dvc repro` on 2 cores, against 6-8 s for a folder outside it
# (bench/dvc_scale.py, README "A large dataset").
LARGE_DATASET_FILES = 50_000


def large_dataset_hint(root: Path, repo: Path, n_files: int) -> str | None:
    """The advice to move a dataset of ``n_files`` listed files out of the repository ``repo``, or None where it
    is small or already outside."""
    if n_files < LARGE_DATASET_FILES or not root.resolve().is_relative_to(repo.resolve()):
        return None
    return (f"dataset.root {root} lies inside the repository and its splits list {n_files:,} files: DVC walks it "
            f"twice per `dvc status` or `dvc repro` and copies it into .dvc/cache on ext4 (at COCO-Stuff 164k's "
            f"246,574 files 16-18 s per no-op run on 2 cores, and the dataset's size again on disk). A folder "
            f"outside the repository, named by dataset.root as an absolute path, is walked once and never copied "
            f"(README: A large dataset)")


_PRUNED_SUFFIXES = {".png", ".jpg", ".jpeg", ".mat", ".txt", ".tmp"}


def prune(out: Path, keep: set[Path]) -> int:
    """Remove what an earlier run left in ``out`` and this one did not write or reuse, so that ``out`` holds
    what a run from scratch makes: the ``keep`` files and, in the folders holding them, the stamps and markers a
    conversion keeps beside them (coco21's annotation digest, ``<id>.small``). prepare's output persists in
    dvc.yaml (coco21's renders survive an interrupted ``dvc repro``), so DVC no longer empties it first.
    Returns the number of files removed."""
    keep = {p.absolute() for p in keep}
    active = {p.parent for p in keep}
    removed = 0
    for p in sorted(out.rglob("*"), key=lambda q: len(q.parts), reverse=True):  # files before their folders
        if p.is_dir() and not p.is_symlink():
            if not any(p.iterdir()):
                p.rmdir()
            continue
        a = p.absolute()
        if a in keep or (a.parent in active and p.suffix.lower() not in _PRUNED_SUFFIXES):
            continue
        p.unlink()
        removed += 1
    if removed:
        log.info("prepare: removed %d files an earlier run left in %s", removed, out)
    return removed
