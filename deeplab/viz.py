"""Pictures people look at: confusion matrix, per-class IoU, label colouring."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from deeplab.data import PALETTE
from deeplab.files import atomic_path


def colorize(label: np.ndarray) -> np.ndarray:
    return PALETTE[label]


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
