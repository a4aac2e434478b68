"""Multi-scale inference: per-image logits at the model's output size (stride 8 for v2, 8 or 16 for v3, the
input size for v3+, whose decoder upsamples) stored as float16, and the raw (no-CRF) label maps from upsampling
them to the image size."""

from __future__ import annotations

import contextlib
import errno
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from deeplab.data import DataError, write_label
from deeplab.files import atomic_path
from deeplab.loader import SegmentationDataset
from deeplab.train import RunError, memory_hint


def upsample_probs(logits: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(C, h, w) stride-8 logits -> (C, H, W) float32 softmax probabilities at image size (bilinear,
    align_corners=False, as the reference)."""
    up = F.interpolate(logits[None].float(), size=size, mode="bilinear", align_corners=False)[0]
    return torch.softmax(up, dim=0)


def upsample_argmax(logits: torch.Tensor, size: tuple[int, int], chunk: int = 16) -> torch.Tensor:
    """argmax over classes of the bilinearly upsampled (C, h, w) logits (as ``upsample_probs``, whose softmax
    does not change the argmax), ``chunk`` classes at a time: full-size memory is ``chunk`` maps, not C."""
    best_value = best_index = None
    for c0 in range(0, logits.shape[0], chunk):
        up = F.interpolate(logits[None, c0:c0 + chunk].float(), size=size, mode="bilinear", align_corners=False)[0]
        value, index = up.max(0)
        if best_value is None:
            best_value, best_index = value, index
        else:
            better = value > best_value  # strict: ties keep the lower class, as argmax does
            best_value = torch.where(better, value, best_value)
            best_index = torch.where(better, index + c0, best_index)
    return best_index.to(torch.uint8)


def save_logits(path: Path, logits: torch.Tensor) -> None:
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.save(f, logits.cpu().numpy().astype(np.float16))


def load_logits(path: Path) -> torch.Tensor:
    """(C, h, w) float32 logits of one image; a missing, unreadable or non-finite file is a DataError naming it."""
    try:
        arr = np.load(path, allow_pickle=False)
    except FileNotFoundError:
        raise DataError(f"{path}: logits file not found (run the logits stage)") from None
    except (OSError, ValueError, EOFError) as e:  # truncated or not an .npy file
        raise DataError(f"{path}: cannot read logits ({e}); rerun the logits stage to rewrite it") from None
    if arr.ndim != 3 or not np.issubdtype(arr.dtype, np.floating):
        raise DataError(f"{path}: expected (classes, height, width) float logits, got {arr.dtype} {arr.shape}")
    if not np.isfinite(arr).all():
        raise DataError(f"{path}: logits hold NaN or infinite values ({int((~np.isfinite(arr)).sum())} of "
                        f"{arr.size}); rerun the logits stage, and check the weights if it happens again")
    return torch.from_numpy(arr.astype(np.float32))


@torch.inference_mode()
def predict_logits(model: nn.Module, image: torch.Tensor, amp: bool = False) -> torch.Tensor:
    """Max-fused multi-scale logits (1, C, h, w) for one input image (1, 3, H, W) (``loader.to_input``)."""
    with torch.autocast(image.device.type, dtype=torch.bfloat16, enabled=amp):
        return model(image).float()


def dump_logits(model: nn.Module, dataset: SegmentationDataset, logits_dir: Path, pred_dir: Path,
                device: torch.device, num_workers: int = 0, amp: bool = False, channels_last: bool = False,
                indices: Iterable[int] | None = None) -> int:
    """Write ``<id>.npy`` (float16 stride-8 logits) and ``<id>.png`` (raw argmax) for each image."""
    layout = torch.channels_last if channels_last else torch.contiguous_format
    model.eval().to(device, memory_format=layout)
    subset = list(indices) if indices is not None else list(range(len(dataset)))
    loader = DataLoader(torch.utils.data.Subset(dataset, subset), batch_size=1, num_workers=num_workers,
                        pin_memory=device.type == "cuda")
    hint = "inference runs one whole image at a time: set logits.amp: true (bf16 on CUDA), or logits.device: cpu"
    for image, label, (image_id,) in tqdm(loader, desc="logits", unit="img"):
        with memory_hint(f"on image {image_id} ({image.shape[-2]}x{image.shape[-1]})", hint):
            image = image.to(device, non_blocking=True).contiguous(memory_format=layout)
            logits = predict_logits(model, image, amp)[0]
        with disk_hint(f"writing the logits of {image_id}", logits_dir, pred_dir):
            save_logits(logits_dir / f"{image_id}.npy", logits)
            write_label(pred_dir / f"{image_id}.png", upsample_argmax(logits, tuple(label.shape[-2:])).cpu().numpy())
    return len(subset)


@contextlib.contextmanager
def disk_hint(what: str, *folders: Path) -> Iterator[None]:
    """A full disk (or quota) becomes one RunError naming the output folders, not an OSError traceback."""
    try:
        yield
    except OSError as e:
        if e.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        names = " and ".join(str(f) for f in folders)
        raise RunError(f"no space left on the device {what}: free space where {names} live, or point the "
                       f"outputs elsewhere ({e.strerror})") from None
