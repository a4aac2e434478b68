"""Dense CRF speed: pydensecrf2 (one core; joblib loky on all cores) against the PyTorch permutohedral lattice
(`deeplab.permutohedral`, CPU, and CUDA one image at a time and batched when present), DeepLab's settings, real
photos from scikit-image.

Prints one JSON line: seconds per image for each backend, per image size and class count, the per-pixel label
agreement of each torch result with pydensecrf's, and the speed ratios of the goals (CUDA against one
pydensecrf core, batched CUDA against pydensecrf on all cores). Without pydensecrf2 installed its rows are null
and the torch rows still run.

    .venv/bin/python bench/crf.py                 # 513x513, 21 and 182 classes
    .venv/bin/python bench/crf.py --quick         # CI size
    .venv/bin/python bench/crf.py --no-torch-cpu  # leave out the torch CPU rows (the GPU check's time is short)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F
from joblib import Parallel, delayed

from deeplab.config import CrfConfig
from deeplab.crf import dense_crf
from deeplab.permutohedral import dense_crf_torch

PHOTOS = ["astronaut", "chelsea", "coffee"]


def photo(name: str, size: int) -> np.ndarray:
    from skimage import data, transform

    img = transform.resize(getattr(data, name)(), (size, size), anti_aliasing=True)
    return np.ascontiguousarray((img * 255).round().astype(np.uint8))


def stride8_logits(rgb: np.ndarray, n_classes: int, seed: int) -> np.ndarray:
    """(C, h/8, w/8) logits like a segmentation net's: smooth noise plus a class per k-means colour cluster."""
    rng = np.random.default_rng(seed)
    h, w = rgb.shape[:2]
    small = ((h + 7) // 8, (w + 7) // 8)
    noise = torch.from_numpy(rng.normal(size=(1, n_classes, *small)).astype(np.float32))
    logits = F.avg_pool2d(F.pad(noise, (1, 1, 1, 1), mode="replicate"), 3, 1)[0] * 3
    px = rgb[::4, ::4].reshape(-1, 3).astype(np.float32)
    centres = px[rng.choice(len(px), 6, replace=False)]
    for _ in range(5):
        cluster = ((px[:, None] - centres[None]) ** 2).sum(2).argmin(1)
        centres = np.stack([px[cluster == k].mean(0) if (cluster == k).any() else centres[k] for k in range(6)])
    full = ((rgb.reshape(-1, 3).astype(np.float32)[:, None] - centres[None]) ** 2).sum(2).argmin(1)
    cls = rng.choice(n_classes, 6, replace=False)[full].reshape(h, w)
    onehot = torch.from_numpy((cls[None] == np.arange(n_classes)[:, None, None]).astype(np.float32))
    logits += 4 * F.adaptive_avg_pool2d(onehot[None], small)[0]
    return logits.numpy()


def upsample(logits: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    up = F.interpolate(torch.tensor(logits)[None], size=size, mode="bilinear", align_corners=False)[0]
    return torch.softmax(up, 0).numpy()


def crf_worker(logits: np.ndarray, rgb: np.ndarray, cfg: CrfConfig) -> np.ndarray:
    # As deeplab.crf: ship the small logits, upsample in the worker, return labels only.
    torch.set_num_threads(1)
    return dense_crf(upsample(logits, rgb.shape[:2]), rgb, cfg)


def timed(fn, n: int, sync=None) -> float:
    start = time.perf_counter()
    for i in range(n):
        fn(i)
    if sync:
        sync()
    return (time.perf_counter() - start) / n


def have_pydensecrf() -> bool:
    try:
        import pydensecrf.densecrf  # noqa: F401
    except ImportError:
        return False
    return True


def ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 2) if a and b else None


def bench_setting(size: int, n_classes: int, n_images: int, cfg: CrfConfig, n_jobs: int,
                  torch_cpu: bool = True, batch: int = 8) -> dict:
    rgbs = [photo(PHOTOS[i % len(PHOTOS)], size) for i in range(n_images)]
    logits = [stride8_logits(rgb, n_classes, seed=i) for i, rgb in enumerate(rgbs)]
    probs = [upsample(lg, rgb.shape[:2]) for lg, rgb in zip(logits, rgbs, strict=True)]
    row: dict = {"size": size, "classes": n_classes, "images": n_images}

    # Without pydensecrf2, the torch results are compared with the argmax (what they change) instead.
    ref = [p.argmax(0) for p in probs]
    row["pydensecrf_1core_s"] = row["pydensecrf_joblib_s"] = None
    if have_pydensecrf():
        def run_ref(i: int) -> None:
            ref[i] = dense_crf(probs[i], rgbs[i], cfg)

        row["pydensecrf_1core_s"] = timed(run_ref, n_images)

        # joblib: at least two tasks per worker so the per-image figure is throughput; workers started and their
        # imports done beforehand (a pipeline run pays that once per split, not per image).
        reps = max(1, -(-2 * n_jobs // n_images))
        with Parallel(n_jobs=n_jobs, backend="loky") as parallel:
            tiny = rgbs[0][:16, :16].copy()
            parallel(delayed(crf_worker)(logits[0][:, :2, :2], tiny, cfg) for _ in range(2 * n_jobs))
            start = time.perf_counter()
            parallel(delayed(crf_worker)(logits[i % n_images], rgbs[i % n_images], cfg)
                     for i in range(reps * n_images))
            row["pydensecrf_joblib_s"] = (time.perf_counter() - start) / (reps * n_images)
        row["joblib_workers"] = n_jobs
        row["changed_by_crf"] = float(np.mean([(r != p.argmax(0)).mean() for r, p in zip(ref, probs, strict=True)]))

    probs_t = [torch.from_numpy(p) for p in probs]
    if torch_cpu:
        dense_crf_torch(probs_t[0], rgbs[0], cfg)  # warm-up
        out = [None] * n_images

        def run_torch(i: int) -> None:
            out[i] = dense_crf_torch(probs_t[i], rgbs[i], cfg).numpy()

        threads = torch.get_num_threads()
        row["torch_cpu_s"] = timed(run_torch, n_images)
        row["torch_cpu_threads"] = threads
        torch.set_num_threads(1)
        try:
            row["torch_cpu_1thread_s"] = timed(run_torch, n_images)
        finally:
            torch.set_num_threads(threads)
        row["agreement_cpu"] = min(float((o == r).mean()) for o, r in zip(out, ref, strict=True))

    row["torch_cuda_s"] = row["torch_cuda_batched_s"] = None
    if torch.cuda.is_available():
        probs_c = [p.cuda() for p in probs_t]
        rgbs_c = [torch.from_numpy(r).cuda() for r in rgbs]
        out_c = [None] * n_images

        def run_cuda(i: int) -> None:
            out_c[i] = dense_crf_torch(probs_c[i], rgbs_c[i], cfg)

        run_cuda(0)
        torch.cuda.synchronize()
        row["torch_cuda_s"] = timed(run_cuda, n_images, sync=torch.cuda.synchronize)
        row["agreement_cuda"] = min(float((o.cpu().numpy() == r).mean()) for o, r in zip(out_c, ref, strict=True))
        # One batch of `batch` images (the photos repeated), as the crf stage batches them (crf.batch_size).
        idx = [i % n_images for i in range(max(batch, n_images))]
        batch_p, batch_rgb = torch.stack([probs_c[i] for i in idx]), torch.stack([rgbs_c[i] for i in idx])
        dense_crf_torch(batch_p, batch_rgb, cfg)
        torch.cuda.synchronize()
        start = time.perf_counter()
        batched = dense_crf_torch(batch_p, batch_rgb, cfg)
        torch.cuda.synchronize()
        row["torch_cuda_batched_s"] = (time.perf_counter() - start) / len(idx)
        row["cuda_batch"] = len(idx)
        batched = batched.cpu().numpy()
        row["agreement_cuda_batched"] = min(float((batched[k] == ref[i]).mean()) for k, i in enumerate(idx))
    # The goals: CUDA >= 40x one pydensecrf core (182 classes), batched CUDA faster than pydensecrf on all cores.
    row["cuda_vs_1core"] = ratio(row["pydensecrf_1core_s"], row["torch_cuda_s"])
    row["cuda_batched_vs_1core"] = ratio(row["pydensecrf_1core_s"], row["torch_cuda_batched_s"])
    row["cuda_batched_vs_joblib"] = ratio(row["pydensecrf_joblib_s"], row["torch_cuda_batched_s"])
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[513], help="square image sizes")
    parser.add_argument("--classes", type=int, nargs="+", default=[21, 182])
    parser.add_argument("--images", type=int, default=3, help="images per setting")
    parser.add_argument("--large-images", type=int, default=2,
                        help="images per setting above 100 classes (pydensecrf takes ~11 s/image at 182 classes)")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="joblib workers for pydensecrf")
    parser.add_argument("--batch", type=int, default=8, help="images in the batched CUDA run (photos repeated)")
    parser.add_argument("--no-torch-cpu", dest="torch_cpu", action="store_false", help="leave out the torch CPU rows")
    parser.add_argument("--quick", action="store_true", help="CI size: 128x128, 2 images")
    if "--quick" in sys.argv:  # new defaults; options given explicitly still win
        parser.set_defaults(sizes=[128], images=2, large_images=2)
    args = parser.parse_args()
    cfg = CrfConfig()
    load = round(os.getloadavg()[0], 2)  # other processes on the machine skew CPU timings
    rows = []
    for size in args.sizes:
        for n_classes in args.classes:
            n = min(args.images, args.large_images) if n_classes > 100 else args.images
            rows.append(bench_setting(size, n_classes, n, cfg, args.jobs, args.torch_cpu, args.batch))
    print(json.dumps({
        "bench": "crf",
        "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "loadavg_1min": [load, round(os.getloadavg()[0], 2)],  # at start and end
        "torch": torch.__version__,
        "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "pydensecrf": have_pydensecrf(),
        "agreement_with": "pydensecrf2" if have_pydensecrf() else "argmax (pydensecrf2 not installed)",
        "settings": {k: v for k, v in cfg.model_dump().items() if k not in ("n_jobs", "reference_image_quirk")},
        "results": rows,
    }))


if __name__ == "__main__":
    main()
