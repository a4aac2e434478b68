"""Training-step throughput and peak memory of DeepLab v2: the parity path (fp32, NCHW, eager, as the reference
runs) against the fast path (bf16 autocast, channels_last, cudnn.benchmark, fused SGD on CUDA) and, as its own
row, the fast path under torch.compile, on identical data and weights in one run, with how closely their loss
curves agree, the achieved TFLOP/s (FLOPs counted once with torch.utils.flop_counter) and its share of the
GPU's dense bf16 peak, and a torch.profiler breakdown of the fastest path.

    python bench/train.py                      # full size on a GPU: ResNet-101, 321x321, batch 5 x iter_size 2
    python bench/train.py --modes fast compile # the torch.compile row (beside a fresh fast row)
    python bench/train.py --quick              # CPU-sized: narrow net, small crops (what CI can run)
    python bench/train.py --arch deeplabv3plus # v3+ at output stride 16 (--output-stride 8), trainable BN

Prints one JSON line."""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time

import torch
from common import arch_args, calibrated_state, count_flops, device_name, flops_row, peak_tflops, profile

from deeplab.models import build_model, freeze_bn
from deeplab.train import multi_scale_loss, param_groups, train_step

MODES = ("parity", "fast", "compile")


def batches(n: int, batch: int, size: int, classes: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    data = []
    for _ in range(n):
        images = torch.randn(batch, 3, size, size, generator=g)
        # blocky labels so the loss is learnable and comparable between modes
        coarse = torch.randint(0, classes, (batch, 1, size // 16 + 1, size // 16 + 1), generator=g).float()
        labels = torch.nn.functional.interpolate(coarse, size=(size, size), mode="nearest")[:, 0].long()
        data.append((images, labels, None))
    return data


def run(mode: str, args: argparse.Namespace, device: torch.device, data: list, state: dict) -> dict:
    fast = mode != "parity"
    cuda = device.type == "cuda"
    torch.backends.cudnn.benchmark = fast
    model = build_model(args.classes, args.blocks, args.width, **arch_args(args))
    model.load_state_dict(state)
    model.to(device).train()
    if args.arch == "deeplabv2":  # v3 / v3+ train their BatchNorm (their recipe)
        freeze_bn(model)
    cl = fast and args.channels_last
    if cl:
        model.to(memory_format=torch.channels_last)
    # fused SGD: one kernel for all ~300 tensors instead of foreach's several per group; CUDA only here.
    fused = fast and cuda and args.fused
    opt = torch.optim.SGD(param_groups(model, args.lr, 5e-4), lr=args.lr, momentum=0.9,
                          **({"fused": True} if fused else {}))
    net = torch.compile(model, backend=args.compile_backend) if mode == "compile" else model
    amp = fast and cuda
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)

    def step(i: int) -> torch.Tensor:
        it = iter(data[(i * args.iter_size + k) % len(data)] for k in range(args.iter_size))
        return train_step(net, opt, it, args.iter_size, device, amp=amp, channels_last=cl)

    t0 = time.perf_counter()
    losses = [step(i) for i in range(args.warmup)]
    if cuda:
        torch.cuda.synchronize(device)
    warmup_s = time.perf_counter() - t0  # holds cudnn.benchmark's search and torch.compile's compilation
    t0 = time.perf_counter()
    losses += [step(args.warmup + i) for i in range(args.iters)]
    if cuda:
        torch.cuda.synchronize(device)
    dt = time.perf_counter() - t0
    images = args.iters * args.iter_size * args.batch
    row = {
        "images_per_s": round(images / dt, 3),
        "s_per_iter": round(dt / args.iters, 4),
        "warmup_s": round(warmup_s, 2),
        "peak_mem_mb": round(torch.cuda.max_memory_allocated(device) / 2**20, 1) if cuda else None,
        "amp_bf16": amp, "channels_last": cl, "cudnn_benchmark": fast, "optimizer": "fused" if fused else "default",
        "losses": [round(float(x), 4) for x in losses],
    }
    if args.profile and mode == args.modes[-1]:
        row["profile"] = profile(lambda i: step(i).item(), args.profile, device)
    return row


def train_flops(args: argparse.Namespace) -> int:
    """FLOPs of one training image: forward and backward of every MSC scale."""
    n = 1 if args.arch == "deeplabv2" else 2  # trained BN (v3 / v3+) needs two images for the pooled branch

    def one(model: torch.nn.Module, device: torch.device) -> None:
        model.train()
        images = torch.randn(n, 3, args.size, args.size, device=device)
        labels = torch.zeros(n, args.size, args.size, dtype=torch.long, device=device)
        multi_scale_loss(model(images), labels).backward()

    return count_flops(args, one) // n


def ratio(rows: dict, a: str, b: str, key: str) -> float | None:
    if a not in rows or b not in rows or not rows[a][key] or not rows[b][key]:
        return None
    return round(rows[a][key] / rows[b][key], 3)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="CPU-sized run: width 16, blocks 1 1 1 1, 97 px")
    ap.add_argument("--modes", nargs="+", choices=MODES, default=["parity", "fast"],
                    help="paths to run, in order (compile: the fast path under torch.compile)")
    ap.add_argument("--size", type=int, default=321)
    ap.add_argument("--batch", type=int, default=5)
    ap.add_argument("--iter-size", type=int, default=2)
    ap.add_argument("--width", type=int, default=64)
    ap.add_argument("--blocks", type=int, nargs=4, default=[3, 4, 23, 3])
    ap.add_argument("--classes", type=int, default=21)
    ap.add_argument("--arch", choices=("deeplabv2", "deeplabv3", "deeplabv3plus"), default="deeplabv2")
    ap.add_argument("--output-stride", type=int, choices=(8, 16), default=None,
                    help="deeplabv3 / v3+ only (default 16); deeplabv2 is 8")
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--lr", type=float, default=2.5e-4)
    ap.add_argument("--compile", action="store_true", help="same as adding 'compile' to --modes")
    ap.add_argument("--compile-backend", default="inductor", help="torch.compile backend ('eager' in --quick)")
    ap.add_argument("--no-channels-last", dest="channels_last", action="store_false")
    ap.add_argument("--no-fused", dest="fused", action="store_false", help="the fast path keeps the default SGD")
    ap.add_argument("--profile", type=int, default=3, help="profiled steps of the last mode (0: none)")
    ap.add_argument("--peak-tflops", type=float, default=None, help="dense bf16 peak (default: known GPUs)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    if "--quick" in sys.argv:  # new defaults; options given explicitly still win
        ap.set_defaults(size=97, width=16, blocks=[1, 1, 1, 1], iters=6, warmup=2, iter_size=1,
                        compile_backend="eager")
    args = ap.parse_args()
    if args.compile and "compile" not in args.modes:
        args.modes.append("compile")
    device = torch.device(args.device)
    data = batches(args.iters + args.warmup, args.batch, args.size, args.classes)
    state = calibrated_state(args, device, [images for images, _, _ in data[:2]])
    rows = {mode: run(mode, args, device, data, state) for mode in args.modes}
    peak = peak_tflops(device, args.peak_tflops)
    flops = train_flops(args)
    for row in rows.values():
        row.update(flops_row(flops, row["images_per_s"], peak))
    curves = {mode: row.pop("losses") for mode, row in rows.items()}
    ref_mode = args.modes[0]
    ref = curves[ref_mode]
    tail = max(3, len(ref) // 3)
    mean_ref = sum(ref[-tail:]) / tail
    loss = {"reference": ref_mode}
    for mode, curve in curves.items():
        if mode == ref_mode:
            continue
        mean = sum(curve[-tail:]) / tail
        steps = (abs(a - b) / max(abs(a), 1e-8) for a, b in zip(ref, curve, strict=True))
        loss[mode] = {"tail_mean": round(mean, 4),
                      "tail_rel_diff": round(abs(mean - mean_ref) / max(mean_ref, 1e-8), 4),
                      "max_step_rel_diff": round(max(steps), 4)}
    loss["reference_tail_mean"] = round(mean_ref, 4)
    # the reference's own step-to-step spread over the tail: what "within noise" is measured against
    spread = (sum((x - mean_ref) ** 2 for x in ref[-tail:]) / tail) ** 0.5
    loss["reference_tail_rel_std"] = round(spread / max(mean_ref, 1e-8), 4)
    out = {
        "bench": "train", "device": device_name(device), "torch": torch.__version__,
        "size": args.size, "batch": args.batch, "iter_size": args.iter_size, "width": args.width,
        "blocks": args.blocks, "classes": args.classes, **arch_args(args), "iters": args.iters, "warmup": args.warmup,
        "modes": args.modes, "compile_backend": args.compile_backend if "compile" in rows else None,
        "tf32_conv": torch.backends.cudnn.allow_tf32, "flops_per_image": flops, "peak_tflops": peak,
        **rows,
        # the goals: fast (and compiled) over parity images/s at no more peak memory
        "speedup": ratio(rows, "fast", "parity", "images_per_s"),
        "memory_ratio": ratio(rows, "fast", "parity", "peak_mem_mb"),
        "compile_speedup": ratio(rows, "compile", "parity", "images_per_s"),
        "compile_vs_fast": ratio(rows, "compile", "fast", "images_per_s"),
        "loss": loss,
        "loss_curves": curves,
        "max_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    }
    print(json.dumps(out))


if __name__ == "__main__":
    main()
