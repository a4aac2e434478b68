"""Dense CRF (pydensecrf2) over saved logits, one joblib Parallel over the whole split.

Workers receive only paths: each loads the small stride-8 float16 logits and the image itself, upsamples,
runs mean-field inference and writes the label map atomically, so no full-resolution probability map
crosses a process boundary.

Finished maps are kept in a progress folder, keyed by what made them: the settings that change labels and the
code (one folder per key), and each image's logits and image content (in the file name). A rerun reuses exactly
the maps its own inputs would produce, after an interruption or when settings flip back, and never a map made
with other params. The progress folder is not a DVC output, so DVC does not delete it before rerunning the stage;
the stage's output folder is filled from it.
"""

from __future__ import annotations

import functools
import itertools
import logging
import os
import shutil
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from joblib import Parallel, delayed
from PIL import Image
from tqdm import tqdm

from deeplab.config import CrfConfig
from deeplab.data import DataError, Item, read_image, write_label
from deeplab.files import atomic_path, file_hash, fingerprint
from deeplab.infer import load_logits, upsample_probs
from deeplab.permutohedral import dense_crf_torch
from deeplab.train import memory_hint, pick_device

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


def _load(item: Item, logits_dir: Path, cfg: CrfConfig, mean_bgr: Sequence[float]):
    """Stride-8 logits (C, h, w) float32 and the (H, W, 3) uint8 image the pairwise term sees."""
    rgb = read_image(item.image)
    logits = load_logits(logits_dir / f"{item.image_id}.npy")
    return logits, (reference_quirk_image(rgb, mean_bgr) if cfg.reference_image_quirk else rgb)


def crf_image(item: Item, logits_dir: Path, out: Path, cfg: CrfConfig, mean_bgr: Sequence[float]) -> str:
    """One image with pydensecrf2 (runs in a joblib worker), its label map written to ``out``."""
    torch.set_num_threads(1)
    logits, ref = _load(item, logits_dir, cfg, mean_bgr)
    write_label(out, dense_crf(upsample_probs(logits, ref.shape[:2]).numpy(), ref, cfg))
    return item.image_id


# CrfConfig fields that change the label maps; the rest (n_jobs, device, parallel, scheduler, batch_size) only
# change where and how fast they are computed.
RESULT_FIELDS = {"backend", "iterations", "pos_xy_std", "pos_w", "bi_xy_std", "bi_rgb_std", "bi_w",
                 "reference_image_quirk"}
CODE = tuple(Path(__file__).parent / f for f in ("crf.py", "permutohedral.py", "infer.py"))
KEEP_SETTINGS = 4  # settings folders kept in the progress folder, most recently used first


def settings_key(cfg: CrfConfig, mean_bgr: Sequence[float]) -> str:
    """Key of the settings and code that make the label maps (the mean matters only to the reference quirk)."""
    return fingerprint(cfg.model_dump(include=RESULT_FIELDS), list(mean_bgr) if cfg.reference_image_quirk else None,
                       *(file_hash(f) for f in CODE))


def _input_digest(item: Item, logits_dir: Path) -> str:
    path = logits_dir / f"{item.image_id}.npy"
    if not path.is_file():
        raise DataError(f"{path}: logits file not found (run the logits stage)")
    return fingerprint(file_hash(path), file_hash(item.image))


def _prune(progress: Path, keep: int) -> None:
    folders = sorted((d for d in progress.iterdir() if d.is_dir()), key=lambda d: d.stat().st_mtime, reverse=True)
    for d in folders[keep:]:
        log.info("crf: removing old progress %s", d)
        shutil.rmtree(d, ignore_errors=True)


def _publish(src: Path, dest: Path) -> None:
    with atomic_path(dest) as tmp:
        shutil.copyfile(src, tmp)


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
            n_jobs: int, progress: Path | None = None) -> int:
    """CRF label maps ``out_dir/<id>.png`` for ``items``; returns how many were computed. Maps already in
    ``progress`` (default: ``<out_dir>.progress`` beside it) for the same settings, code, logits and image are
    reused; the rest are computed into it first."""
    progress = progress or out_dir.with_name(f"{out_dir.name}.progress")
    store = progress / settings_key(cfg, mean_bgr)
    store.mkdir(parents=True, exist_ok=True)
    os.utime(store)  # most recently used
    _prune(progress, KEEP_SETTINGS)
    with ThreadPoolExecutor(max_workers=4) as pool:  # hashing releases the GIL
        digests = list(pool.map(lambda it: _input_digest(it, logits_dir), items))
    done = {it.image_id: store / f"{it.image_id}.{d}.png" for it, d in zip(items, digests, strict=True)}
    todo = [it for it in items if not done[it.image_id].exists()]
    if len(todo) < len(items):
        log.info("crf: %d of %d label maps reused from %s (same settings, code, logits and image)",
                 len(items) - len(todo), len(items), store)
    _compute(todo, done, logits_dir, cfg, mean_bgr, n_jobs)
    # Maps of these images made from earlier logits or images; those of other images stay (a crf.subset run
    # must not drop the rest of the split's maps).
    # Files only, in subfolders too: an id may hold '/' ('a/b' beside 'a': the folder a is no map of id a).
    for stale in {f for f in store.rglob("*") if f.is_file()} - set(done.values()):
        if stale.relative_to(store).as_posix().rsplit(".", 2)[0] in done:
            stale.unlink(missing_ok=True)
    for it in items:
        _publish(done[it.image_id], out_dir / f"{it.image_id}.png")
    return len(todo)


def _compute(todo: Sequence[Item], done: dict[str, Path], logits_dir: Path, cfg: CrfConfig,
             mean_bgr: Sequence[float], n_jobs: int) -> None:
    if not todo:
        return
    if cfg.backend == "torch":
        _run_torch(todo, done, logits_dir, cfg, mean_bgr)
        return
    jobs = [delayed(crf_image)(it, logits_dir, done[it.image_id], cfg, mean_bgr) for it in todo]
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
        return
    results = Parallel(n_jobs=n_jobs, backend="loky", return_as="generator_unordered")(jobs)
    for _ in tqdm(results, total=len(todo), desc=f"crf ({n_jobs} jobs)", unit="img"):
        pass


def torch_batch_size(device: torch.device, n_classes: int, height: int, width: int,
                     free_bytes: int | None = None) -> int:
    """Images per torch-backend batch on ``device``: 1 on CPU (threads already use every core); on CUDA as many
    as ~70% of free memory holds, at most 16. Per image about 2 KB per pixel for the lattice operators plus
    ~24 bytes per pixel and class for the marginals (measured at 513x513: 0.6 GB at 21 classes, 1.5 GB at 182)."""
    if device.type != "cuda":
        return 1
    if free_bytes is None:  # free on the device plus what PyTorch's caching allocator holds unused
        free_bytes = (torch.cuda.mem_get_info(device)[0] + torch.cuda.memory_reserved(device)
                      - torch.cuda.memory_allocated(device))
    per_image = height * width * (2048 + 24 * n_classes)
    return int(max(1, min(16, 0.7 * free_bytes // per_image)))


def _prefetch(fn: Callable, items: Sequence, pool: ThreadPoolExecutor, depth: int) -> Iterator:
    """fn(item) for each item in order, computed ``depth`` ahead in ``pool`` (bounded memory, unlike map)."""
    pending: deque[Future] = deque()
    rest = iter(items)
    for item in itertools.islice(rest, depth):
        pending.append(pool.submit(fn, item))
    while pending:
        result = pending.popleft().result()
        for item in itertools.islice(rest, 1):
            pending.append(pool.submit(fn, item))
        yield result


def _run_torch(todo: Sequence[Item], done: dict[str, Path], logits_dir: Path, cfg: CrfConfig,
               mean_bgr: Sequence[float]) -> None:
    """The PyTorch lattice in this process, on the GPU when there is one. Reading and writing run in threads
    beside the mean field, and images of one size are batched (sorted by size first) as memory allows."""
    device = pick_device(cfg.device)
    if device.type == "cpu" and cfg.n_jobs:
        torch.set_num_threads(cfg.n_jobs)
    log.info("crf: torch backend on %s", device if device.type == "cuda" else f"cpu, {torch.get_num_threads()} "
             "threads")
    if (cfg.batch_size or 0) > 1 or (cfg.batch_size is None and device.type == "cuda"):
        todo = sorted(todo, key=_image_size)  # equal sizes together, for batches (headers only, no decoding)

    def crf_batch(batch: list[tuple[Item, torch.Tensor, np.ndarray]]) -> list[torch.Tensor]:
        size = batch[0][2].shape[:2]
        probs = torch.stack([upsample_probs(logits.to(device, non_blocking=True), size) for _, logits, _ in batch])
        rgb = torch.from_numpy(np.stack([ref for *_, ref in batch])).to(device)
        return list(dense_crf_torch(probs, rgb, cfg).cpu())

    def run(batch: list[tuple[Item, torch.Tensor, np.ndarray]]) -> list[torch.Tensor]:
        """A batch that does not fit after all is split in halves (outside the except block, so the failed
        attempt's tensors are already freed)."""
        try:
            return crf_batch(batch)
        except torch.cuda.OutOfMemoryError:
            if len(batch) == 1:
                raise
        torch.cuda.empty_cache()
        return run(batch[:len(batch) // 2]) + run(batch[len(batch) // 2:])

    @functools.cache
    def limit(n_classes: int, height: int, width: int) -> int:
        return cfg.batch_size or torch_batch_size(device, n_classes, height, width)

    writes: deque[Future] = deque()
    with ThreadPoolExecutor(max_workers=2) as pool, tqdm(total=len(todo), desc=f"crf (torch, {device.type})",
                                                         unit="img") as bar:
        loaded = _prefetch(lambda it: (it, *_load(it, logits_dir, cfg, mean_bgr)), todo, pool, depth=4)
        for batch in _same_size_batches(loaded, lambda e: limit(e[1].shape[0], *e[2].shape[:2])):
            (first, logits, ref) = batch[0]
            with memory_hint(f"in the CRF of {first.image_id} ({ref.shape[0]}x{ref.shape[1]}, {logits.shape[0]} "
                             f"classes, batch of {len(batch)})", "set crf.batch_size: 1 or crf.device: cpu"):
                labels = run(batch)
            writes.extend(pool.submit(write_label, done[it.image_id], lab.numpy())
                          for (it, *_), lab in zip(batch, labels, strict=True))
            while len(writes) > 32:  # a GPU outpacing the disk must not pile up label maps in memory
                writes.popleft().result()
            bar.update(len(batch))
        for w in writes:
            w.result()


def _image_size(item: Item) -> tuple[int, int]:
    with Image.open(item.image) as im:
        return im.size


def _same_size_batches(entries: Iterator[tuple], limit: Callable[[tuple], int]) -> Iterator[list[tuple]]:
    """Consecutive (item, logits, image) entries of one image size, at most limit(first entry) per batch."""
    batch: list[tuple] = []
    for entry in entries:
        if batch and (entry[2].shape != batch[0][2].shape or len(batch) >= limit(batch[0])):
            yield batch
            batch = []
        batch.append(entry)
    if batch:
        yield batch
