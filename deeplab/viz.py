"""Pictures and tables people look at: confusion matrix, per-class IoU, most confused class pairs, label
colouring, prediction overlays with a legend, and grids of example predictions.

Label panels are drawn with PIL (exact colours, nearest-neighbour resizing); charts with matplotlib. PNGs that
get committed are kept to a few hundred KB."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from deeplab.data import IGNORE, PALETTE, atomic_save
from deeplab.files import atomic_path

# Pixel budget of an examples grid: photos compress poorly, and the grid is committed to git.
GRID_PIXELS = 400_000


def colorize(label: np.ndarray, colours: np.ndarray | None = None) -> np.ndarray:
    """RGB of a label map: ``colours`` (256 x 3, a dataset's own, ``datasets.colour_table``) or the VOC palette."""
    return (PALETTE if colours is None else colours)[label]


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_confusion(hist: np.ndarray, names: Sequence[str], path: Path, max_classes: int = 40) -> None:
    """Row-normalised confusion matrix (recall per ground-truth class). Past ``max_classes`` only the
    classes most involved in confusions are drawn, so 182 classes stay readable."""
    plt = _pyplot()
    n = len(names)
    keep = np.arange(n)
    if n > max_classes:
        off = hist.astype(np.float64).copy()
        np.fill_diagonal(off, 0)
        keep = np.sort(np.argsort(-(off.sum(0) + off.sum(1)))[:max_classes])
    rows = hist.sum(1, keepdims=True).astype(np.float64)
    norm = np.divide(hist, rows, out=np.zeros(hist.shape), where=rows > 0)[np.ix_(keep, keep)]
    size = max(4.0, 0.3 * len(keep) + 2)
    fig, ax = plt.subplots(figsize=(size, size))
    im = ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    labels = [names[i] for i in keep]
    ax.set_xticks(range(len(keep)), labels, rotation=90, fontsize=8)
    ax.set_yticks(range(len(keep)), labels, fontsize=8)
    if len(keep) <= 25:
        for i in range(len(keep)):
            for j in range(len(keep)):
                if norm[i, j] >= 0.01:
                    ax.text(j, i, f"{norm[i, j]:.2f}", ha="center", va="center", fontsize=6,
                            color="white" if norm[i, j] > 0.5 else "black")
    ax.set_xlabel("predicted")
    ax.set_ylabel("ground truth")
    ax.set_title("confusion matrix (row-normalised)")
    fig.colorbar(im, ax=ax, fraction=0.046)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)


def plot_class_iou(class_iou: Sequence[float | None], names: Sequence[str], path: Path,
                   mean_iou: float | None = None) -> None:
    """Horizontal bars of per-class IoU in class order. Classes with no IoU (absent from both ground truth and
    prediction) are left out, and the figure grows with the class count, so 182 classes stay readable."""
    plt = _pyplot()
    shown = [(n, v) for n, v in zip(names, class_iou, strict=True) if v is not None]
    n = len(shown)
    many = n > 40
    fig, ax = plt.subplots(figsize=(6.5, max(2.5, (0.16 if many else 0.28) * n + 1.2)))
    if shown:
        y = np.arange(n)
        values = [v for _, v in shown]
        ax.barh(y, values, color="#4c72b0", height=0.75)
        ax.set_yticks(y, [name for name, _ in shown], fontsize=6 if many else 8)
        ax.set_ylim(n - 0.5, -0.5)  # first class on top
        if not many:
            for i, v in enumerate(values):
                inside = v > 0.85  # no room right of the bar
                ax.text(v - 0.01 if inside else v + 0.01, i, f"{v:.2f}", va="center", fontsize=7,
                        ha="right" if inside else "left", color="white" if inside else "black")
        if mean_iou is not None and np.isfinite(mean_iou):
            ax.axvline(mean_iou, color="#c44e52", linestyle="--", linewidth=1, label=f"mean IoU {mean_iou:.3f}")
            ax.legend(loc="lower right", fontsize=7)
    else:
        ax.text(0.5, 0.5, "no class in ground truth or prediction", ha="center", va="center")
        ax.set_yticks([])
    ax.set_xlim(0, 1)
    ax.set_xlabel("IoU")
    ax.set_title(f"per-class IoU ({n} classes)")
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=80 if many else 100)
    plt.close(fig)


def top_confusions(hist: np.ndarray, k: int = 20) -> list[tuple[int, int, int, float]]:
    """The ``k`` largest off-diagonal cells of a confusion matrix (rows = ground truth) as (ground truth,
    predicted, pixels, share of the ground-truth class's pixels), largest first, ties in class order.
    Empty cells are left out, so fewer than ``k`` may come back."""
    hist = np.asarray(hist, dtype=np.int64)
    off = hist.copy()
    np.fill_diagonal(off, 0)
    gt, pred = np.nonzero(off)
    counts = off[gt, pred]
    rows = hist.sum(1)
    order = np.lexsort((pred, gt, -counts))[:k]
    return [(int(gt[i]), int(pred[i]), int(counts[i]), float(counts[i] / rows[gt[i]])) for i in order]


def present_classes(label: np.ndarray, names: Sequence[str]) -> list[tuple[int, str]]:
    """(index, name) of each class occurring in ``label``, in index order: the entries of a legend.
    Indices past ``names`` are named ``class<i>``, 255 is ``ignore``."""
    return [(int(i), names[i] if i < len(names) else "ignore" if i == IGNORE else f"class{i}")
            for i in np.unique(label)]


def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: fixed-size bitmap font
        return ImageFont.load_default()


def legend(entries: Sequence[tuple[int, str]], width: int, font_size: int = 12,
           colours: np.ndarray | None = None) -> Image.Image:
    """A white strip of colour swatches and class names, flowed into rows at most ``width`` wide (wider only
    if a single entry is)."""
    font = _font(font_size)
    table = PALETTE if colours is None else colours
    pad, gap = max(4, font_size // 2), font_size
    swatch = font_size
    sizes = [swatch + pad // 2 + int(np.ceil(font.getlength(name))) for _, name in entries]
    width = max([width, *(s + 2 * pad for s in sizes)])
    line = swatch + pad
    rows: list[list[int]] = [[]]
    x = pad
    for i, s in enumerate(sizes):
        if rows[-1] and x + s > width - pad:
            rows.append([])
            x = pad
        rows[-1].append(i)
        x += s + gap
    strip = Image.new("RGB", (width, pad + line * len(rows)), "white")
    draw = ImageDraw.Draw(strip)
    for r, row in enumerate(rows):
        x, y = pad, pad + r * line
        for i in row:
            index, name = entries[i]
            draw.rectangle([x, y, x + swatch - 1, y + swatch - 1], fill=tuple(int(c) for c in table[index]),
                           outline=(128, 128, 128))
            draw.text((x + swatch + pad // 2, y + swatch / 2), name, fill="black", font=font, anchor="lm")
            x += sizes[i] + gap
    return strip


def _fit(panel: np.ndarray, size: tuple[int, int], colours: np.ndarray | None = None) -> Image.Image:
    """An RGB image (H, W, 3) or a label map (H, W) as an RGB PIL image of ``size`` (w, h); labels are resized
    nearest-neighbour so their colours stay exact."""
    if panel.ndim == 2:
        im = Image.fromarray(panel.astype(np.uint8), mode="P")
        im.putpalette((PALETTE if colours is None else colours).tobytes())
        resample = Image.Resampling.NEAREST
    else:
        im = Image.fromarray(panel)
        resample = Image.Resampling.BILINEAR
    if im.size != size:
        im = im.resize(size, resample)
    return im.convert("RGB")


def overlay(rgb: np.ndarray, label: np.ndarray, names: Sequence[str], alpha: float = 0.5,
            max_side: int | None = 1024, colours: np.ndarray | None = None) -> Image.Image:
    """Side by side: the image | the image blended with the colour mask, above a legend of the classes present.
    Panels are shrunk to ``max_side`` (the label PNG keeps full resolution)."""
    h, w = label.shape
    s = min(1.0, max_side / max(h, w)) if max_side else 1.0
    size = (max(1, round(w * s)), max(1, round(h * s)))
    image, mask = _fit(rgb, size), _fit(label, size, colours)
    blend = Image.blend(image, mask, alpha)
    gap = max(2, size[0] // 100)
    font_size = int(np.clip(round((2 * size[0] + gap) / 60), 11, 24))
    strip = legend(present_classes(label, names), 2 * size[0] + gap, font_size, colours)
    canvas = Image.new("RGB", (max(strip.width, 2 * size[0] + gap), size[1] + strip.height), "white")
    canvas.paste(image, (0, 0))
    canvas.paste(blend, (size[0] + gap, 0))
    canvas.paste(strip, (0, size[1]))
    return canvas


def examples_grid(rows: Sequence[tuple[str, Sequence[np.ndarray]]], columns: Sequence[str], names: Sequence[str],
                  cell: int = 192, colours: np.ndarray | None = None) -> Image.Image:
    """One row per example: its id, then its panels (an RGB image (H, W, 3) or a label map (H, W) each), under
    the column titles, above a legend of the classes in any label panel. Panels are shrunk (never enlarged)
    to fit ``cell`` pixels, less when many rows would exceed ``GRID_PIXELS``."""
    n_cols = len(columns)
    cell = int(max(48, min(cell, (GRID_PIXELS / max(1, len(rows) * n_cols)) ** 0.5)))
    font = _font(12)
    pad = 6
    sizes = []
    for _, panels in rows:
        if len(panels) != n_cols:
            raise ValueError(f"examples grid: {len(panels)} panels for {n_cols} columns")
        h, w = panels[0].shape[:2]
        s = min(1.0, cell / max(h, w))
        sizes.append((max(1, round(w * s)), max(1, round(h * s))))
    col_w = max([w for w, _ in sizes] + [int(font.getlength(c)) for c in columns] + [1])
    id_w = max([int(font.getlength(i)) for i, _ in rows] + [0]) + 2 * pad
    head = 12 + 2 * pad
    width = id_w + n_cols * (col_w + pad)
    height = head + sum(h + pad for _, h in sizes)
    labels = [p for _, panels in rows for p in panels if p.ndim == 2]
    present = present_classes(np.concatenate([np.unique(p) for p in labels]) if labels else np.zeros(0, np.uint8),
                              names)
    strip = legend(present, width, colours=colours)
    canvas = Image.new("RGB", (max(width, strip.width), height + strip.height), "white")
    draw = ImageDraw.Draw(canvas)
    for c, title in enumerate(columns):
        draw.text((id_w + c * (col_w + pad) + col_w / 2, head / 2), title, fill="black", font=font, anchor="mm")
    y = head
    for (image_id, panels), (w, h) in zip(rows, sizes, strict=True):
        draw.text((pad, y + h / 2), image_id, fill="black", font=font, anchor="lm")
        for c, panel in enumerate(panels):
            canvas.paste(_fit(panel, (w, h), colours), (id_w + c * (col_w + pad) + (col_w - w) // 2, y))
        y += h + pad
    canvas.paste(strip, (0, height))
    return canvas


def save_compact_png(im: Image.Image, path: Path) -> None:
    """Write ``im`` as a 256-colour PNG (no dithering: flat label colours stay flat and compress well)."""
    atomic_save(im.quantize(256, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE), path, optimize=True)


def plot_examples(rows: Sequence[tuple[str, Sequence[np.ndarray]]], columns: Sequence[str], names: Sequence[str],
                  path: Path, cell: int = 192, colours: np.ndarray | None = None) -> None:
    """``examples_grid`` saved as a compact PNG; with no rows, a small note saying so (the file is a DVC
    output and must exist)."""
    if rows:
        im = examples_grid(rows, columns, names, cell, colours)
    else:
        im = Image.new("RGB", (320, 40), "white")
        ImageDraw.Draw(im).text((160, 20), "no examples (evaluate.n_examples: 0)", fill="black", font=_font(12),
                                anchor="mm")
    save_compact_png(im, path)
