"""Prediction on arbitrary images: the multi-scale model as in evaluation (max-fused 1x and ``model.scales``),
optionally the dense CRF, and per image a colour label PNG and a side-by-side overlay with a legend.

The network is fully convolutional, so any image size runs as it is; ``max_size`` bounds the cost of big
images (network and CRF run on the shrunk image, the labels come back at full size).
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from pydantic import ValidationError

from deeplab.config import PARAMS_FILE, CrfConfig, Params, ParamsError, default_params, load_params
from deeplab.data import DataError, atomic_save, read_image, write_label
from deeplab.datasets import DATASETS, class_names, colour_table
from deeplab.infer import predict_logits, upsample_argmax, upsample_probs
from deeplab.loader import to_input
from deeplab.models import MSC, build_model, conflicts, read_weights_file
from deeplab.viz import overlay, present_classes

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".bmp", ".webp", ".tif", ".tiff", ".gif",
                            ".ppm", ".pgm", ".pnm"})
# Smallest input side: the 0.5x MSC branch must keep at least a pixel, and tiny inputs are enlarged to this.
MIN_SIDE = 16


def find_images(inputs: Sequence[Path]) -> tuple[list[Path], list[str]]:
    """The files given (any suffix: an unreadable one is reported when read) and the image files directly
    inside the folders given (by suffix, sorted, hidden ones skipped), each once; and an error message for
    each input that does not exist or is a folder without images."""
    found: dict[Path, Path] = {}
    errors = []
    for path in inputs:
        if path.is_dir():
            images = sorted(p for p in path.iterdir()
                            if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith("."))
            if not images:
                errors.append(f"{path}: no image files in this folder ({', '.join(sorted(IMAGE_SUFFIXES))})")
            for p in images:
                found.setdefault(p.resolve(), p)
        elif path.exists():
            found.setdefault(path.resolve(), path)
        else:
            errors.append(f"{path}: no such file or folder")
    return list(found.values()), errors


def output_stems(paths: Sequence[Path]) -> list[str]:
    """A distinct output name per input: its stem, plus the suffix (``a_png``) when stems collide, plus a
    counter when even that collides (same names in different folders)."""
    stems = Counter(p.stem for p in paths)
    used = {p.stem for p in paths if stems[p.stem] == 1}
    out = []
    for p in paths:
        if stems[p.stem] == 1:
            out.append(p.stem)
            continue
        base = f"{p.stem}_{p.suffix.lstrip('.').lower()}" if p.suffix else p.stem
        name, n = base, 1
        while name in used:
            n += 1
            name = f"{base}_{n}"
        used.add(name)
        out.append(name)
    return out


def resolve_params(path: Path | None = None, dataset: str | None = None, n_classes: int | None = None) -> Params:
    """``path`` (default: params.yaml if it exists, else the built-in defaults) with the overrides applied.
    ``dataset`` alone also sets the class count to the size of its class table when it changes the dataset."""
    if path is not None or PARAMS_FILE.is_file():
        p = load_params(path or PARAMS_FILE)  # a params file, as for a stage, must hold every section
    else:
        # Kept on purpose: predict runs on weights alone (a released ResNet-101 checkpoint, outside any
        # project), so with no file at all the built-in ResNet-101 defaults describe the network.
        p = default_params()
    if dataset is None and n_classes is None:
        return p
    data = p.model_dump()
    if dataset is not None:
        tables = {name: d.classes for name, d in DATASETS.items() if d.classes}  # custom: names from the params
        if dataset not in tables:
            raise ParamsError(f"--dataset: expected one of {', '.join(tables)}, got {dataset!r}")
        if n_classes is None and dataset != p.dataset.name:
            n_classes = len(tables[dataset])
        data["dataset"]["name"] = dataset
    if n_classes is not None:
        data["dataset"]["n_classes"] = n_classes
    try:
        return Params.model_validate(data)
    except ValidationError as e:
        raise ParamsError(f"--n-classes: {e.errors()[0]['msg']} (got {n_classes})") from None


def architecture(state: Mapping[str, torch.Tensor]) -> str:
    """What a DeepLab state dict holds, read from its shapes, for error messages."""
    if any(k.startswith("base.backbone.") for k in state):
        arch = "deeplabv3plus" if any(k.startswith("base.decoder.") for k in state) else "deeplabv3"
        blocks = [len({m[1] for k in state if (m := re.match(rf"base\.backbone\.layer{i}\.(\d+)\.", k))})
                  for i in range(1, 5)]
        stem, head = state.get("base.backbone.conv1.weight"), state.get("base.classifier.weight")
        return (f"{arch}, n_blocks {tuple(blocks)}, width {stem.shape[0] if stem is not None else '?'}, "
                f"{head.shape[0] if head is not None else '?'} classes")
    blocks = [len({m[1] for k in state if (m := re.match(rf"base\.layer{i}\.(block\d+)\.", k))}) for i in range(2, 6)]
    stem, head = state.get("base.layer1.conv1.conv.weight"), state.get("base.aspp.c0.weight")
    return (f"n_blocks {tuple(blocks)}, width {stem.shape[0] if stem is not None else '?'}, "
            f"{head.shape[0] if head is not None else '?'} classes")


def read_weights(path: Path, p: Params) -> tuple[dict[str, torch.Tensor], dict | None]:
    """A state dict and its metadata (None if it has none) from a .pt/.pth file (plain, a checkpoint holding it
    under ``model``, or written by train with its model config), or converted in memory from a .caffemodel,
    which must then hold an ASPP head for ``dataset.n_classes`` classes."""
    if path.suffix.lower() != ".caffemodel":
        return read_weights_file(path)
    from deeplab.caffe import CaffeError, convert, fresh_head, read_caffemodel

    try:
        layers = read_caffemodel(path)
    except OSError as e:
        raise FileNotFoundError(f"{path}: {e.strerror or e}") from None
    try:
        state, log = convert(layers, p.dataset.n_classes, p.model.n_blocks, p.model.width)
    except CaffeError as e:
        raise ValueError(f"{path}: {e}") from None
    fresh = fresh_head(log)
    if fresh:
        raise ValueError(f"{path}: {fresh.split(':')[0]}: no trained classifier for "
                         f"{p.dataset.n_classes} classes (set the class count with --n-classes or --params)")
    return state, None


def with_metadata(path: Path, meta: dict | None, p: Params, dataset: str | None = None,
                  n_classes: int | None = None) -> tuple[Params, list[str]]:
    """The params with what the weights' metadata fixes (architecture, scales, class count, input mean and
    normalization), and
    the class names for legends. ``dataset`` / ``n_classes`` (the command-line options, None if not given) must
    agree with the metadata; without metadata the params alone say it all."""
    if meta is None:
        return p, class_names(p.dataset)
    clash = [("--n-classes", have, given) for _, have, given in conflicts(meta, n_classes=n_classes)]
    if dataset is not None and dataset != meta["dataset"]:
        clash.append(("--dataset", meta["dataset"], dataset))
    if clash:
        raise ParamsError(f"{path}: " + "; ".join(f"{k} {given} given, but the weights were trained with {have}"
                                                  for k, have, given in clash) + " (leave it out)")
    data = p.model_dump()
    data["model"].update({k: meta[k] for k in ("arch", "output_stride", "n_blocks", "width", "atrous_rates",
                                               "scales")})
    data["dataset"].update(n_classes=meta["n_classes"], mean_bgr=meta["mean_bgr"], normalization=meta["normalization"])
    if DATASETS.get(meta["dataset"]) and DATASETS[meta["dataset"]].classes:  # custom needs its dataset.custom
        data["dataset"]["name"] = meta["dataset"]
    return Params.model_validate(data), list(meta["class_names"])


def fit_model(path: Path, state: Mapping[str, torch.Tensor], p: Params) -> MSC:
    """The MSC model of ``p.model`` / ``p.dataset.n_classes`` with every tensor of ``state`` (strict: a head
    of another class count is an error, never a random head), in eval mode."""
    m = p.model
    model = build_model(p.dataset.n_classes, m.n_blocks, m.width, m.atrous_rates, m.scales, m.arch, m.output_stride)
    own = model.state_dict()
    wrong = [k for k, v in own.items() if k not in state or state[k].shape != v.shape]
    wrong += [k for k in state if k not in own]
    if wrong:
        raise ValueError(f"{path}: weights do not fit the model: the file has {architecture(state)}, the params "
                         f"give {architecture(own)} ({len(wrong)} tensors differ, e.g. {wrong[0]}); set the "
                         "architecture with --params and the class count with --n-classes")
    model.load_state_dict(state)
    return model.eval()


def load_model(path: Path, p: Params) -> MSC:
    """The model of ``path`` (``fit_model``): shaped by its metadata if it has some, else by ``p``."""
    state, meta = read_weights(path, p)
    return fit_model(path, state, with_metadata(path, meta, p)[0])


def network_size(h: int, w: int, max_size: int | None) -> tuple[int, int]:
    """The (h, w) the network sees: shrunk so the long side is at most ``max_size``, enlarged so the short side
    is at least ``MIN_SIDE``."""
    s = 1.0
    if max_size and max(h, w) > max_size:
        s = max_size / max(h, w)
    if min(h, w) * s < MIN_SIDE:
        s = MIN_SIDE / min(h, w)
    return (h, w) if s == 1.0 else (max(1, round(h * s)), max(1, round(w * s)))


def predict_label(model: MSC, rgb: np.ndarray, mean_bgr: Sequence[float], device: torch.device,
                  max_size: int | None = None, crf: CrfConfig | None = None, amp: bool = False,
                  normalization: str = "caffe") -> np.ndarray:
    """(H, W) uint8 class map of an RGB image (H, W, 3) at its own size, fed as ``normalization`` says."""
    h, w = rgb.shape[:2]
    nh, nw = network_size(h, w, max_size)
    net_rgb = rgb if (nh, nw) == (h, w) else np.array(Image.fromarray(rgb).resize((nw, nh), Image.BILINEAR))
    logits = predict_logits(model, to_input(net_rgb, mean_bgr, normalization)[None].to(device), amp)[0]
    if crf is None:
        return upsample_argmax(logits, (h, w)).cpu().numpy()
    from deeplab.crf import dense_crf, reference_quirk_image

    # The CRF runs at the network's size: with --max-size that bounds its cost too.
    probs = upsample_probs(logits, (nh, nw)).cpu().numpy()
    ref = reference_quirk_image(net_rgb, mean_bgr) if crf.reference_image_quirk else net_rgb
    label = dense_crf(probs, ref, crf)
    if (nh, nw) != (h, w):
        label = np.array(Image.fromarray(label).resize((w, h), Image.NEAREST))
    return label


def output_paths(out: Path, stem: str) -> tuple[Path, Path]:
    """The label map and the overlay written for the input of output name ``stem``."""
    return out / f"{stem}_label.png", out / f"{stem}_overlay.png"


def write_outputs(out: Path, stem: str, rgb: np.ndarray, label: np.ndarray, names: Sequence[str],
                  colours: np.ndarray | None = None) -> tuple[Path, Path]:
    """``<stem>_label.png`` (palette PNG, VOC colours or ``colours``) and ``<stem>_overlay.png``, both written
    atomically."""
    label_path, overlay_path = output_paths(out, stem)
    write_label(label_path, label, colours)
    atomic_save(overlay(rgb, label, names, colours=colours), overlay_path)
    return label_path, overlay_path


def predict_images(inputs: Sequence[Path], weights: Path, out: Path, *, params: Path | None = None,
                   dataset: str | None = None, n_classes: int | None = None, crf: bool = False,
                   max_size: int | None = None, device: str = "auto",
                   echo: Callable[[str], None] = print, warn: Callable[[str], None] = print) -> int:
    """Predict every image of ``inputs`` into ``out``; ``echo`` gets one line per image written, ``warn`` one
    line per input that failed (named), and the rest still run. Returns the number of failures. Raises before
    any image if the params, the weights or the device are wrong, if there is no image at all, or if an output
    would overwrite an input."""
    from deeplab.train import pick_device

    p = resolve_params(params, dataset, n_classes)
    paths, errors = find_images(inputs)
    for message in errors:
        warn(message)
    if not paths:
        raise DataError("no images to predict")
    if out.exists() and not out.is_dir():  # else every image fails alike, "[Errno 17] File exists"
        raise DataError(f"--out {out}: exists and is not a folder")
    stems = output_stems(paths)
    # --out beside the inputs: an input named like another's output (x.png, x_label.png) would be overwritten
    # before it is read, and then predicted from the label map written over it.
    inputs_at = {p.resolve(): p for p in paths}
    clobbered = [(inputs_at[q.resolve()], q) for stem in stems for q in output_paths(out, stem)
                 if q.resolve() in inputs_at]
    if clobbered:
        given, written = clobbered[0]
        raise DataError(f"{given}: an input image that the output {written} would overwrite ({len(clobbered)} such "
                        "inputs): give --out a folder apart from the images")
    dev = pick_device(device)
    state, meta = read_weights(weights, p)
    p, names = with_metadata(weights, meta, p, dataset, n_classes)
    model = fit_model(weights, state, p).to(dev)
    colours = colour_table(meta.get("colours") if meta else p.dataset)
    amp = p.logits.amp and dev.type == "cuda"
    failed = len(errors)
    for path, stem in zip(paths, stems, strict=True):
        try:
            rgb = read_image(path)
            label = predict_label(model, rgb, p.dataset.mean_bgr, dev, max_size, p.crf if crf else None, amp,
                                  p.dataset.normalization)
            label_path, overlay_path = write_outputs(out, stem, rgb, label, names, colours)
        except DataError as e:  # names the file already
            warn(str(e))
            failed += 1
        except (RuntimeError, OSError, ValueError) as e:  # out of memory, a failed write: this image only
            warn(f"{path}: {e}")
            failed += 1
        else:
            present = ", ".join(name for _, name in present_classes(label, names))
            echo(f"{path} -> {label_path}, {overlay_path} ({present})")
    return failed
