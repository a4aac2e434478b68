"""Confusion matrix (rows = ground truth, columns = prediction) and the DeepLab scores derived from it."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from tqdm import tqdm

from deeplab.data import IGNORE, DataError, Item, check_label_values, read_label


def confusion(gt: np.ndarray, pred: np.ndarray, n_classes: int) -> np.ndarray:
    """n x n int64 counts of one image; ground-truth pixels outside [0, n) (e.g. 255) are ignored."""
    if gt.shape != pred.shape:
        raise ValueError(f"ground truth {gt.shape} and prediction {pred.shape} differ in shape")
    gt = gt.astype(np.int64, copy=False).ravel()
    pred = pred.astype(np.int64, copy=False).ravel()
    keep = (gt >= 0) & (gt < n_classes)
    return np.bincount(n_classes * gt[keep] + pred[keep], minlength=n_classes**2).reshape(n_classes, n_classes)


def scores(hist: np.ndarray) -> dict[str, object]:
    """Pixel accuracy, mean accuracy, mean IoU over classes present in the ground truth, frequency-weighted
    IoU, and per-class IoU (None where a class never occurs in ground truth or prediction)."""
    hist = hist.astype(np.float64)
    total = hist.sum()
    diag, rows, cols = np.diag(hist), hist.sum(1), hist.sum(0)
    with np.errstate(divide="ignore", invalid="ignore"):
        acc_cls = diag / rows
        iou = diag / (rows + cols - diag)
    present = rows > 0
    freq = rows / total if total else rows
    return {
        "pixel_accuracy": float(diag.sum() / total) if total else float("nan"),
        "mean_accuracy": float(np.nanmean(acc_cls[present])) if present.any() else float("nan"),
        "mean_iou": float(np.nanmean(iou[present])) if present.any() else float("nan"),
        "fw_iou": float((freq[present] * iou[present]).sum()),
        "class_iou": [None if np.isnan(v) else float(v) for v in iou],
    }


def accumulate(items: Sequence[Item], pred_dir: Path, n_classes: int, ignore: int = IGNORE) -> np.ndarray:
    """Confusion matrix over a split, one image at a time (never all predictions in memory). A ground-truth
    value that is neither a class nor ``ignore``, or a predicted value that is not a class, is a DataError
    naming the file: it would otherwise vanish from the matrix or land in the wrong cell. So is a prediction that
    is missing or of another size than its label."""
    hist = np.zeros((n_classes, n_classes), dtype=np.int64)
    for it in tqdm(items, desc=f"evaluate {pred_dir.name}", unit="img"):
        pred_path = pred_dir / f"{it.image_id}.png"
        if not pred_path.is_file():
            raise DataError(f"{pred_path}: no prediction for image {it.image_id!r} of the list: rerun the stage "
                            f"that writes {pred_dir}")
        pred = read_label(pred_path)
        if pred.size and int(pred.max()) >= n_classes:
            raise DataError(f"{pred_path}: predicted class {int(pred.max())} is not below dataset.n_classes "
                            f"{n_classes}: predictions of a model with another class count? Rerun the logits stage")
        gt = check_label_values(read_label(it.label), it.label, n_classes, ignore)
        if gt.shape != pred.shape:
            raise DataError(f"{pred_path}: prediction size {pred.shape[1]}x{pred.shape[0]} differs from its label "
                            f"{it.label} ({gt.shape[1]}x{gt.shape[0]}): made for other images? Rerun the stage "
                            f"that writes {pred_dir}")
        hist += confusion(gt, pred, n_classes)
    return hist
