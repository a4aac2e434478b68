"""DeepLab v2 training: Caffe-equivalent parameter groups, stepped poly lr, multi-scale loss, gradient
accumulation, frozen BatchNorm, and atomic checkpoints that resume with the same schedule and data order."""

from __future__ import annotations

import contextlib
import csv
import logging
import math
import os
import random
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from deeplab.config import DatasetConfig, ModelConfig, TrainConfig
from deeplab.data import IGNORE, DataError
from deeplab.datasets import class_colours, class_names
from deeplab.files import atomic_path, file_hash, fingerprint, remove_stale_temps, save_torch
from deeplab.loader import Augment, DrawSampler, SegmentationDataset, worker_error
from deeplab.models import build_model, freeze_bn, is_v2, load_weights, refusal_message, weights_file

log = logging.getLogger(__name__)

# Source files whose edits invalidate a checkpoint (the training loop, the model and the data pipeline).
CODE = tuple(Path(__file__).parent / f for f in ("train.py", "models.py", "data.py", "loader.py", "arch.py",
                                                 "resnet.py", "deeplabv3.py"))


# train.* fields that change no weight: a checkpoint written under other values of them is resumed.
RESUME_INDEPENDENT = {"device", "num_workers", "log_every", "checkpoint_every"}


class RunError(RuntimeError):
    """A run that cannot go on (non-finite loss, out of memory); the message says what to change."""


@contextlib.contextmanager
def memory_hint(what: str, hint: str) -> Iterator[None]:
    """Turn an out-of-memory error (CUDA, or the CPU allocator) into a RunError that names the params
    to lower instead of a bare allocator trace."""
    try:
        yield
    except (MemoryError, RuntimeError) as e:  # torch.cuda.OutOfMemoryError is a RuntimeError
        text = str(e).strip()
        first = text.splitlines()[0] if text else type(e).__name__
        oom = (isinstance(e, MemoryError | torch.cuda.OutOfMemoryError) or "can't allocate memory" in first
               or "out of memory" in first.lower())
        if not oom:
            raise
        raise RunError(f"out of memory {what}: {hint} ({first})") from e


def all_finite(tensors: Iterator[torch.Tensor]) -> bool:
    """Whether every tensor is free of NaN and infinity, with one host sync."""
    return bool(torch.stack([torch.isfinite(t).all() for t in tensors]).all())


def pick_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device 'cuda' requested but CUDA is not available; use 'auto' or 'cpu'")
    return torch.device(device)


def seed_everything(seed: int, deterministic: bool = False) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False


def param_groups(model: nn.Module, lr: float, weight_decay: float) -> list[dict]:
    """Caffe lr_mult / decay_mult of DeepLab v2: backbone conv weights 1x with decay, ASPP weights 10x with
    decay, ASPP biases 20x without. Frozen (requires_grad False) parameters are left out; trainable BN
    affine parameters (freeze_bn off) join the 1x group without decay.

    DeepLab v3 / v3+ (``head_groups``): the recipe of their seed (jfzhang95/pytorch-deeplab-xception), backbone
    1x and everything after it 10x, weight decay on every parameter."""
    if not is_v2(model):
        return head_groups(model, lr, weight_decay)
    backbone, bn, head_w, head_b = [], [], [], []
    for mname, m in model.named_modules():
        for pname, p in m.named_parameters(recurse=False):
            if not p.requires_grad:
                continue
            if ".aspp." in f".{mname}.":
                (head_b if pname == "bias" else head_w).append(p)
            elif isinstance(m, nn.Conv2d):
                backbone.append(p)
            else:
                bn.append(p)
    groups = [
        {"name": "backbone", "params": backbone, "lr": lr, "weight_decay": weight_decay},
        {"name": "aspp_weight", "params": head_w, "lr": 10 * lr, "weight_decay": weight_decay},
        {"name": "aspp_bias", "params": head_b, "lr": 20 * lr, "weight_decay": 0.0},
    ]
    if bn:
        groups.append({"name": "bn", "params": bn, "lr": lr, "weight_decay": 0.0})
    for g in groups:
        g["initial_lr"] = g["lr"]
    return [g for g in groups if g["params"]]


def head_groups(model: nn.Module, lr: float, weight_decay: float) -> list[dict]:
    """v3 / v3+ parameter groups: the backbone at ``lr``, ASPP, decoder and classifier at 10x ``lr``."""
    backbone, head = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (backbone if ".backbone." in f".{name}" else head).append(p)
    groups = [{"name": "backbone", "params": backbone, "lr": lr, "weight_decay": weight_decay},
              {"name": "head", "params": head, "lr": 10 * lr, "weight_decay": weight_decay}]
    for g in groups:
        g["initial_lr"] = g["lr"]
    return [g for g in groups if g["params"]]


def poly_factor(iteration: int, iterations: int, power: float, step: int = 10) -> float:
    """lr multiplier used at 1-based ``iteration``: (1 - t/T)^power with t updated every ``step`` iterations,
    as the reference's PolynomialLR stepped after each optimiser step."""
    t = step * ((iteration - 1) // step)
    return (1 - t / iterations) ** power


def lr_factor(iteration: int, tcfg: TrainConfig) -> float:
    """lr multiplier used at 1-based ``iteration`` under ``train.lr_policy``, times the linear warmup; both
    see t = the 0-based iteration rounded down to a multiple of ``train.lr_step``. poly is ``poly_factor``
    (DeepLab v2); step and cosine are the DeepLab v3+ capstone's (lr x step_factor every step_size
    iterations; half a cosine period over the run), whose warmup also rises linearly, from 0."""
    t = tcfg.lr_step * ((iteration - 1) // tcfg.lr_step)
    if tcfg.lr_policy == "poly":
        factor = poly_factor(iteration, tcfg.iterations, tcfg.poly_power, tcfg.lr_step)
    elif tcfg.lr_policy == "step":
        assert tcfg.step_size is not None  # TrainConfig requires it for this policy
        factor = tcfg.step_factor ** (t // tcfg.step_size)
    else:
        factor = 0.5 * (1 + math.cos(math.pi * t / tcfg.iterations))
    if t < tcfg.warmup_iterations:
        start = tcfg.warmup_start_factor
        factor *= start + (1 - start) * t / tcfg.warmup_iterations
    return factor


def resize_labels(labels: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Nearest-neighbour with pixel-centre alignment (PIL's NEAREST), so labels stay aligned with logits."""
    if tuple(labels.shape[-2:]) == tuple(size):
        return labels
    return F.interpolate(labels[:, None].float(), size=tuple(size), mode="nearest-exact")[:, 0].long()


def multi_scale_loss(outputs: Sequence[torch.Tensor], labels: torch.Tensor, ignore: int = IGNORE) -> torch.Tensor:
    """Sum of the cross-entropies of every MSC output against labels shrunk to its size. An output whose shrunk
    labels are all ``ignore`` (a crop of unlabelled pixels) adds 0 and no gradient: cross_entropy's mean over no
    pixel is NaN, which would stop training as a diverged loss, at the same batch on every resume. Chosen on the
    device, without a host sync; every other batch's loss is the plain sum, bit for bit."""
    total = 0
    for o in outputs:
        target = resize_labels(labels, o.shape[-2:])
        loss = F.cross_entropy(o.float(), target, ignore_index=ignore)
        total = total + torch.where((target != ignore).any(), loss, torch.zeros_like(loss))
    return total


@dataclass
class TrainResult:
    iterations: int
    final_loss: float
    resumed_from: int
    model: nn.Module


@dataclass(frozen=True)
class Dist:
    """This process's place in a torchrun job (world 1 without torchrun)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @staticmethod
    def from_env() -> Dist:
        return Dist(int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)),
                    int(os.environ.get("LOCAL_RANK", 0)))


def train_step(model: nn.Module, opt: torch.optim.Optimizer, batches: Iterator, iter_size: int, device: torch.device,
               amp: bool = False, channels_last: bool = False, ignore: int = IGNORE) -> torch.Tensor:
    """One optimiser step over ``iter_size`` accumulated micro-batches; returns the loss on the device (no
    host sync). Under DDP, gradients are all-reduced only on the last micro-batch."""
    opt.zero_grad(set_to_none=True)
    total = torch.zeros((), device=device)
    for k in range(iter_size):
        images, labels, _ = next(batches)
        images = images.to(device, non_blocking=True)
        labels = labels.to(device, non_blocking=True)
        if channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        sync = k == iter_size - 1 or not hasattr(model, "no_sync")
        with contextlib.nullcontext() if sync else model.no_sync():
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
                outputs = model(images)
            loss = multi_scale_loss(outputs, labels, ignore) / iter_size
            loss.backward()
        total += loss.detach()
    opt.step()
    return total


def train(dcfg: DatasetConfig, mcfg: ModelConfig, tcfg: TrainConfig, train_list: Path, init_weights: Path,
          out_weights: Path, checkpoint: Path, log_csv: Path,
          on_log: Callable[[int, float, float], None] | None = None) -> TrainResult:
    """Train from ``init_weights``; resume from ``checkpoint`` when it matches. Under torchrun every process
    trains on its own share of one sample stream (effective batch = batch_size x iter_size x world size) and
    rank 0 writes the checkpoint, log and weights."""
    dist = Dist.from_env()
    seed_everything(tcfg.seed, tcfg.deterministic)
    device = pick_device(tcfg.device)
    cuda = device.type == "cuda"
    if dist.world > 1:
        if cuda:
            device = torch.device("cuda", dist.local_rank)
            torch.cuda.set_device(device)
        torch.distributed.init_process_group("nccl" if cuda else "gloo")
    if cuda:
        torch.backends.cudnn.benchmark = not tcfg.deterministic
    fast = cuda  # bf16 autocast and channels_last only pay off on a GPU

    model = build_model(dcfg.n_classes, mcfg.n_blocks, mcfg.width, mcfg.atrous_rates, mcfg.scales, mcfg.arch,
                        mcfg.output_stride)
    load_weights(model, init_weights)
    if dist.world > 1 and cuda and not tcfg.freeze_bn and mcfg.arch != "deeplabv2":
        # v3 / v3+ train BN on the global batch, as their recipe (v2 keeps its per-process BN, as before).
        # SyncBatchNorm runs on GPUs only: under gloo on CPU each process normalises its own share.
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    model.to(device)
    if fast and tcfg.channels_last:
        model.to(memory_format=torch.channels_last)
    model.train()
    if tcfg.freeze_bn:
        freeze_bn(model)
    opt = torch.optim.SGD(param_groups(model, tcfg.lr, tcfg.weight_decay), lr=tcfg.lr, momentum=tcfg.momentum)

    # A checkpoint is resumed only if it belongs to this exact configuration, initialisation, data and code (less
    # what changes no weight: where data loads, and how often the loss is logged and checkpoints are written, so a
    # crashed run can be resumed with more frequent checkpoints).
    key = fingerprint(dcfg.model_dump(), mcfg.model_dump(), tcfg.model_dump(exclude=RESUME_INDEPENDENT),
                      dist.world, *(file_hash(f) for f in (init_weights, train_list, *CODE)))
    start, rows, resume_rng = 0, [], {}
    if dist.rank == 0:
        for stale in (*remove_stale_temps(checkpoint), *remove_stale_temps(out_weights)):
            log.info("removed %s, left by a training process that was killed while writing it", stale)
    if tcfg.iterations == 0:
        log.info("train.iterations is 0: no training, the init weights %s are saved as %s", init_weights, out_weights)
    elif checkpoint.exists():
        try:
            ckpt = torch.load(checkpoint, map_location=device, weights_only=True)
        except Exception as e:  # checkpoints are written atomically: this is a foreign or damaged file
            raise RunError(f"{refusal_message(checkpoint, e)}; delete it to train from the start") from None
        if ckpt.get("fingerprint") == key and int(ckpt["iteration"]) >= tcfg.iterations:
            # A checkpoint resumes an unfinished run; a finished one must not turn a forced rerun into a no-op.
            log.info("%s holds a finished run (iteration %d): training again from the start", checkpoint,
                     int(ckpt["iteration"]))
        elif ckpt.get("fingerprint") == key:
            model.load_state_dict(ckpt["model"])
            opt.load_state_dict(ckpt["optimizer"])
            start = int(ckpt["iteration"])
            rows = [(int(i), loss, lr) for i, loss, lr in ckpt["log"].tolist()]
            resume_rng = ckpt["rng"]
            log.info("resuming from %s at iteration %d", checkpoint, start)
        else:
            log.info("ignoring %s: it was written for other params, init weights, data or code", checkpoint)

    net = model
    if dist.world > 1:
        net = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if cuda else None)
    if cuda and tcfg.compile:
        net = torch.compile(net)

    aug = Augment(tcfg.crop_size, tcfg.scales, tcfg.flip, tcfg.seed, tcfg.scale_range, tcfg.blur_prob)
    dataset = SegmentationDataset(train_list, dcfg.mean_bgr, aug, n_classes=dcfg.n_classes, ignore=dcfg.ignore_label,
                                  normalization=dcfg.normalization)
    per_iter = tcfg.batch_size * tcfg.iter_size
    sampler = DrawSampler(len(dataset), tcfg.seed, start=start * per_iter, stride=dist.world, offset=dist.rank)
    workers = tcfg.num_workers if tcfg.iterations else 0  # an evaluate-only run loads no data
    loader = DataLoader(dataset, batch_size=tcfg.batch_size, sampler=sampler, num_workers=workers,
                        pin_memory=cuda, persistent_workers=workers > 0, prefetch_factor=4 if workers else None)
    batches = iter(loader)  # draws the loader's base seed from torch's RNG: restore the checkpoint's after it
    if start:
        # Dropout (v3 / v3+) draws from torch's RNG: continue the stream where the checkpointed run left it.
        torch.set_rng_state(resume_rng["cpu"].cpu())
        if cuda and "cuda" in resume_rng:
            torch.cuda.set_rng_state(resume_rng["cuda"].cpu(), device)

    def flush(pending: list[tuple[int, torch.Tensor, float]]) -> None:
        """Move pending device losses into the log with one host sync (averaged over processes)."""
        if not pending:
            return
        losses = torch.stack([loss for _, loss, _ in pending])
        if dist.world > 1:
            torch.distributed.all_reduce(losses)
            losses /= dist.world
        for (it, _, lr), value in zip(pending, losses.tolist(), strict=True):
            if not math.isfinite(value):
                raise RunError(f"train: the loss is {value} at iteration {it}. {kept()}")
            rows.append((it, value, lr))
        pending.clear()

    def kept() -> str:
        if saved is None:
            return "No checkpoint was written before it; lower train.lr or check the init weights and data."
        return (f"The last good checkpoint, {checkpoint} at iteration {saved}, is kept: rerun to resume from it, "
                "and if the loss diverges again lower train.lr (which starts over) or check the data.")

    def save_checkpoint(it: int) -> None:
        nonlocal saved
        if not all_finite(p.detach() for p in model.parameters()):
            raise RunError(f"train: the weights are no longer finite after iteration {it}. {kept()}")
        if dist.rank == 0:
            rng = {"cpu": torch.get_rng_state(), **({"cuda": torch.cuda.get_rng_state(device)} if cuda else {})}
            save_torch({"model": model.state_dict(), "optimizer": opt.state_dict(), "iteration": it,
                        "fingerprint": key, "log": torch.tensor(rows, dtype=torch.float64), "rng": rng}, checkpoint)
        saved = it

    hint = (f"lower train.batch_size ({tcfg.batch_size}) or train.crop_size ({tcfg.crop_size}), and raise "
            f"train.iter_size ({tcfg.iter_size}) to keep the effective batch of batch_size x iter_size x processes "
            f"({per_iter * dist.world})" + ("; train.amp: true also saves memory" if fast and not tcfg.amp else ""))
    saved: int | None = start or None
    pending: list[tuple[int, torch.Tensor, float]] = []
    bar = tqdm(range(start + 1, tcfg.iterations + 1), initial=start, total=tcfg.iterations, desc="train",
               unit="it", disable=dist.rank != 0)
    for it in bar:
        factor = lr_factor(it, tcfg)
        for g in opt.param_groups:
            g["lr"] = g["initial_lr"] * factor
        try:
            with memory_hint(f"at training iteration {it}", hint):
                loss = train_step(net, opt, batches, tcfg.iter_size, device, amp=fast and tcfg.amp,
                                  channels_last=fast and tcfg.channels_last, ignore=dcfg.ignore_label)
        except DataError as e:  # a bad file read by a loader worker: its message, not the worker's traceback
            raise worker_error(e) from None
        pending.append((it, loss, opt.param_groups[0]["lr"]))
        if it % tcfg.log_every == 0 or it % tcfg.checkpoint_every == 0 or it == tcfg.iterations:
            flush(pending)
            _, loss_value, lr = rows[-1]
            bar.set_postfix(loss=f"{loss_value:.4f}", lr=f"{lr:.2e}")
            if on_log is not None and dist.rank == 0 and (it % tcfg.log_every == 0 or it == tcfg.iterations):
                on_log(it, loss_value, lr)
        if it % tcfg.checkpoint_every == 0 or it == tcfg.iterations:
            save_checkpoint(it)
    if dist.rank == 0:
        _write_log(log_csv, rows)
        checkpoint.parent.mkdir(parents=True, exist_ok=True)  # a DVC output, even when no step wrote a checkpoint
        # The model config travels with the weights: hub, predict and init rebuild the model from the file alone.
        save_torch(weights_file(model.state_dict(), n_classes=dcfg.n_classes, n_blocks=mcfg.n_blocks,
                                width=mcfg.width, atrous_rates=mcfg.atrous_rates, scales=mcfg.scales,
                                class_names=class_names(dcfg), dataset=dcfg.name,
                                mean_bgr=dcfg.mean_bgr, colours=class_colours(dcfg), arch=mcfg.arch,
                                output_stride=mcfg.output_stride, normalization=dcfg.normalization), out_weights)
    if dist.world > 1:
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    return TrainResult(tcfg.iterations, rows[-1][1] if rows else float("nan"), start, model)


def _write_log(path: Path, rows: list[tuple[int, float, float]]) -> None:
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(["iteration", "loss", "lr"])
        w.writerows((i, f"{loss:.6f}", f"{lr:.6g}") for i, loss, lr in rows)
