"""Dense CRF (pydensecrf2) over saved logits, one joblib Parallel over the whole split.

Workers receive only paths: each loads the small stride-8 float16 logits and the image itself, upsamples,
runs mean-field inference and writes the label map atomically, so no full-resolution probability map
crosses a process boundary and a rerun skips finished images.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from joblib import Parallel, delayed
from tqdm import tqdm

from deeplab.config import CrfConfig
from deeplab.data import Item, read_image, write_label

log = logging.getLogger(__name__)


def dense_crf(probs: np.ndarray, rgb: np.ndarray, cfg: CrfConfig) -> np.ndarray:
    """probs (C, H, W) float32 softmax, rgb (H, W, 3) uint8 -> (H, W) uint8 labels after mean field."""
    import pydensecrf.densecrf as dcrf
    from pydensecrf.utils import unary_from_softmax

    c, h, w = probs.shape
    d = dcrf.DenseCRF2D(w, h, c)
    d.setUnaryEnergy(np.ascontiguousarray(unary_from_softmax(probs)))
    d.addPairwiseGaussian(sxy=cfg.pos_xy_std, compat=cfg.pos_w)
    d.addPairwiseBilateral(sxy=cfg.bi_xy_std, srgb=cfg.bi_rgb_std, rgbim=np.ascontiguousarray(rgb),
                           compat=cfg.bi_w)
    q = np.asarray(d.inference(cfg.iterations), dtype=np.float32).reshape(c, h, w)
    return q.argmax(0).astype(np.uint8)


def reference_quirk_image(rgb: np.ndarray, mean_bgr: Sequence[float]) -> np.ndarray:
    """What the reference feeds its CRF: the mean-subtracted BGR float image cast to uint8. The C cast
    truncates toward zero and keeps the low byte, so negatives wrap (-1.5 -> 255); made explicit here."""
    bgr = rgb[..., ::-1].astype(np.float32) - np.asarray(mean_bgr, np.float32)
    return (np.trunc(bgr).astype(np.int64) % 256).astype(np.uint8)


def _inputs(item: Item, logits_dir: Path, cfg: CrfConfig, mean_bgr: Sequence[float], device: str = "cpu"):
    """Upsampled softmax probabilities (C, H, W) float32 and the image the pairwise term sees."""
    from deeplab.infer import load_logits, upsample_probs

    rgb = read_image(item.image)
    probs = upsample_probs(load_logits(logits_dir / f"{item.image_id}.npy").to(device), rgb.shape[:2])
    return probs, (reference_quirk_image(rgb, mean_bgr) if cfg.reference_image_quirk else rgb)


def crf_image(item: Item, logits_dir: Path, out_dir: Path, cfg: CrfConfig,
              mean_bgr: Sequence[float]) -> str:
    """One image with pydensecrf2 (runs in a joblib worker); skips an image already done."""
    import torch

    torch.set_num_threads(1)
    out = out_dir / f"{item.image_id}.png"
    if not out.exists():
        probs, ref = _inputs(item, logits_dir, cfg, mean_bgr)
        write_label(out, dense_crf(probs.numpy(), ref, cfg))
    return item.image_id


def available_memory() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")


def worker_memory(n_classes: int, height: int, width: int) -> int:
    """Bytes one CRF worker needs: interpreter and torch (~400 MB) plus about eight C x H x W float32
    buffers (probabilities, unary, Q, messages); 513x513 at 182 classes gives ~2 GB."""
    return 400 * 2**20 + 8 * 4 * n_classes * height * width


def choose_n_jobs(requested: int | None, n_classes: int, height: int, width: int) -> int:
    cores = os.cpu_count() or 1
    n = requested or cores
    cap = max(1, available_memory() // worker_memory(n_classes, height, width))
    if cap < n:
        log.info("crf: capping n_jobs from %d to %d by available memory (%.1f GB free, ~%.2f GB per worker)",
                 n, cap, available_memory() / 2**30, worker_memory(n_classes, height, width) / 2**30)
        n = int(cap)
    return n


def run_crf(items: Sequence[Item], logits_dir: Path, out_dir: Path, cfg: CrfConfig, mean_bgr: Sequence[float],
            n_jobs: int) -> int:
    """CRF label maps for ``items`` not yet in ``out_dir``; returns how many were computed."""
    out_dir.mkdir(parents=True, exist_ok=True)
    todo = [it for it in items if not (out_dir / f"{it.image_id}.png").exists()]
    if len(todo) < len(items):
        log.info("crf: %d of %d label maps already done, skipping them", len(items) - len(todo), len(items))
    if cfg.backend == "torch":
        _run_torch(todo, logits_dir, out_dir, cfg, mean_bgr)
        return len(todo)
    jobs = [delayed(crf_image)(it, logits_dir, out_dir, cfg, mean_bgr) for it in todo]
    if cfg.parallel == "dask":
        address = cfg.scheduler or os.environ.get("DASK_SCHEDULER_ADDRESS")
        if not address:
            raise ValueError("crf.scheduler: a Dask scheduler address is needed when crf.parallel is 'dask' "
                             "(or set DASK_SCHEDULER_ADDRESS)")
        from dask.distributed import Client
        from joblib import parallel_config

        with Client(address) as client, parallel_config(backend="dask"):
            log.info("crf: %d images on the Dask cluster at %s (%d workers)", len(todo), address,
                     len(client.scheduler_info()["workers"]))
            for _ in tqdm(Parallel(n_jobs=-1, return_as="generator_unordered")(jobs), total=len(todo),
                          desc="crf (dask)", unit="img"):
                pass
        return len(todo)
    results = Parallel(n_jobs=n_jobs, backend="loky", return_as="generator_unordered")(jobs)
    for _ in tqdm(results, total=len(todo), desc=f"crf ({n_jobs} jobs)", unit="img"):
        pass
    return len(todo)


def _run_torch(todo: Sequence[Item], logits_dir: Path, out_dir: Path, cfg: CrfConfig,
               mean_bgr: Sequence[float]) -> None:
    """The PyTorch lattice in this process, one image at a time on the GPU when there is one."""
    import torch

    from deeplab.permutohedral import dense_crf_torch
    from deeplab.train import pick_device

    device = pick_device(cfg.device)
    log.info("crf: torch backend on %s", device)
    for it in tqdm(todo, desc=f"crf (torch, {device.type})", unit="img"):
        probs, ref = _inputs(it, logits_dir, cfg, mean_bgr, str(device))
        labels = dense_crf_torch(probs, torch.from_numpy(np.ascontiguousarray(ref)).to(device), cfg)
        write_label(out_dir / f"{it.image_id}.png", labels.to(torch.uint8).cpu().numpy())
