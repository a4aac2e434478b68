"""Logits-stage throughput of DeepLab v2 (multi-scale 1x/0.75x/0.5x, max-fused, one whole image at a time): the
parity path (fp32, NCHW) against the fast path (bf16 autocast, channels_last, cudnn.benchmark, optional
torch.compile), on the same images and weights in one run, with their argmax agreement, peak memory, the
achieved TFLOP/s (FLOPs counted once with torch.utils.flop_counter), its share of the GPU's dense bf16 peak, and
a torch.profiler breakdown of the fast path.

    python bench/infer.py              # full size on a GPU: ResNet-101, 513x513
    python bench/infer.py --quick      # CPU-sized

Prints one JSON line."""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch
from common import calibrated_state, count_flops, device_name, flops_row, peak_tflops, profile

from deeplab.infer import predict_logits
from deeplab.models import build_model


def run(mode: str, args: argparse.Namespace, device: torch.device, images: list[torch.Tensor],
        state: dict) -> tuple[dict, list]:
    fast = mode == "fast"
    torch.backends.cudnn.benchmark = fast
    model = build_model(args.classes, args.blocks, args.width)
    model.load_state_dict(state)
    model.to(device).eval()
    if fast:
        model.to(memory_format=torch.channels_last)
    net = torch.compile(model, backend=args.compile_backend) if fast and args.compile else model
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
    row = {"images_per_s": round(len(images) / dt, 3),
           "peak_mem_mb": round(torch.cuda.max_memory_allocated(device) / 2**20, 1) if cuda else None,
           "amp_bf16": amp, "channels_last": fast, "compile": fast and args.compile}
    if fast and args.profile:
        row["profile"] = profile(lambda i: one(images[i % len(images)]).cpu(), args.profile, device)
    return row, [o.float().cpu() for o in outs]


def infer_flops(args: argparse.Namespace) -> int:
    def one(model: torch.nn.Module, device: torch.device) -> None:
        with torch.no_grad():  # predict_logits' forward, without its autocast (there is none on meta)
            model.eval()(torch.randn(1, 3, args.size, args.size, device=device))

    return count_flops(args, one)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="CPU-sized run: width 16, blocks 1 1 1 1, 129 px")
    ap.add_argument("--size", type=int, default=513)
    ap.add_argument("--images", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--width", type=int, default=64)
    ap.add_argument("--blocks", type=int, nargs=4, default=[3, 4, 23, 3])
    ap.add_argument("--classes", type=int, default=21)
    ap.add_argument("--compile", action="store_true", help="the fast path under torch.compile")
    ap.add_argument("--compile-backend", default="inductor")
    ap.add_argument("--profile", type=int, default=3, help="profiled images of the fast path (0: none)")
    ap.add_argument("--peak-tflops", type=float, default=None, help="dense bf16 peak (default: known GPUs)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    if "--quick" in sys.argv:  # new defaults; options given explicitly still win
        ap.set_defaults(size=129, width=16, blocks=[1, 1, 1, 1], images=8, warmup=2, compile_backend="eager")
    args = ap.parse_args()
    device = torch.device(args.device)
    g = torch.Generator().manual_seed(0)
    images = [torch.randn(1, 3, args.size, args.size, generator=g) * 60 for _ in range(args.images)]
    # BN calibrated on these images (mean-subtracted pixels are about +-60): a net whose logits mean something.
    state = calibrated_state(args, device, [torch.cat(images[:4])])
    parity, a = run("parity", args, device, images, state)
    fast, b = run("fast", args, device, images, state)
    pa, pb = torch.cat([x.argmax(1).flatten() for x in a]), torch.cat([x.argmax(1).flatten() for x in b])
    # Random weights leave near-ties that bf16 may flip, where trained ones would not: the agreement on the pixels
    # whose fp32 top-2 margin is above the median tells the two apart.
    top2 = torch.cat([x.topk(2, dim=1).values.movedim(1, -1).reshape(-1, 2) for x in a])
    margin = top2[:, 0] - top2[:, 1]
    confident = margin > margin.median()
    peak = peak_tflops(device, args.peak_tflops)
    flops = infer_flops(args)
    for row in (parity, fast):
        row.update(flops_row(flops, row["images_per_s"], peak))
    print(json.dumps({
        "bench": "infer", "device": device_name(device), "torch": torch.__version__, "size": args.size,
        "images": args.images, "width": args.width, "blocks": args.blocks, "classes": args.classes,
        "compile": args.compile, "flops_per_image": flops, "peak_tflops": peak, "parity": parity, "fast": fast,
        "speedup": round(fast["images_per_s"] / parity["images_per_s"], 3),
        "memory_ratio": round(fast["peak_mem_mb"] / parity["peak_mem_mb"], 3) if parity["peak_mem_mb"] else None,
        "argmax_agreement": round(float((pa == pb).float().mean()), 5),
        "argmax_agreement_confident_half": round(float((pa == pb)[confident].float().mean()), 5),
        "fp32_top2_margin_median": round(float(margin.median()), 4),
        "weights": "random (He init, BN calibrated on the images)",
    }))


if __name__ == "__main__":
    main()
