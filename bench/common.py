"""What bench/train.py and bench/infer.py share: the model they time, FLOP counting, the machine's peak and a
profile that says where the time goes."""

from __future__ import annotations

import argparse
from collections import defaultdict
from collections.abc import Callable

import torch
from torch.utils.flop_counter import FlopCounterMode

from deeplab.models import build_model, calibrate_bn, init_from_scratch

# Dense bf16 matrix rate measured on this project's H200 (8192^3 bf16 matmul, 769-798 TFLOP/s); other GPUs: pass
# --peak-tflops, or the share is left out.
PEAK_BF16_TFLOPS = {"H200": 790.0}


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def peak_tflops(device: torch.device, given: float | None) -> float | None:
    if given:
        return given
    name = device_name(device)
    return next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)


def arch_args(args: argparse.Namespace) -> dict:
    """build_model's arch and output stride from ``--arch`` / ``--output-stride`` (benches without them: v2)."""
    arch = getattr(args, "arch", "deeplabv2")
    stride = getattr(args, "output_stride", None) or (8 if arch == "deeplabv2" else 16)
    return {"arch": arch, "output_stride": stride}


def calibrated_state(args: argparse.Namespace, device: torch.device, batches: list[torch.Tensor]) -> dict:
    """Seeded weights with BatchNorm statistics calibrated on ``batches`` (as the init stage does): frozen identity
    BN would let ResNet-101's activations grow through 33 residual blocks and the loss would mean nothing."""
    model = build_model(args.classes, args.blocks, args.width, **arch_args(args))
    init_from_scratch(model, 0)
    model.to(device)
    calibrate_bn(model, (b.to(device) for b in batches))
    return {k: v.cpu() for k, v in model.state_dict().items()}


def count_flops(args: argparse.Namespace, fn: Callable[[torch.nn.Module, torch.device], None]) -> int:
    """FLOPs of ``fn(model, device)`` (convolutions and matrix products, forward and backward alike), counted once
    on the meta device: no memory, no time, the same count as the real run."""
    meta = torch.device("meta")
    with meta:
        model = build_model(args.classes, args.blocks, args.width, **arch_args(args))
    with FlopCounterMode(display=False) as counter:
        fn(model, meta)
    return counter.get_total_flops()


def flops_row(flops_per_image: int, images_per_s: float, peak: float | None) -> dict:
    achieved = flops_per_image * images_per_s / 1e12
    return {"tflops": round(achieved, 2), "peak_share": round(achieved / peak, 4) if peak else None}


# Top-level ops by what they are; the ops named are never children of one another, so their times add up.
CATEGORIES = {
    "conv": ("aten::convolution", "aten::convolution_backward"),
    "batchnorm": ("aten::batch_norm", "aten::native_batch_norm_backward", "aten::cudnn_batch_norm_backward"),
    "msc_resize": ("aten::upsample_bilinear2d", "aten::upsample_bilinear2d_backward",
                   "aten::upsample_nearest_exact2d"),
    "pool": ("aten::max_pool2d_with_indices", "aten::max_pool2d_with_indices_backward"),
    "loss": ("aten::cross_entropy_loss", "aten::nll_loss2d_backward", "aten::_log_softmax_backward_data"),
    "copy_cast": ("aten::copy_",),
    "relu_add": ("aten::relu", "aten::relu_", "aten::threshold_backward", "aten::add", "aten::add_"),
}


def profile(step: Callable[[int], object], n: int, device: torch.device) -> dict:
    """Where ``n`` calls of ``step`` spend their time (torch.profiler): per category of op, as a share of the busy
    time of the device (kernels on CUDA, op time on CPU), plus the busy share of the wall time (what is left is
    launch gaps, host work and data loading) and the costliest kernels (ops on CPU), per step."""
    import time

    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    cuda = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with torch_profile(activities=activities) as prof:
        t0 = time.perf_counter()
        for i in range(n):
            step(i)
        if cuda:
            torch.cuda.synchronize(device)
        wall = time.perf_counter() - t0
    events = prof.key_averages()

    def total(e) -> float:
        return getattr(e, "device_time_total", 0.0) if cuda else e.cpu_time_total

    def self_time(e) -> float:
        return getattr(e, "self_device_time_total", 0.0) if cuda else e.self_cpu_time_total

    # Busy time from the device's own events (kernels, copies) alone: an op's self device time is its kernels'
    # time again. On CPU, the ops' own time. Microseconds.
    own = [e for e in events if e.device_type == (DeviceType.CUDA if cuda else DeviceType.CPU)]
    busy = sum(self_time(e) for e in own)
    shares: dict[str, float] = defaultdict(float)
    for e in events:
        name = e.key
        cat = next((c for c, names in CATEGORIES.items() if name in names), None)
        if cat is None and (name.startswith("aten::_foreach_") or name.startswith("aten::_fused_sgd")):
            cat = "optimizer"
        if cat:
            shares[cat] += total(e)
    top = sorted(own, key=self_time, reverse=True)[:8]  # kernels on CUDA, ops on CPU
    return {
        "steps": n,
        "busy_share_of_wall": round(busy / 1e6 / wall, 3) if busy else None,
        "share_of_busy": {k: round(v / busy, 3) for k, v in sorted(shares.items())} if busy else {},
        "top_self_ms": {e.key[:90]: round(self_time(e) / 1e3 / n, 3) for e in top},
    }
