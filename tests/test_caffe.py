"""Caffe model reading and conversion, checked against the real DeepLab v2 ResNet-101 layer names and shapes.

Test caffemodels are written here: the big ones with ``deeplab.caffe.write_caffemodel``, odd encodings (foreign
fields, groups, non-packed and double data, corrupt files) with the small encoder below, and both are checked
against the protobuf library itself. The reference forward pass runs the Caffe layer graph directly with
Caffe's BatchNorm semantics, independently of ``deeplab.models``.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from typer.testing import CliRunner

from deeplab.caffe import (
    CaffeError,
    CaffeLayer,
    _model_shapes,
    convert,
    convert_caffemodel,
    read_caffemodel,
    write_caffemodel,
)
from deeplab.cli import app
from deeplab.models import build_model, load_weights
from tests.conftest import PROTOTXT, skip_or_fail

EPS = 1e-5

# ---------------------------------------------------------------------------------------------------------
# The network: a text-format prototxt reader and a generator for smaller nets with the same naming scheme


@dataclass
class Spec:
    name: str
    type: str
    bottoms: list[str]
    tops: list[str]
    num_output: int = 0
    kernel: int = 1
    stride: int = 1
    pad: int = 0
    dilation: int = 1
    bias: bool = True
    shapes: list[tuple[int, ...]] = field(default_factory=list)


def parse_text_proto(text: str) -> list[tuple[str, object]]:
    """Protobuf text format as nested (key, value) lists; scalar values stay strings."""
    tokens = [t for t in re.findall(r'#[^\n]*|"[^"]*"|[{}:]|[^\s{}:"#]+', text) if not t.startswith("#")]
    pos = 0

    def block() -> list[tuple[str, object]]:
        nonlocal pos
        items: list[tuple[str, object]] = []
        while pos < len(tokens) and tokens[pos] != "}":
            key = tokens[pos]
            pos += 1
            if tokens[pos] == ":":
                pos += 1
            if tokens[pos] == "{":
                pos += 1
                items.append((key, block()))
                pos += 1  # the closing brace
            else:
                items.append((key, tokens[pos].strip('"')))
                pos += 1
        return items

    return block()


def _get(items: list, key: str, default: object = None) -> object:
    return next((v for k, v in items if k == key), default)


def with_shapes(specs: list[Spec]) -> list[Spec]:
    """Fill in blob shapes by following bottoms and tops from the 3-channel input."""
    channels = {"data": 3}
    for s in specs:
        cin = channels[s.bottoms[0]]
        if s.type == "Convolution":
            s.shapes = [(s.num_output, cin, s.kernel, s.kernel)] + ([(s.num_output,)] if s.bias else [])
            channels[s.tops[0]] = s.num_output
            continue
        if s.type == "BatchNorm":
            s.shapes = [(cin,), (cin,), (1,)]
        elif s.type == "Scale":
            s.shapes = [(cin,), (cin,)]
        channels[s.tops[0]] = cin
    return specs


def spec_from_prototxt(path: Path) -> list[Spec]:
    specs = []
    for key, layer in parse_text_proto(path.read_text()):
        if key != "layer":
            continue
        s = Spec(_get(layer, "name"), _get(layer, "type"), [v for k, v in layer if k == "bottom"],
                 [v for k, v in layer if k == "top"])
        params = _get(layer, "convolution_param") or _get(layer, "pooling_param")
        if params:
            s.num_output = int(_get(params, "num_output", 0))
            s.kernel = int(_get(params, "kernel_size"))
            s.stride = int(_get(params, "stride", 1))
            s.pad = int(_get(params, "pad", 0))
            s.dilation = int(_get(params, "dilation", 1))
            s.bias = _get(params, "bias_term", "true") == "true"
        specs.append(s)
    return with_shapes(specs)


def deeplab_spec(n_blocks: tuple[int, ...], width: int, n_classes: int) -> list[Spec]:
    """DeepLab v2 ResNet written the way deploy.prototxt writes it, for any depth and width."""
    specs: list[Spec] = []

    def conv_bn(conv: str, suffix: str, bottom: str, cout: int, k: int, stride: int = 1, pad: int = 0,
                dilation: int = 1, relu: bool = True) -> str:
        specs.append(Spec(conv, "Convolution", [bottom], [conv], cout, k, stride, pad, dilation, bias=False))
        specs.append(Spec(f"bn{suffix}", "BatchNorm", [conv], [conv]))
        specs.append(Spec(f"scale{suffix}", "Scale", [conv], [conv]))
        if relu:
            specs.append(Spec(f"{conv}_relu", "ReLU", [conv], [conv]))
        return conv

    conv_bn("conv1", "_conv1", "data", width, 7, 2, 3)
    specs.append(Spec("pool1", "Pooling", ["conv1"], ["pool1"], kernel=3, stride=2, pad=1))
    bottom = "pool1"
    for stage, n, cout, stride, dilation in zip((2, 3, 4, 5), n_blocks, (4 * width, 8 * width, 16 * width, 32 * width),
                                                (1, 2, 1, 1), (1, 1, 2, 4), strict=True):
        for i in range(n):
            block = "a" if i == 0 else f"b{i}" if n > 3 else "bc"[i - 1]
            name = f"{stage}{block}"
            first = i == 0
            shortcut = conv_bn(f"res{name}_branch1", f"{name}_branch1", bottom, cout, 1, stride, relu=False) \
                if first else bottom
            h = conv_bn(f"res{name}_branch2a", f"{name}_branch2a", bottom, cout // 4, 1, stride if first else 1)
            h = conv_bn(f"res{name}_branch2b", f"{name}_branch2b", h, cout // 4, 3, 1, dilation, dilation)
            h = conv_bn(f"res{name}_branch2c", f"{name}_branch2c", h, cout, 1, relu=False)
            specs.append(Spec(f"res{name}", "Eltwise", [shortcut, h], [f"res{name}"]))
            specs.append(Spec(f"res{name}_relu", "ReLU", [f"res{name}"], [f"res{name}"]))
            bottom = f"res{name}"
    for i, rate in enumerate((6, 12, 18, 24)):
        specs.append(Spec(f"fc1_voc12_c{i}", "Convolution", [bottom], [f"fc1_voc12_c{i}"], n_classes, 3, 1, rate, rate))
    specs.append(Spec("fc1_voc12", "Eltwise", [f"fc1_voc12_c{i}" for i in range(4)], ["fc1_voc12"]))
    return with_shapes(specs)


@pytest.fixture(scope="module")
def real_spec() -> list[Spec]:
    if not PROTOTXT.is_file():
        skip_or_fail(f"DeepLab v2 deploy.prototxt fixture not found at {PROTOTXT}")
    return spec_from_prototxt(PROTOTXT)


FACTORS = (1.0, 999.982, 0.5, 7.25)  # BatchNorm moving-average factors: Caffe stores mean * f, var * f and f


def random_layers(specs: list[Spec], seed: int, factors: dict[str, float] | None = None) -> list[CaffeLayer]:
    """Caffe layers with seeded weights scaled to keep a deep random net's activations finite."""
    rng = np.random.default_rng(seed)
    factors = factors or {}
    layers = []
    for k, s in enumerate(specs):
        if s.type == "Convolution":
            out, cin, kh, kw = s.shapes[0]
            blobs = [rng.standard_normal(s.shapes[0], dtype=np.float32) * np.float32(math.sqrt(1.0 / (cin * kh * kw)))]
            if s.bias:
                blobs.append(rng.standard_normal(out, dtype=np.float32) * np.float32(0.1))
        elif s.type == "BatchNorm":
            c = s.shapes[0][0]
            f = np.float32(factors.get(s.name, FACTORS[k % len(FACTORS)]))
            mean = rng.normal(0, 0.1, c).astype(np.float32)
            var = rng.uniform(0.5, 2.0, c).astype(np.float32)
            stored = f if f else np.float32(1)  # a factor of 0 is taken as 1: the sums are the statistics
            blobs = [mean * stored, var * stored, np.array([f], np.float32)]
        elif s.type == "Scale":
            c = s.shapes[0][0]
            blobs = [rng.uniform(0.5, 1.0, c).astype(np.float32), rng.normal(0, 0.1, c).astype(np.float32)]
        else:
            blobs = []
        layers.append(CaffeLayer(s.name, s.type, blobs))
    return layers


def caffe_forward(specs: list[Spec], layers: list[CaffeLayer], x: torch.Tensor) -> torch.Tensor:
    """Run the Caffe layer graph as Caffe would: BatchNorm with use_global_stats (mean and variance times
    1/factor, a factor of 0 taken as 1; eps 1e-5), Scale, ceil-mode max pooling, summing Eltwise."""
    blobs = {layer.name: [torch.from_numpy(b.copy()) for b in layer.blobs] for layer in layers}
    acts = {"data": x}
    for s in specs:
        h = acts[s.bottoms[0]]
        b = blobs[s.name]
        if s.type == "Convolution":
            h = F.conv2d(h, b[0], b[1] if len(b) > 1 else None, s.stride, s.pad, s.dilation)
        elif s.type == "BatchNorm":
            f = float(b[2][0])
            scale = 1.0 if f == 0 else 1.0 / f
            mean, var = (b[0] * scale).view(1, -1, 1, 1), (b[1] * scale).view(1, -1, 1, 1)
            h = (h - mean) / torch.sqrt(var + EPS)
        elif s.type == "Scale":
            h = h * b[0].view(1, -1, 1, 1) + b[1].view(1, -1, 1, 1)
        elif s.type == "ReLU":
            h = F.relu(h)
        elif s.type == "Pooling":  # Caffe: ceil((in + 2p - k) / s) + 1 windows, less one if the last starts in the pad
            size = h.shape[-1]
            out = -(-(size + 2 * s.pad - s.kernel) // s.stride) + 1
            if (out - 1) * s.stride >= size + s.pad:
                out -= 1
            extra = (out - 1) * s.stride + s.kernel - size - s.pad
            h = F.max_pool2d(F.pad(h, (s.pad, extra, s.pad, extra), value=-math.inf), s.kernel, s.stride)
        elif s.type == "Eltwise":
            h = sum(acts[n] for n in s.bottoms)
        else:
            raise AssertionError(f"unexpected layer type {s.type}")
        acts[s.tops[0]] = h
    return acts[specs[-1].tops[0]]


def expected_module(name: str) -> str:
    """The module a Caffe layer maps to, written out from the naming scheme."""
    if name in ("conv1", "bn_conv1", "scale_conv1"):
        return "base.layer1.conv1"
    stage, letter, k, branch = re.fullmatch(r"(?:res|bn|scale)(\d)([a-z])(\d*)_branch(\w+)", name).groups()
    block = int(k) + 1 if k else "abc".index(letter) + 1
    part = {"1": "shortcut", "2a": "reduce", "2b": "conv3x3", "2c": "increase"}[branch]
    return f"base.layer{stage}.block{block}.{part}"


def check_tensors(state: dict[str, torch.Tensor], layers: list[CaffeLayer], aspp_copied: bool = True) -> None:
    """Every converted tensor equals its source blob (BatchNorm statistics divided by the factor)."""
    seen = set()
    for layer in layers:
        if not layer.blobs or "res075" in layer.name or "res05" in layer.name:
            continue
        if layer.name.startswith("fc1_"):
            if aspp_copied:
                i = layer.name[-1]
                assert torch.equal(state[f"base.aspp.c{i}.weight"], torch.from_numpy(layer.blobs[0]))
                assert torch.equal(state[f"base.aspp.c{i}.bias"], torch.from_numpy(layer.blobs[1].reshape(-1)))
                seen |= {f"base.aspp.c{i}.weight", f"base.aspp.c{i}.bias"}
            continue
        m = expected_module(layer.name)
        b = [torch.from_numpy(x.reshape(-1)) for x in layer.blobs]
        if layer.type == "Convolution":  # copied as they are
            assert torch.equal(state[f"{m}.conv.weight"].reshape(-1), b[0]), layer.name
            assert f"{m}.conv.weight" not in seen
            seen.add(f"{m}.conv.weight")
            continue
        elif layer.name.startswith("bn"):
            f = float(b[2][0])
            got = {k: state[f"{m}.bn.{k}"] for k in ("running_mean", "running_var", "num_batches_tracked")}
            want = {"running_mean": b[0] / f if f else b[0],
                    "running_var": b[1] / f if f else b[1], "num_batches_tracked": torch.tensor(0)}
            got = {f"{m}.bn.{k}": v for k, v in got.items()}
            want = {f"{m}.bn.{k}": v for k, v in want.items()}
        else:
            got = {f"{m}.bn.weight": state[f"{m}.bn.weight"], f"{m}.bn.bias": state[f"{m}.bn.bias"]}
            want = {f"{m}.bn.weight": b[0], f"{m}.bn.bias": b[1]}
        for key in want:
            assert key not in seen, f"{key} set twice"
            seen.add(key)
            torch.testing.assert_close(got[key], want[key], rtol=1e-6, atol=0, msg=f"{layer.name} -> {key}")
    backbone = {k for k in state if ".aspp." not in k}
    assert backbone <= seen, f"not checked: {sorted(backbone - seen)[:5]}"


def assert_same_output(model_out: torch.Tensor, ref: torch.Tensor) -> None:
    assert model_out.shape == ref.shape
    assert torch.isfinite(ref).all()
    torch.testing.assert_close(model_out, ref, rtol=1e-4, atol=1e-4 * float(ref.abs().max()))


# ---------------------------------------------------------------------------------------------------------
# A tiny protobuf encoder for hand-made files


def varint(v: int) -> bytes:
    v &= (1 << 64) - 1
    out = bytearray()
    while True:
        out.append((v & 0x7F) | (0x80 if v > 0x7F else 0))
        v >>= 7
        if not v:
            return bytes(out)


def tag(num: int, wire: int) -> bytes:
    return varint((num << 3) | wire)


def ld(num: int, payload: bytes) -> bytes:
    return tag(num, 2) + varint(len(payload)) + payload


def f32(values) -> bytes:
    return np.asarray(values, "<f4").tobytes()


def blob_msg(arr: np.ndarray) -> bytes:
    dims = b"".join(varint(d) for d in arr.shape)
    return ld(7, ld(1, dims)) + ld(5, f32(arr.ravel()))


def layer_msg(name: str, type_: str, *blobs: bytes, extra: bytes = b"") -> bytes:
    return ld(100, ld(1, name.encode()) + ld(2, type_.encode()) + extra + b"".join(ld(7, b) for b in blobs))


# ---------------------------------------------------------------------------------------------------------
# Full-size DeepLab v2 ResNet-101 with the real names


def test_prototxt_is_the_deeplab_v2_resnet101(real_spec):
    types = [s.type for s in real_spec]
    assert (types.count("Convolution"), types.count("BatchNorm"), types.count("Scale")) == (108, 104, 104)
    shapes = {s.name: s.shapes for s in real_spec}
    assert shapes["conv1"] == [(64, 3, 7, 7)]
    assert shapes["res4b22_branch2b"] == [(256, 256, 3, 3)]
    assert shapes["bn5c_branch2c"] == [(2048,), (2048,), (1,)]
    assert shapes["fc1_voc12_c3"] == [(21, 2048, 3, 3), (21,)]


def test_generated_small_net_spec_follows_the_prototxt_scheme(real_spec):
    def key(specs: list[Spec]) -> list[tuple]:
        return [(s.name, s.type, s.shapes, s.kernel, s.stride, s.pad, s.dilation) for s in specs
                if s.shapes or s.type == "Pooling"]

    assert key(deeplab_spec((3, 4, 23, 3), 64, 21)) == key(real_spec)


def test_full_resnet101_converts_and_matches_caffe_forward(real_spec, tmp_path):
    layers = random_layers(real_spec, seed=101)
    src = tmp_path / "train_iter_20000.caffemodel"
    write_caffemodel(src, layers)
    assert src.stat().st_size > 160e6

    read = read_caffemodel(src)
    assert [(layer.name, layer.type) for layer in read] == [(s.name, s.type) for s in real_spec]
    for got, want in zip(read, layers, strict=True):
        assert len(got.blobs) == len(want.blobs)
        assert all(g.dtype == np.float32 and np.array_equal(g, w) for g, w in zip(got.blobs, want.blobs, strict=True))

    del read
    out = tmp_path / "converted.pth"
    log = convert_caffemodel(src, out, n_classes=21)
    assert any("ASPP head copied from fc1_voc12_c0" in m for m in log), log
    state = torch.load(out, weights_only=True)
    check_tensors(state, layers)

    model = build_model(21).eval()
    assert list(_model_shapes(21, (3, 4, 23, 3), 64).items()) == layout(model)
    assert load_weights(model, out) == []  # nothing left fresh
    x = torch.randn(1, 3, 33, 33, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert_same_output(model.base(x), caffe_forward(real_spec, layers, x))


# ---------------------------------------------------------------------------------------------------------
# Small nets with the same naming scheme

SMALL = dict(n_blocks=(1, 1, 1, 1), width=8)


def small_layers(n_classes: int = 3, seed: int = 0, n_blocks=(1, 1, 1, 1), width: int = 8,
                 factors: dict[str, float] | None = None) -> tuple[list[Spec], list[CaffeLayer]]:
    specs = deeplab_spec(n_blocks, width, n_classes)
    return specs, random_layers(specs, seed, factors)


@pytest.mark.parametrize("n_blocks", [(1, 1, 1, 1), (2, 4, 1, 3)])
def test_small_net_matches_caffe_forward_with_odd_bn_factors(tmp_path, n_blocks):
    factors = {"bn_conv1": 3.0, "bn2a_branch2b": 0.0, "bn2a_branch1": 0.0, "bn3a_branch2a": 1e-3}
    specs, layers = small_layers(n_blocks=n_blocks, factors=factors)
    zero_stats = next(la for la in layers if la.name == "bn2a_branch1")  # factor 0 with all-zero statistics
    zero_stats.blobs[0][:] = 0
    zero_stats.blobs[1][:] = 0
    # MSC copies of the network in the same file must be ignored.
    copies = [CaffeLayer(f"{layer.name}_res075", layer.type, [b + 1 for b in layer.blobs]) for layer in layers[:6]]
    copies += [CaffeLayer(f"{layer.name}_res05", layer.type, [b * 2 for b in layer.blobs]) for layer in layers[:6]]
    path = tmp_path / "small.caffemodel"
    write_caffemodel(path, layers[:5] + copies + layers[5:])

    state, log = convert(read_caffemodel(path), 3, n_blocks, 8)
    check_tensors(state, layers)
    stored = next(la for la in layers if la.name == "bn2a_branch2b").blobs[0]
    assert torch.equal(state["base.layer2.block1.conv3x3.bn.running_mean"], torch.from_numpy(stored))  # 0 -> 1
    assert any("bn2a_branch2b: moving-average factor 0 taken as 1" in m for m in log)
    assert not any("bn2a_branch1" in m for m in log)  # all-zero statistics need no remark
    assert "skipped 12 MSC copies" in log[0]

    model = build_model(3, n_blocks, 8).eval()
    model.load_state_dict(state)
    x = torch.randn(2, 3, 41, 41, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert_same_output(model.base(x), caffe_forward(specs, layers, x))


def layout(model: torch.nn.Module) -> list[tuple[str, tuple[int, ...]]]:
    return [(k, tuple(v.shape)) for k, v in model.state_dict().items()]


@pytest.mark.parametrize("n_blocks", [(1, 1, 1, 1), (1, 2, 1, 4)])
def test_converter_knows_the_model_layout(n_blocks):
    assert list(_model_shapes(5, n_blocks, 8).items()) == layout(build_model(5, n_blocks, 8))


def test_legacy_v1_layers_with_4d_blob_dims(tmp_path):
    specs, layers = small_layers()
    v1_types = {"BatchNorm": "V1Type40", "Scale": "V1Type41"}  # no V1 enum value exists for these
    legacy_layers = [CaffeLayer(la.name, v1_types.get(la.type, la.type), la.blobs) for la in layers]
    path = tmp_path / "v1.caffemodel"
    write_caffemodel(path, legacy_layers, legacy=True)

    read = read_caffemodel(path)
    by_name = {layer.name: layer for layer in read}
    assert by_name["conv1"].type == "Convolution" and by_name["conv1"].blobs[0].shape == (8, 3, 7, 7)
    assert by_name["bn_conv1"].type == "V1Type40"
    assert [b.shape for b in by_name["bn_conv1"].blobs] == [(1, 1, 1, 8), (1, 1, 1, 8), (1, 1, 1, 1)]
    assert by_name["fc1_voc12_c0"].blobs[1].shape == (1, 1, 1, 3)
    assert by_name["conv1_relu"].type == "ReLU" and by_name["res2a"].type == "Eltwise"

    state, _ = convert(read, 3, **SMALL)
    reference, _ = convert(layers, 3, **SMALL)
    assert state.keys() == reference.keys()
    assert all(torch.equal(state[k], reference[k]) for k in state)


def test_class_count_mismatch_gives_a_fresh_seeded_head(tmp_path):
    _, layers = small_layers(n_classes=21)
    state, log = convert(layers, 5, **SMALL)
    again, _ = convert(layers, 5, **SMALL)
    assert any("ASPP head fc1_voc12_c0 has shape (21, 256, 3, 3)" in m and "initialised fresh" in m for m in log), log
    for i in range(4):
        w, b = state[f"base.aspp.c{i}.weight"], state[f"base.aspp.c{i}.bias"]
        assert w.shape == (5, 256, 3, 3) and b.shape == (5,)
        assert torch.equal(w, again[f"base.aspp.c{i}.weight"])  # seeded
        assert abs(float(w.std()) - 0.01) < 0.001 and abs(float(w.mean())) < 0.001
        assert not b.any()
    assert not torch.equal(state["base.aspp.c0.weight"], state["base.aspp.c1.weight"])
    check_tensors(state, layers, aspp_copied=False)  # the backbone is still copied

    path, out = tmp_path / "m.caffemodel", tmp_path / "m.pth"
    write_caffemodel(path, layers)
    convert_caffemodel(path, out, 5, **SMALL)
    assert load_weights(build_model(5, **SMALL), out) == []  # the file holds a full, fitting state dict


def test_coco_init_classifier_is_skipped_and_logged():
    specs, layers = small_layers()
    layers = [la for la in layers if not la.name.startswith("fc1_voc12")]
    rng = np.random.default_rng(3)
    layers.append(CaffeLayer("fc1_coco", "Convolution", [rng.standard_normal((91, 256, 1, 1), dtype=np.float32),
                                                         np.zeros(91, np.float32)]))
    state, log = convert(layers, 21, **SMALL)
    assert any(m.startswith("skipped fc1_coco (Convolution") for m in log), log
    assert any("ASPP head not in the file: initialised fresh" in m for m in log), log
    assert state["base.aspp.c0.weight"].shape == (21, 256, 3, 3)


def test_incomplete_aspp_head_is_fresh():
    _, layers = small_layers()
    layers = [la for la in layers if la.name != "fc1_voc12_c2"]
    _, log = convert(layers, 3, **SMALL)
    assert any("incomplete" in m and "fresh" in m for m in log), log


def _problem(layers: list[CaffeLayer], *fragments: str) -> str:
    with pytest.raises(CaffeError) as err:
        convert(layers, 3, **SMALL)
    for fragment in fragments:
        assert fragment in str(err.value), str(err.value)
    return str(err.value)


def test_missing_and_wrong_blobs_are_named():
    _, layers = small_layers()
    by_name = {la.name: la for la in layers}

    bn = by_name["bn2a_branch2a"]
    short = [CaffeLayer(bn.name, bn.type, bn.blobs[:2]) if la is bn else la for la in layers]
    _problem(short, "bn2a_branch2a: 2 blobs", "moving-average factor", "base.layer2.block1.reduce.bn")

    _problem([la for la in layers if la.name != "scale2a_branch2a"],
             "base.layer2.block1.reduce.bn.weight: missing (expected from Caffe layer scale2a_branch2a)")
    _problem([la for la in layers if la.name != "res5a_branch1"],
             "base.layer5.block1.shortcut.conv.weight: missing (expected from Caffe layer res5a_branch1)")
    _problem(layers + [by_name["res3a_branch2b"]], "base.layer3.block1.conv3x3.conv.weight: set twice")
    _problem(layers + [CaffeLayer("mystery", "InnerProduct", [np.zeros((2, 2), np.float32)])], "mystery")
    _problem(layers + [CaffeLayer("res4b1_branch2a", "Convolution", [np.zeros((32, 128, 1, 1), np.float32)])],
             "no base.layer4.block2.reduce.conv.weight in the model")
    bad = [CaffeLayer("conv1", "Convolution", [np.zeros((8, 3, 5, 5), np.float32)]) if la.name == "conv1" else la
           for la in layers]
    _problem(bad, "conv1: blob of shape (8, 3, 5, 5), base.layer1.conv1.conv.weight needs (8, 3, 7, 7)")
    wrong_type = [CaffeLayer(la.name, "Convolution", la.blobs) if la.name == "bn_conv1" else la for la in layers]
    _problem(wrong_type, "bn_conv1: type Convolution")


def test_convert_caffemodel_errors_name_the_file(tmp_path):
    _, layers = small_layers()
    path = tmp_path / "broken.caffemodel"
    write_caffemodel(path, [la for la in layers if la.name != "conv1"])
    with pytest.raises(CaffeError, match=r"broken\.caffemodel: .*conv1\.conv\.weight: missing"):
        convert_caffemodel(path, tmp_path / "out.pth", 3, **SMALL)
    assert not (tmp_path / "out.pth").exists()


# ---------------------------------------------------------------------------------------------------------
# The reader: encodings, foreign fields, broken files


def test_double_data_unpacked_values_and_legacy_dims(tmp_path):
    a = np.arange(6, dtype=np.float64).reshape(2, 3) / 7
    dims = ld(7, tag(1, 0) + varint(2) + tag(1, 0) + varint(3))  # non-packed BlobShape.dim
    blobs = [
        ld(7, ld(1, varint(2) + varint(3))) + ld(8, a.ravel().astype("<f8").tobytes()),  # packed double_data
        dims + b"".join(tag(8, 1) + np.float64(v).astype("<f8").tobytes() for v in a.ravel()),  # non-packed doubles
        dims + b"".join(tag(5, 5) + f32([v]) for v in a.ravel()),  # non-packed floats
        # legacy num/channels/height/width; data split over two packed fields (protobuf concatenates them)
        tag(1, 0) + varint(1) + tag(2, 0) + varint(1) + tag(3, 0) + varint(2) + tag(4, 0) + varint(3)
        + ld(5, f32(a.ravel()[:4])) + ld(5, f32(a.ravel()[4:])),
        ld(7, b""),  # a scalar: empty shape, needs one value
    ]
    blobs[-1] += ld(5, f32([2.5]))
    path = tmp_path / "enc.caffemodel"
    path.write_bytes(layer_msg("enc", "Convolution", *blobs))
    (layer,) = read_caffemodel(path)
    got = layer.blobs
    assert [b.shape for b in got] == [(2, 3), (2, 3), (2, 3), (1, 1, 2, 3), ()]
    assert all(b.dtype == np.float32 for b in got)
    for b in got[:4]:
        assert np.array_equal(b.reshape(2, 3), a.astype(np.float32))
    assert float(got[4]) == 2.5


def test_foreign_and_unknown_fields_are_skipped(tmp_path):
    w = np.arange(24, dtype=np.float32).reshape(2, 3, 2, 2)
    group = tag(151, 3) + tag(1, 0) + varint(7) + tag(2, 3) + ld(1, b"nested") + tag(2, 4) + tag(151, 4)
    foreign = (
        ld(143, tag(1, 5) + f32([2.0]) + tag(2, 0) + varint(300))  # InterpParameter in DeepLab, other in BVLC
        + ld(144, b"\xff\x00arbitrary bytes\x80")
        + tag(145, 0) + varint(2**63 + 5)
        + tag(146, 1) + b"\x01" * 8
        + tag(147, 5) + b"\x02" * 4
        + ld(148, ld(1, b"x" * 300))
        + tag(149, 2) + varint(0)
        + ld(150, tag(1, 0) + varint(1))
        + group
        + ld(3, b"bottom") + ld(4, b"top") + ld(6, ld(1, b"conv1_w") + tag(3, 5) + f32([1.0]))  # bottom, top, param
    )
    blob = (
        ld(6, f32([9, 9]))  # diff
        + tag(20, 1) + b"\x00" * 8
        + ld(7, ld(1, b"".join(varint(d) for d in w.shape)) + tag(9, 0) + varint(1))  # unknown field in BlobShape
        + ld(5, f32(w.ravel()))
    )
    data = (
        ld(1, b"DeepLab-ResNet101") + ld(3, b"data") + tag(4, 0) + varint(321)  # name, input, input_dim
        + tag(7, 0) + varint(1) + ld(999, b"\x00" * 10) + tag(500, 3) + tag(1, 1) + b"\x00" * 8 + tag(500, 4)
        + layer_msg("conv1", "Convolution", blob, extra=foreign)
        + ld(6, tag(1, 0) + varint(1))  # NetState
    )
    path = tmp_path / "foreign.caffemodel"
    path.write_bytes(data)
    (layer,) = read_caffemodel(path)
    assert (layer.name, layer.type) == ("conv1", "Convolution")
    assert len(layer.blobs) == 1 and np.array_equal(layer.blobs[0], w)


def test_protobuf_library_agrees_with_reader_and_writer(tmp_path):
    """The reader and writer against Google's protobuf implementation of the same schema subset, with
    packed and non-packed repeated fields, V1 layers and foreign fields."""
    from google.protobuf import descriptor_pb2, descriptor_pool, message_factory  # installed with mlflow

    FD = descriptor_pb2.FieldDescriptorProto
    opt, rep = FD.LABEL_OPTIONAL, FD.LABEL_REPEATED

    def schema(packed: bool):
        fdp = descriptor_pb2.FileDescriptorProto(name="caffe_subset.proto", package="cs", syntax="proto2")

        def message(name: str, fields: list[tuple]) -> None:
            m = fdp.message_type.add(name=name)
            for fname, num, ftype, label, *type_name in fields:
                f = m.field.add(name=fname, number=num, type=ftype, label=label)
                if type_name:
                    f.type_name = f".cs.{type_name[0]}"
                if label == rep and ftype in (FD.TYPE_FLOAT, FD.TYPE_DOUBLE, FD.TYPE_INT64):
                    f.options.packed = packed

        message("BlobShape", [("dim", 1, FD.TYPE_INT64, rep)])
        message("BlobProto", [("shape", 7, FD.TYPE_MESSAGE, opt, "BlobShape"), ("data", 5, FD.TYPE_FLOAT, rep),
                              ("diff", 6, FD.TYPE_FLOAT, rep), ("double_data", 8, FD.TYPE_DOUBLE, rep),
                              ("num", 1, FD.TYPE_INT64, opt), ("channels", 2, FD.TYPE_INT64, opt),
                              ("height", 3, FD.TYPE_INT64, opt), ("width", 4, FD.TYPE_INT64, opt)])
        message("Foreign", [("a", 1, FD.TYPE_STRING, opt), ("b", 2, FD.TYPE_FLOAT, rep)])
        message("LayerParameter", [("name", 1, FD.TYPE_STRING, opt), ("type", 2, FD.TYPE_STRING, opt),
                                   ("bottom", 3, FD.TYPE_STRING, rep), ("blobs", 7, FD.TYPE_MESSAGE, rep, "BlobProto"),
                                   ("f143", 143, FD.TYPE_MESSAGE, opt, "Foreign"), ("f144", 144, FD.TYPE_DOUBLE, opt),
                                   ("f145", 145, FD.TYPE_SINT64, opt), ("f146", 146, FD.TYPE_FIXED32, opt)])
        message("V1LayerParameter", [("bottom", 2, FD.TYPE_STRING, rep), ("name", 4, FD.TYPE_STRING, opt),
                                     ("type", 5, FD.TYPE_INT32, opt), ("blobs", 6, FD.TYPE_MESSAGE, rep, "BlobProto"),
                                     ("blobs_lr", 7, FD.TYPE_FLOAT, rep)])
        message("NetParameter", [("name", 1, FD.TYPE_STRING, opt), ("input_dim", 4, FD.TYPE_INT64, rep),
                                 ("layers", 2, FD.TYPE_MESSAGE, rep, "V1LayerParameter"),
                                 ("layer", 100, FD.TYPE_MESSAGE, rep, "LayerParameter")])
        pool = descriptor_pool.DescriptorPool()
        pool.Add(fdp)
        return message_factory.GetMessageClass(pool.FindMessageTypeByName("cs.NetParameter"))

    _, layers = small_layers()
    for packed in (True, False):
        Net = schema(packed)
        net = Net(name="small", input_dim=[1, 3, 41, 41])
        for i, la in enumerate(layers):
            lp = net.layer.add(name=la.name, type=la.type, bottom=["x"], f144=1.5, f145=-3, f146=7)
            lp.f143.a = "foreign"
            lp.f143.b.extend([1.0, 2.0])
            for b in la.blobs:
                bp = lp.blobs.add(diff=[0.5] * 3)
                bp.shape.dim.extend(b.shape)
                (bp.double_data if i % 7 == 3 else bp.data).extend(b.ravel().tolist())
        v1 = net.layers.add(name="old_conv", type=4, bottom=["data"], blobs_lr=[1.0, 2.0])
        bp = v1.blobs.add(num=2, channels=1, height=1, width=3)
        bp.data.extend([1, 2, 3, 4, 5, 6])
        path = tmp_path / f"lib_{packed}.caffemodel"
        path.write_bytes(net.SerializeToString())

        read = read_caffemodel(path)  # protobuf writes fields in number order: V1 ``layers`` (2) come first
        names = [(la.name, la.type) for la in layers]
        assert [(la.name, la.type) for la in read] == [("old_conv", "Convolution"), *names]
        assert read[0].blobs[0].shape == (2, 1, 1, 3)
        for got, want in zip(read[1:], layers, strict=True):
            assert all(np.array_equal(g, w) for g, w in zip(got.blobs, want.blobs, strict=True)), got.name

    # The other way: what write_caffemodel writes, the library parses to the same numbers.
    path = tmp_path / "ours.caffemodel"
    write_caffemodel(path, layers)
    net = schema(True).FromString(path.read_bytes())
    assert [(lp.name, lp.type) for lp in net.layer] == [(la.name, la.type) for la in layers]
    for lp, la in zip(net.layer, layers, strict=True):
        for bp, b in zip(lp.blobs, la.blobs, strict=True):
            assert tuple(bp.shape.dim) == b.shape
            assert np.array_equal(np.asarray(bp.data, np.float32), b.ravel())
    write_caffemodel(path, [CaffeLayer("c", "Convolution", [np.ones((1, 2, 3), np.float32)])], legacy=True)
    v1 = schema(True).FromString(path.read_bytes()).layers[0]
    assert (v1.name, v1.type, v1.blobs[0].num, v1.blobs[0].channels, v1.blobs[0].height, v1.blobs[0].width) == \
        ("c", 4, 1, 1, 2, 3)


def test_truncated_file_is_a_clear_error(tmp_path):
    _, layers = small_layers()
    full = tmp_path / "full.caffemodel"
    write_caffemodel(full, layers)
    data = full.read_bytes()
    for cut in (1, 2, 10, len(data) // 3, len(data) // 2, len(data) - 1):
        path = tmp_path / f"cut{cut}.caffemodel"
        path.write_bytes(data[:cut])
        with pytest.raises(CaffeError, match=rf"cut{cut}\.caffemodel: .*truncated"):
            read_caffemodel(path)


@pytest.mark.parametrize("content, fragment", [
    (b"\xff\xd8\xff\xe0\x00\x10JFIF\x00\x01\x01\x00\x00\x01\x00\x01\x00\x00" + bytes(range(256)), "not protobuf"),
    (b"", "empty file"),
    (b"\x0a\x05hello", "no layers found"),  # a valid NetParameter holding only a name
    (b"\x0f\x00", "invalid wire type 7"),
    (b"\x00\x00", "field number 0"),
    (b"\x0c", "end-group tag without a start-group"),
    (b"\x0b\x14", "end-group tag of field 2 inside a group of field 1"),
    (b"\xa2\x06\x02\x0b\x14", "layer #0: not protobuf: end-group tag of field 2"),
])
def test_not_a_caffemodel(tmp_path, content, fragment):
    path = tmp_path / "weird.caffemodel"
    path.write_bytes(content)
    with pytest.raises(CaffeError, match=r"weird\.caffemodel: ") as err:
        read_caffemodel(path)
    assert fragment in str(err.value)


def test_corrupt_bytes_raise_caffe_error_and_nothing_else(tmp_path):
    ones = [np.ones(2, np.float32), np.ones(2, np.float32), np.ones(1, np.float32)]
    layers = [CaffeLayer("conv1", "Convolution", [np.ones((2, 3, 1, 1), np.float32)]), CaffeLayer("relu", "ReLU"),
              CaffeLayer("bn_conv1", "V1Type40", ones)]
    originals = []
    for legacy in (False, True):
        write_caffemodel(tmp_path / "m.caffemodel", layers, legacy=legacy)
        originals.append((tmp_path / "m.caffemodel").read_bytes())
    rng = np.random.default_rng(7)
    path = tmp_path / "fuzz.caffemodel"
    for i in range(400):
        data = bytearray(originals[i % 2])
        for _ in range(rng.integers(1, 4)):
            data[rng.integers(len(data))] = rng.integers(256)
        if i % 3 == 0:
            data = data[: rng.integers(1, len(data))]
        path.write_bytes(data)
        try:
            read_caffemodel(path)
        except CaffeError as e:
            assert str(e).startswith(f"{path}: ")


def test_text_prototxt_is_not_a_caffemodel(real_spec):
    with pytest.raises(CaffeError, match="looks like text"):
        read_caffemodel(PROTOTXT)


def test_blob_count_mismatch_names_layer_and_blob(tmp_path):
    bad = ld(7, ld(1, varint(2) + varint(3))) + ld(5, f32(range(5)))
    path = tmp_path / "count.caffemodel"
    path.write_bytes(layer_msg("ok", "ReLU") + layer_msg("res2a_branch1", "Convolution", blob_msg(np.ones(2)), bad))
    with pytest.raises(CaffeError) as err:
        read_caffemodel(path)
    msg = str(err.value)
    assert "count.caffemodel" in msg and "'res2a_branch1' blob 1" in msg and "(2, 3) needs 6 values, it holds 5" in msg

    path.write_bytes(layer_msg("odd", "Convolution", ld(7, ld(1, varint(3))) + ld(5, b"\x00" * 6)))
    with pytest.raises(CaffeError, match="not a whole number of values"):
        read_caffemodel(path)


# ---------------------------------------------------------------------------------------------------------
# The command line


def test_cli_caffe_inspect(tmp_path):
    _, layers = small_layers()
    path = tmp_path / "small.caffemodel"
    write_caffemodel(path, layers)
    runner = CliRunner()

    result = runner.invoke(app, ["caffe-inspect", str(path)])
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert len(lines) == len(layers) + 1
    assert lines[0].split() == ["conv1", "Convolution", "8x3x7x7"]
    assert lines[1].split() == ["bn_conv1", "BatchNorm", "8", "8", "1"]
    assert lines[3].split() == ["conv1_relu", "ReLU", "-"]
    assert lines[-1].startswith(f"{len(layers)} layers, ")

    result = runner.invoke(app, ["caffe-inspect", str(path), "--json"])
    assert result.exit_code == 0, result.output
    listed = json.loads(result.stdout)
    assert listed[0] == {"name": "conv1", "type": "Convolution", "blobs": [[8, 3, 7, 7]]}
    assert [d["name"] for d in listed] == [la.name for la in layers]
    assert listed[-2]["blobs"] == [[3, 256, 3, 3], [3]]


@pytest.mark.parametrize("make", ["missing", "not_protobuf", "directory"])
def test_cli_caffe_inspect_errors(tmp_path, make):
    path = tmp_path / "model.caffemodel"
    if make == "not_protobuf":
        path.write_bytes(b"\xff\xd8\xff\xe0 not a model")
    elif make == "directory":
        path.mkdir()
    result = CliRunner().invoke(app, ["caffe-inspect", str(path)])
    assert result.exit_code == 1
    assert result.stdout == ""
    assert result.stderr.startswith("error: ") and str(path) in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_cli_is_a_command_group():
    result = CliRunner().invoke(app, ["--help"])
    assert result.exit_code == 0 and "caffe-inspect" in result.stdout
