"""Logits-stage throughput of DeepLab v2 (multi-scale 1x/0.75x/0.5x, max-fused): the parity path (fp32,
NCHW) against the fast path (bf16 autocast, channels_last, cudnn.benchmark, optional torch.compile), on the
same images in one run, with their agreement (argmax) and peak memory.

    python bench/infer.py              # full size on a GPU: ResNet-101, 513x513
    python bench/infer.py --quick      # CPU-sized

Prints one JSON line."""

from __future__ import annotations

import argparse
import json
import time

import torch

from deeplab.infer import predict_logits
from deeplab.models import build_model, init_from_scratch


def run(mode: str, args: argparse.Namespace, device: torch.device, images: list[torch.Tensor]) -> tuple[dict, list]:
    fast = mode == "fast"
    torch.backends.cudnn.benchmark = fast
    model = build_model(args.classes, args.blocks, args.width)
    init_from_scratch(model, 0)
    model.to(device).eval()
    if fast:
        model.to(memory_format=torch.channels_last)
    net = torch.compile(model) if fast and args.compile else model
    cuda = device.type == "cuda"
    amp = fast and cuda
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)

    def one(x: torch.Tensor) -> torch.Tensor:
        x = x.to(device, non_blocking=True)
        if fast:
            x = x.contiguous(memory_format=torch.channels_last)
        return predict_logits(net, x, amp)

    for x in images[: args.warmup]:
        one(x)
    if cuda:
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    outs = [one(x) for x in images]
    if cuda:
        torch.cuda.synchronize(device)
    dt = time.perf_counter() - t0
    return ({"images_per_s": round(len(images) / dt, 3),
             "peak_mem_mb": round(torch.cuda.max_memory_allocated(device) / 2**20, 1) if cuda else None},
            [o.argmax(1).cpu() for o in outs])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--size", type=int, default=513)
    ap.add_argument("--images", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--width", type=int, default=64)
    ap.add_argument("--blocks", type=int, nargs=4, default=[3, 4, 23, 3])
    ap.add_argument("--classes", type=int, default=21)
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()
    if args.quick:
        args.size, args.width, args.blocks, args.images, args.warmup = 129, 16, [1, 1, 1, 1], 8, 2
    device = torch.device(args.device)
    g = torch.Generator().manual_seed(0)
    images = [torch.randn(1, 3, args.size, args.size, generator=g) * 60 for _ in range(args.images)]
    parity, a = run("parity", args, device, images)
    fast, b = run("fast", args, device, images)
    agree = sum(int((x == y).sum()) for x, y in zip(a, b, strict=True)) / sum(x.numel() for x in a)
    print(json.dumps({
        "bench": "infer", "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__, "size": args.size, "width": args.width, "blocks": args.blocks,
        "compile": args.compile, "parity": parity, "fast": fast,
        "speedup": round(fast["images_per_s"] / parity["images_per_s"], 3),
        "argmax_agreement": round(agree, 5),
    }))


if __name__ == "__main__":
    main()
