"""Benchmark the caffemodel reader and converter on a full-size DeepLab v2 ResNet-101.

Writes a caffemodel with the real layer names and shapes of deploy.prototxt and seeded random weights
(about 170 MiB) to a temporary directory, in a child process so that building it does not count towards
this process's memory, then reads it, converts it and saves the state dict. Prints one JSON line:

    {"file_mb", "read_s", "convert_s", "total_s", "peak_rss_mb", "rss_increase_mb"}

total_s covers read + convert + saving the .pth. Sizes are MiB; peak_rss_mb is this process's peak resident
set (ru_maxrss); rss_increase_mb is that peak less the resident set after imports, just before reading.
The file is read from a warm page cache (it was just written).

    .venv/bin/python bench/convert.py [--prototxt PATH]
"""

from __future__ import annotations

import argparse
import json
import math
import re
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run as a script from anywhere

from deeplab.caffe import CaffeLayer, convert, read_caffemodel, write_caffemodel  # noqa: E402

PROTOTXT = REPO.parent / "shared" / "fixtures" / "deeplab_v2_prototxt" / "deploy.prototxt"
MIB = 2**20


def prototxt_layers(text: str) -> list[tuple[str, str, list[tuple[int, ...]]]]:
    """(name, type, blob shapes) per layer of a deploy.prototxt; input channels follow bottoms and tops."""
    tokens = [t for t in re.findall(r'#[^\n]*|"[^"]*"|[{}:]|[^\s{}:"#]+', text) if not t.startswith("#")]
    layers, stack, current = [], [], None
    channels = {"data": 3}
    i = 0
    while i < len(tokens):
        tok = tokens[i]
        if tok == "}":
            if stack.pop() == "layer":
                layers.append(current)
            i += 1
            continue
        i += 1
        if tokens[i] == ":":
            i += 1
        if tokens[i] == "{":
            stack.append(tok)
            if tok == "layer":
                current = {"bottom": [], "top": [], "num_output": 0, "kernel_size": 1, "bias_term": "true"}
            i += 1
            continue
        value = tokens[i].strip('"')
        i += 1
        if stack == ["layer"] and tok in ("bottom", "top"):
            current[tok].append(value)
        elif stack == ["layer"] and tok in ("name", "type"):
            current[tok] = value
        elif stack == ["layer", "convolution_param"] and tok in ("num_output", "kernel_size", "bias_term"):
            current[tok] = value
    out = []
    for layer in layers:
        cin = channels[layer["bottom"][0]]
        cout = cin
        if layer["type"] == "Convolution":
            cout, k = int(layer["num_output"]), int(layer["kernel_size"])
            shapes = [(cout, cin, k, k)] + ([(cout,)] if layer["bias_term"] == "true" else [])
        elif layer["type"] == "BatchNorm":
            shapes = [(cin,), (cin,), (1,)]
        elif layer["type"] == "Scale":
            shapes = [(cin,), (cin,)]
        else:
            shapes = []
        channels[layer["top"][0]] = cout
        out.append((layer["name"], layer["type"], shapes))
    return out


def build(prototxt: Path, path: Path, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    layers = []
    for name, type_, shapes in prototxt_layers(prototxt.read_text()):
        if type_ == "Convolution":
            fan_in = math.prod(shapes[0][1:])
            blobs = [rng.standard_normal(shapes[0], dtype=np.float32) * np.float32(math.sqrt(1 / fan_in))]
            blobs += [np.zeros(s, np.float32) for s in shapes[1:]]
        elif type_ == "BatchNorm":
            factor = np.float32(999.982)  # what Caffe's moving average leaves after many iterations
            blobs = [rng.normal(0, 0.1, shapes[0]).astype(np.float32) * factor,
                     rng.uniform(0.5, 2, shapes[1]).astype(np.float32) * factor, np.array([factor], np.float32)]
        elif type_ == "Scale":
            blobs = [np.ones(shapes[0], np.float32), np.zeros(shapes[1], np.float32)]
        else:
            blobs = []
        layers.append(CaffeLayer(name, type_, blobs))
    write_caffemodel(path, layers)


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / MIB


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prototxt", type=Path, default=PROTOTXT)
    parser.add_argument("--build", type=Path, help=argparse.SUPPRESS)  # child process: only write the file
    args = parser.parse_args()
    if args.build:
        build(args.prototxt, args.build)
        return
    if not args.prototxt.is_file():
        sys.exit(f"error: {args.prototxt}: prototxt not found")

    with tempfile.TemporaryDirectory() as tmp:
        src, out = Path(tmp) / "deeplab_v2_resnet101.caffemodel", Path(tmp) / "converted.pth"
        subprocess.run([sys.executable, __file__, "--prototxt", str(args.prototxt), "--build", str(src)], check=True)

        import torch  # noqa: F401  (imports are not what is measured)

        from deeplab.files import save_torch

        before = rss_mb()
        t0 = time.perf_counter()
        layers = read_caffemodel(src)
        t1 = time.perf_counter()
        state, _ = convert(layers, n_classes=21)
        t2 = time.perf_counter()
        del layers
        save_torch(state, out)
        t3 = time.perf_counter()
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
        result = {
            "file_mb": round(src.stat().st_size / MIB, 1),
            "read_s": round(t1 - t0, 3),
            "convert_s": round(t2 - t1, 3),
            "total_s": round(t3 - t0, 3),
            "peak_rss_mb": round(peak, 1),
            "rss_increase_mb": round(peak - before, 1),
        }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
