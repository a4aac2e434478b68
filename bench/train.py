"""Training-step throughput and peak memory of DeepLab v2: the parity path (fp32, NCHW, no compile, as the
reference runs) against the fast path (bf16 autocast, channels_last, cudnn.benchmark, optional
torch.compile), on identical data in one run, plus how closely their short loss curves agree.

    python bench/train.py                      # full size on a GPU: ResNet-101, 321x321, batch 5
    python bench/train.py --quick              # CPU-sized: narrow net, small crops (what CI can run)

Prints one JSON line."""

from __future__ import annotations

import argparse
import json
import resource
import time

import torch

from deeplab.models import build_model, freeze_bn, init_from_scratch
from deeplab.train import param_groups, train_step


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


def run(mode: str, args: argparse.Namespace, device: torch.device, data: list) -> dict:
    fast = mode == "fast"
    torch.backends.cudnn.benchmark = fast
    model = build_model(args.classes, args.blocks, args.width)
    init_from_scratch(model, 0)
    model.to(device).train()
    freeze_bn(model)
    if fast and args.channels_last:
        model.to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(param_groups(model, args.lr, 5e-4), lr=args.lr, momentum=0.9)
    net = torch.compile(model) if fast and args.compile else model
    amp = fast and device.type == "cuda"
    cl = fast and args.channels_last
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)

    def step(i: int) -> torch.Tensor:
        it = iter(data[(i * args.iter_size + k) % len(data)] for k in range(args.iter_size))
        return train_step(net, opt, it, args.iter_size, device, amp=amp, channels_last=cl)

    losses = [step(i) for i in range(args.warmup)]
    if cuda:
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    losses += [step(args.warmup + i) for i in range(args.iters)]
    if cuda:
        torch.cuda.synchronize(device)
    dt = time.perf_counter() - t0
    images = args.iters * args.iter_size * args.batch
    return {
        "images_per_s": round(images / dt, 3),
        "s_per_iter": round(dt / args.iters, 4),
        "peak_mem_mb": round(torch.cuda.max_memory_allocated(device) / 2**20, 1) if cuda else None,
        "losses": [round(float(x), 4) for x in losses],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="CPU-sized run: width 16, blocks 1 1 1 1, 97 px")
    ap.add_argument("--size", type=int, default=321)
    ap.add_argument("--batch", type=int, default=5)
    ap.add_argument("--iter-size", type=int, default=1)
    ap.add_argument("--width", type=int, default=64)
    ap.add_argument("--blocks", type=int, nargs=4, default=[3, 4, 23, 3])
    ap.add_argument("--classes", type=int, default=21)
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--lr", type=float, default=2.5e-4)
    ap.add_argument("--compile", action="store_true", help="add torch.compile to the fast path")
    ap.add_argument("--no-channels-last", dest="channels_last", action="store_false")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()
    if args.quick:
        args.size, args.width, args.blocks, args.iters, args.warmup = 97, 16, [1, 1, 1, 1], 6, 2
    device = torch.device(args.device)
    data = batches(args.iters + args.warmup, args.batch, args.size, args.classes)
    parity = run("parity", args, device, data)
    fast = run("fast", args, device, data)
    a, b = parity.pop("losses"), fast.pop("losses")
    tail = max(3, len(a) // 3)
    mean_a, mean_b = sum(a[-tail:]) / tail, sum(b[-tail:]) / tail
    print(json.dumps({
        "bench": "train", "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__, "size": args.size, "batch": args.batch, "iter_size": args.iter_size,
        "width": args.width, "blocks": args.blocks, "compile": args.compile,
        "parity": parity, "fast": fast,
        "speedup": round(fast["images_per_s"] / parity["images_per_s"], 3),
        "memory_ratio": (round(fast["peak_mem_mb"] / parity["peak_mem_mb"], 3) if parity["peak_mem_mb"] else None),
        "loss_tail_mean": {"parity": round(mean_a, 4), "fast": round(mean_b, 4),
                           "rel_diff": round(abs(mean_a - mean_b) / max(mean_a, 1e-8), 4)},
        "loss_curves": {"parity": a, "fast": b},
        "max_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    }))


if __name__ == "__main__":
    main()
