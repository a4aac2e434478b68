"""Read DeepLab v2 ``.caffemodel`` files without Caffe or protoc, and convert them into this project's model.

A caffemodel is a binary protobuf ``NetParameter`` (Caffe schema, proto2). Only the fields that carry the
weights are decoded, by hand: layer name, type and blobs (shape and float data). Every other field is skipped
by its wire type, which matters because real files carry fields whose numbers mean different things in the
BVLC and DeepLab schemas (LayerParameter 143-151).

Reading needs only numpy; torch is imported by the conversion functions.
"""

from __future__ import annotations

import contextlib
import math
import mmap
import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import torch

__all__ = ["CaffeError", "CaffeLayer", "convert", "convert_caffemodel", "read_caffemodel", "write_caffemodel"]

ASPP_SEED = 0
ASPP_RATES = (6, 12, 18, 24)  # DeepLab v2's four branches fc1_*_c0..c3

# NetParameter / LayerParameter / V1LayerParameter / BlobProto / BlobShape field numbers (caffe.proto).
_NET_LAYER, _NET_LAYERS_V1 = 100, 2
_LAYER_NAME, _LAYER_TYPE, _LAYER_BLOBS = 1, 2, 7
_V1_NAME, _V1_TYPE, _V1_BLOBS = 4, 5, 6
_BLOB_NUM, _BLOB_CHANNELS, _BLOB_HEIGHT, _BLOB_WIDTH = 1, 2, 3, 4
_BLOB_DATA, _BLOB_SHAPE, _BLOB_DOUBLE_DATA = 5, 7, 8
_SHAPE_DIM = 1

_VARINT, _I64, _LEN, _SGROUP, _EGROUP, _I32 = 0, 1, 2, 3, 4, 5

# V1LayerParameter.LayerType -> the type string Caffe's UpgradeV1LayerType gives it (BVLC caffe.proto).
_V1_TYPES = {
    0: "", 1: "Accuracy", 2: "BNLL", 3: "Concat", 4: "Convolution", 5: "Data", 6: "Dropout", 7: "EuclideanLoss",
    8: "Flatten", 9: "HDF5Data", 10: "HDF5Output", 11: "Im2col", 12: "ImageData", 13: "InfogainLoss",
    14: "InnerProduct", 15: "LRN", 16: "MultinomialLogisticLoss", 17: "Pooling", 18: "ReLU", 19: "Sigmoid",
    20: "Softmax", 21: "SoftmaxWithLoss", 22: "Split", 23: "TanH", 24: "WindowData", 25: "Eltwise", 26: "Power",
    27: "SigmoidCrossEntropyLoss", 28: "HingeLoss", 29: "MemoryData", 30: "ArgMax", 31: "Threshold",
    32: "DummyData", 33: "Slice", 34: "MVN", 35: "AbsVal", 36: "Silence", 37: "ContrastiveLoss", 38: "Exp",
    39: "Deconvolution",
}
_V1_NUMBERS = {name: num for num, name in _V1_TYPES.items()}


class CaffeError(ValueError):
    """A caffemodel that cannot be read, or that does not fit the model."""


@dataclass
class CaffeLayer:
    name: str
    type: str
    blobs: list[np.ndarray] = field(default_factory=list)

    def __repr__(self) -> str:  # the default would print every weight
        shapes = ", ".join(str(tuple(b.shape)) for b in self.blobs)
        return f"CaffeLayer(name={self.name!r}, type={self.type!r}, blobs=[{shapes}])"


# ---------------------------------------------------------------------------------------------------------
# Wire format


class _WireError(Exception):
    def __init__(self, msg: str, pos: int) -> None:
        super().__init__(msg)
        self.msg, self.pos = msg, pos


def _varint(buf, pos: int, end: int) -> tuple[int, int]:
    result = shift = 0
    start = pos
    while True:
        if pos >= end:
            raise _WireError("truncated varint", start)
        b = buf[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if b < 0x80:
            return result, pos
        shift += 7
        if shift >= 70:
            raise _WireError("not protobuf: varint longer than 10 bytes", start)


def _int64(v: int) -> int:
    return v - (1 << 64) if v >= 1 << 63 else v


def _skip_group(buf, pos: int, end: int, num: int) -> int:
    """Position after the end-group tag matching ``num``; nested groups are skipped too (iteratively)."""
    stack = [num]
    while stack:
        tag_pos = pos
        tag, pos = _varint(buf, pos, end)
        n, wt = tag >> 3, tag & 7
        if n == 0:
            raise _WireError("not protobuf: field number 0", tag_pos)
        if wt == _SGROUP:
            stack.append(n)
        elif wt == _EGROUP:
            if n != stack.pop():
                raise _WireError(f"not protobuf: end-group tag of field {n} inside a group of field {num}", tag_pos)
        elif wt == _VARINT:
            _, pos = _varint(buf, pos, end)
        elif wt in (_I64, _I32, _LEN):
            size = 8 if wt == _I64 else 4 if wt == _I32 else 0
            if wt == _LEN:
                size, pos = _varint(buf, pos, end)
            if pos + size > end:
                raise _WireError(f"truncated inside a group of field {num}", pos)
            pos += size
        else:
            raise _WireError(f"not protobuf: invalid wire type {wt}", tag_pos)
    return pos


class _Fields:
    """Iterate the fields of one message in ``buf[pos:end]``: yields ``(number, wire type, a, b)`` where
    ``a`` is the value of a varint, else ``buf[a:b]`` holds the value. Groups are skipped (yielded with
    wire type 3). ``pos`` may be moved forward by the caller to consume a run of fields at once."""

    def __init__(self, buf, pos: int, end: int, top_level: bool = False) -> None:
        self.buf, self.pos, self.end = buf, pos, end
        self.overrun = "truncated" if top_level else "corrupt: a field overruns its enclosing message"

    def __iter__(self) -> _Fields:
        return self

    def __next__(self) -> tuple[int, int, int, int]:
        buf, pos, end = self.buf, self.pos, self.end
        if pos >= end:
            raise StopIteration
        tag, p = _varint(buf, pos, end)
        num, wt = tag >> 3, tag & 7
        if num == 0:
            raise _WireError("not protobuf: field number 0", pos)
        if wt == _VARINT:
            value, p = _varint(buf, p, end)
            self.pos = p
            return num, wt, value, p
        if wt == _I64:
            size = 8
        elif wt == _I32:
            size = 4
        elif wt == _LEN:
            size, p = _varint(buf, p, end)
        elif wt == _SGROUP:
            self.pos = _skip_group(buf, p, end, num)
            return num, wt, p, self.pos
        elif wt == _EGROUP:
            raise _WireError("not protobuf: end-group tag without a start-group", pos)
        else:
            raise _WireError(f"not protobuf: invalid wire type {wt}", pos)
        if p + size > end:
            raise _WireError(f"{self.overrun} (field {num} needs {size} bytes, {end - p} left)", pos)
        self.pos = p + size
        return num, wt, p, p + size


def _text(buf, a: int, b: int) -> str:
    return bytes(buf[a:b]).decode("utf-8", errors="replace")


def _unpacked_run(fields: _Fields, first: int, tag_byte: int, width: int, dtype: str) -> np.ndarray:
    """Values of a run of non-packed repeated fixed-width fields, read with numpy rather than one Python
    step per value. ``first`` is the start of the first value (its tag is already consumed); the run goes
    on while the same one-byte tag follows; ``fields.pos`` is moved past it."""
    stride = width + 1
    start = first - 1  # the first value's tag byte
    if fields.buf[start] != tag_byte:  # a tag encoded in more than one byte: take this one value alone
        fields.pos = first + width
        return np.frombuffer(fields.buf, dtype, count=1, offset=first).astype(dtype[1:])
    n_max = (fields.end - start) // stride
    raw = np.frombuffer(fields.buf, np.uint8, count=n_max * stride, offset=start).reshape(n_max, stride)
    breaks = np.flatnonzero(raw[:, 0] != tag_byte)
    n = int(breaks[0]) if breaks.size else n_max
    values = raw[:n, 1:].copy().view(dtype).reshape(n).astype(dtype[1:])
    del raw  # no view into the mapped file may outlive the parse
    fields.pos = start + n * stride
    return values


def _packed(buf, a: int, b: int, width: int, dtype: str, what: str) -> np.ndarray:
    if (b - a) % width:
        raise _WireError(f"packed {what} of {b - a} bytes is not a whole number of values", a)
    # astype copies: the result owns aligned native-order memory, the file mapping can be released.
    return np.frombuffer(buf, dtype, count=(b - a) // width, offset=a).astype(dtype[1:])


def _parse_shape(buf, a: int, b: int) -> list[int]:
    dims: list[int] = []
    for num, wt, x, y in _Fields(buf, a, b):
        if num != _SHAPE_DIM:
            continue
        if wt == _VARINT:
            dims.append(_int64(x))
        elif wt == _LEN:  # packed
            p = x
            while p < y:
                d, p = _varint(buf, p, y)
                dims.append(_int64(d))
    return dims


def _parse_blob(buf, a: int, b: int) -> np.ndarray:
    shape: list[int] | None = None
    legacy: dict[int, int] = {}
    floats: list[np.ndarray] = []
    doubles: list[np.ndarray] = []
    fields = _Fields(buf, a, b)
    for num, wt, x, y in fields:
        if num == _BLOB_DATA and wt == _LEN:
            floats.append(_packed(buf, x, y, 4, "<f4", "float data"))
        elif num == _BLOB_DATA and wt == _I32:
            floats.append(_unpacked_run(fields, x, (_BLOB_DATA << 3) | _I32, 4, "<f4"))
        elif num == _BLOB_DOUBLE_DATA and wt == _LEN:
            doubles.append(_packed(buf, x, y, 8, "<f8", "double data"))
        elif num == _BLOB_DOUBLE_DATA and wt == _I64:
            doubles.append(_unpacked_run(fields, x, (_BLOB_DOUBLE_DATA << 3) | _I64, 8, "<f8"))
        elif num == _BLOB_SHAPE and wt == _LEN:
            shape = (shape or []) + _parse_shape(buf, x, y)  # a repeated optional message merges
        elif num in (_BLOB_NUM, _BLOB_CHANNELS, _BLOB_HEIGHT, _BLOB_WIDTH) and wt == _VARINT:
            legacy[num] = _int64(x)

    if shape is not None:
        dims = tuple(shape)
    elif legacy:  # deprecated 4-D blob: Caffe reads it as (num, channels, height, width), unset ones 0
        dims = tuple(legacy.get(k, 0) for k in (_BLOB_NUM, _BLOB_CHANNELS, _BLOB_HEIGHT, _BLOB_WIDTH))
    else:
        dims = None
    # Caffe's Blob::FromProto takes double_data whenever it is present, else data.
    chunks = doubles if any(d.size for d in doubles) else floats
    if len(chunks) == 1:
        data = chunks[0].astype(np.float32, copy=False)
    else:  # repeated fields split over several entries are concatenated, as protobuf does
        data = np.concatenate(chunks).astype(np.float32, copy=False) if chunks else np.zeros(0, np.float32)
    if dims is None:
        if data.size:
            raise _WireError(f"blob has {data.size} values but no shape", a)
        dims = (0,)
    if any(d < 0 for d in dims):
        raise _WireError(f"blob has a negative dimension {dims}", a)
    if math.prod(dims) != data.size:
        raise _WireError(f"blob shape {dims} needs {math.prod(dims)} values, it holds {data.size}", a)
    return data.reshape(dims)


def _parse_layer(buf, a: int, b: int, legacy: bool, index: int) -> CaffeLayer:
    name_f, type_f, blobs_f = (_V1_NAME, _V1_TYPE, _V1_BLOBS) if legacy else (_LAYER_NAME, _LAYER_TYPE, _LAYER_BLOBS)
    name, type_ = "", ""
    blob_spans: list[tuple[int, int]] = []
    try:
        for num, wt, x, y in _Fields(buf, a, b):
            if num == name_f and wt == _LEN:
                name = _text(buf, x, y)
            elif num == type_f and legacy and wt == _VARINT:
                type_ = _V1_TYPES.get(x, f"V1Type{x}")
            elif num == type_f and not legacy and wt == _LEN:
                type_ = _text(buf, x, y)
            elif num == blobs_f and wt == _LEN:
                blob_spans.append((x, y))
    except _WireError as e:
        raise _WireError(f"layer #{index}: {e.msg}", e.pos) from None
    blobs = []
    for i, (x, y) in enumerate(blob_spans):
        try:
            blobs.append(_parse_blob(buf, x, y))
        except _WireError as e:
            raise _WireError(f"layer #{index} {name!r} blob {i}: {e.msg}", e.pos) from None
    return CaffeLayer(name, type_, blobs)


def _parse_net(buf, size: int) -> list[CaffeLayer]:
    release = isinstance(buf, mmap.mmap) and hasattr(mmap, "MADV_DONTNEED")
    released = 0
    layers: list[CaffeLayer] = []
    for num, wt, a, b in _Fields(buf, 0, size, top_level=True):
        if wt != _LEN or num not in (_NET_LAYER, _NET_LAYERS_V1):
            continue
        layers.append(_parse_layer(buf, a, b, num == _NET_LAYERS_V1, len(layers)))
        if release:
            # The weights were copied out: drop the file pages read so far from this process's resident set.
            upto = b - b % mmap.PAGESIZE
            if upto > released:
                buf.madvise(mmap.MADV_DONTNEED, released, upto - released)
                released = upto
    return layers


def _looks_like_text(head: bytes) -> bool:
    return bool(head) and all(32 <= c < 127 or c in b"\t\r\n" for c in head)


def read_caffemodel(path: str | os.PathLike) -> list[CaffeLayer]:
    """The layers of a ``.caffemodel`` in file order, new-style ``layer`` and legacy V1 ``layers`` alike.

    Blobs are float32 arrays of the stored shape (legacy blobs: ``(num, channels, height, width)``).
    Raises ``CaffeError`` naming the file for anything that is not a well-formed caffemodel."""
    path = Path(path)
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size == 0:
            raise CaffeError(f"{path}: empty file, not a Caffe model")
        mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    try:
        layers = _parse_net(mm, size)
    except _WireError as e:
        hint = " (the file looks like text; a .caffemodel is binary)" if _looks_like_text(mm[:64]) else ""
        raise CaffeError(f"{path}: {e.msg} at byte {e.pos}{hint}") from None
    finally:
        with contextlib.suppress(BufferError):  # a stray view keeps it mapped until collected
            mm.close()
    if not layers:
        raise CaffeError(f"{path}: no layers found, not a Caffe model ({size} bytes)")
    return layers


# ---------------------------------------------------------------------------------------------------------
# Writing (fixtures, tests, benchmarks)


def _uvarint(v: int) -> bytes:
    if v < 0:
        v += 1 << 64  # int64 two's complement, as protobuf does
    out = bytearray()
    while True:
        b = v & 0x7F
        v >>= 7
        if v:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def _len_field(num: int, payload: bytes) -> bytes:
    return _uvarint((num << 3) | _LEN) + _uvarint(len(payload)) + payload


def _encode_blob(blob: np.ndarray, legacy: bool) -> bytes:
    arr = np.ascontiguousarray(blob, dtype="<f4")
    parts = []
    if legacy:
        if arr.ndim > 4:
            raise ValueError(f"a legacy blob has at most 4 dimensions, got shape {arr.shape}")
        dims = (1,) * (4 - arr.ndim) + arr.shape
        for num, d in zip((_BLOB_NUM, _BLOB_CHANNELS, _BLOB_HEIGHT, _BLOB_WIDTH), dims, strict=True):
            parts.append(_uvarint(num << 3) + _uvarint(d))
    parts.append(_len_field(_BLOB_DATA, arr.tobytes()))
    if not legacy:  # after data: protobuf writes fields in number order, as real files have them
        parts.append(_len_field(_BLOB_SHAPE, _len_field(_SHAPE_DIM, b"".join(_uvarint(d) for d in arr.shape))))
    return b"".join(parts)


def _v1_number(layer: CaffeLayer) -> int:
    if layer.type in _V1_NUMBERS:
        return _V1_NUMBERS[layer.type]
    m = re.fullmatch(r"V1Type(\d+)", layer.type)
    if m is None:
        raise ValueError(f"layer {layer.name!r}: type {layer.type!r} has no V1LayerParameter enum value")
    return int(m[1])


def write_caffemodel(path: str | os.PathLike, layers: Iterable[CaffeLayer], legacy: bool = False) -> None:
    """Write ``layers`` as a caffemodel (new-style ``layer`` with ``shape``, or with ``legacy=True`` V1
    ``layers`` with enum types and num/channels/height/width dims). Written atomically."""
    from deeplab.files import atomic_path

    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        for layer in layers:
            if legacy:
                head = _len_field(_V1_NAME, layer.name.encode()) + _uvarint(_V1_TYPE << 3) + _uvarint(_v1_number(layer))
            else:
                head = _len_field(_LAYER_NAME, layer.name.encode()) + _len_field(_LAYER_TYPE, layer.type.encode())
            blobs_f = _V1_BLOBS if legacy else _LAYER_BLOBS
            body = head + b"".join(_len_field(blobs_f, _encode_blob(b, legacy)) for b in layer.blobs)
            f.write(_len_field(_NET_LAYERS_V1 if legacy else _NET_LAYER, body))


# ---------------------------------------------------------------------------------------------------------
# Conversion

_STEM = {"conv1": "conv", "bn_conv1": "bn", "scale_conv1": "scale"}
_BLOCK_RE = re.compile(r"(res|bn|scale)([2-5])([a-z])(\d*)_branch(1|2a|2b|2c)")
_ASPP_RE = re.compile(r"fc\d*_.+_c(\d+)")
_ROLE = {"res": "conv", "bn": "bn", "scale": "scale"}
_BRANCH = {"1": "shortcut", "2a": "reduce", "2b": "conv3x3", "2c": "increase"}
_TYPE_OF_ROLE = {"conv": "Convolution", "bn": "BatchNorm", "scale": "Scale"}
_BLOBS_OF_ROLE = {
    "conv": ("weight",),  # the backbone convs have no bias (Caffe bias_term: false)
    "bn": ("mean", "variance", "moving-average factor"),
    "scale": ("gamma", "beta"),
}
_SKIP_SUBSTRINGS = ("res075", "res05")  # MSC weight-sharing copies of the network at 0.75x and 0.5x


def _target(name: str) -> tuple[str, str] | None:
    """(role, module path) of the backbone layer ``name``: role conv, bn or scale; the module is a
    ConvBnReLU such as ``base.layer4.block23.conv3x3``."""
    if name in _STEM:
        return _STEM[name], "base.layer1.conv1"
    m = _BLOCK_RE.fullmatch(name)
    if m is None:
        return None
    prefix, stage, letter, digits, branch = m.groups()
    if digits:  # ResNet-101 naming: a, b1, b2, ... (res4b22 is block 23)
        if letter != "b" or int(digits) < 1:
            return None
        block = int(digits) + 1
    else:  # a, b, c (and d, e, f as in ResNet-50)
        block = ord(letter) - ord("a") + 1
    return _ROLE[prefix], f"base.layer{stage}.block{block}.{_BRANCH[branch]}"


def _caffe_name(key: str, n_blocks: Sequence[int]) -> str:
    """The Caffe layer expected to provide the state-dict entry ``key`` (for error messages)."""
    parts = key.split(".")
    prefix = "res" if parts[-2] == "conv" else "scale" if parts[-1] in ("weight", "bias") else "bn"
    if parts[1] == "layer1":
        return {"res": "conv1", "bn": "bn_conv1", "scale": "scale_conv1"}[prefix]
    stage, block = int(parts[1][5:]), int(parts[2][5:])
    if block == 1:
        suffix = "a"
    elif n_blocks[stage - 2] > 3:
        suffix = f"b{block - 1}"
    else:
        suffix = chr(ord("a") + block - 1)
    branch = {v: k for k, v in _BRANCH.items()}[parts[3]]
    return f"{prefix}{stage}{suffix}_branch{branch}"


def _squeeze_leading(shape: Sequence[int]) -> tuple[int, ...]:
    shape = tuple(shape)
    while len(shape) > 1 and shape[0] == 1:
        shape = shape[1:]
    return shape


def _model_shapes(n_classes: int, n_blocks: Sequence[int], width: int) -> dict[str, tuple[int, ...]]:
    """State-dict keys and shapes of ``deeplab.models.build_model(n_classes, n_blocks, width)``, in its order.

    Written out rather than read from a model: a real one costs the weights' memory, and one on the meta
    device spends seconds on a first-use import for the ASPP's normal_ init. tests/test_caffe.py checks
    this against the model."""
    shapes: dict[str, tuple[int, ...]] = {}

    def conv_bn(module: str, cin: int, cout: int, kernel: int) -> None:
        shapes[f"{module}.conv.weight"] = (cout, cin, kernel, kernel)
        for name in ("weight", "bias", "running_mean", "running_var"):
            shapes[f"{module}.bn.{name}"] = (cout,)
        shapes[f"{module}.bn.num_batches_tracked"] = ()

    conv_bn("base.layer1.conv1", 3, width, 7)
    cin = width
    for stage, n, cout in zip((2, 3, 4, 5), n_blocks, (4 * width, 8 * width, 16 * width, 32 * width), strict=True):
        for i in range(n):
            block = f"base.layer{stage}.block{i + 1}"
            conv_bn(f"{block}.reduce", cin, cout // 4, 1)
            conv_bn(f"{block}.conv3x3", cout // 4, cout // 4, 3)
            conv_bn(f"{block}.increase", cout // 4, cout, 1)
            if i == 0:
                conv_bn(f"{block}.shortcut", cin, cout, 1)
            cin = cout
    for i in range(len(ASPP_RATES)):
        shapes[f"base.aspp.c{i}.weight"] = (n_classes, cin, 3, 3)
        shapes[f"base.aspp.c{i}.bias"] = (n_classes,)
    return shapes


def _tensor(arr: np.ndarray, shape: tuple[int, ...]) -> torch.Tensor:
    import torch

    a = np.ascontiguousarray(arr, dtype=np.float32)
    if not a.flags.writeable:
        a = a.copy()
    return torch.from_numpy(a.reshape(shape))  # shares memory with the blob: no second copy of the weights


def convert(layers: Iterable[CaffeLayer], n_classes: int, n_blocks: Sequence[int] = (3, 4, 23, 3),
            width: int = 64) -> tuple[dict[str, torch.Tensor], list[str]]:
    """The state dict of ``deeplab.models.build_model(n_classes, n_blocks, width)`` from Caffe layers, and
    log messages.

    Every backbone tensor must come from exactly one layer with the right shape (else ``CaffeError`` listing
    the problems). The ASPP head is copied when the file has all four branches ``fc1_*_c0..c3`` of the right
    shape, else it is initialised fresh (N(0, 0.01) weights, zero bias, seeded). BatchNorm statistics follow
    Caffe: mean and variance are scaled by 1 / factor, and by 0 when the factor is 0. Conv weights share
    memory with the blobs."""
    import torch

    if len(n_blocks) != 4:
        raise ValueError(f"n_blocks must give the blocks of res2..res5 (4 numbers), got {tuple(n_blocks)}")
    shapes = _model_shapes(n_classes, n_blocks, width)
    n_aspp = len(ASPP_RATES)
    state: dict[str, torch.Tensor] = {}
    source: dict[str, str] = {}
    problems: list[str] = []
    log: list[str] = []
    aspp: dict[int, CaffeLayer] = {}
    n_copies = n_empty = n_used = 0

    def put(key: str, layer: CaffeLayer, value: np.ndarray | torch.Tensor) -> None:
        if key not in shapes:
            problems.append(f"{layer.name}: no {key} in the model (n_blocks={tuple(n_blocks)})")
        elif key in source:
            problems.append(f"{key}: set twice, by {source[key]} and {layer.name}")
        elif isinstance(value, torch.Tensor):
            state[key], source[key] = value, layer.name
        elif _squeeze_leading(value.shape) != _squeeze_leading(shapes[key]):
            problems.append(f"{layer.name}: blob of shape {tuple(value.shape)}, {key} needs {shapes[key]}")
        else:
            state[key], source[key] = _tensor(value, shapes[key]), layer.name

    for layer in layers:
        if any(s in layer.name for s in _SKIP_SUBSTRINGS):
            n_copies += 1
            continue
        if not layer.blobs:
            n_empty += 1
            continue
        blob_shapes = ", ".join(str(tuple(b.shape)) for b in layer.blobs)
        target = _target(layer.name)
        if target is None:
            m = _ASPP_RE.fullmatch(layer.name)
            if m and int(m[1]) < n_aspp:
                i = int(m[1])
                if i in aspp:
                    problems.append(f"{layer.name}: second ASPP branch c{i} (first: {aspp[i].name})")
                aspp.setdefault(i, layer)
            elif layer.name.startswith("fc") and layer.name.count("_") <= 1:
                log.append(f"skipped {layer.name} ({layer.type}, blobs {blob_shapes}): a classifier that is not "
                           f"part of DeepLab v2's ASPP head")
            else:
                problems.append(f"{layer.name} ({layer.type}, blobs {blob_shapes}): no place for it in the model")
            continue

        role, module = target
        expected_type = _TYPE_OF_ROLE[role]
        if layer.type in _TYPE_OF_ROLE.values() and layer.type != expected_type:
            problems.append(f"{layer.name}: type {layer.type}, a layer of this name must be {expected_type}")
            continue
        wanted = _BLOBS_OF_ROLE[role]
        if len(layer.blobs) != len(wanted):
            problems.append(f"{layer.name}: {len(layer.blobs)} blobs ({blob_shapes}), expected {len(wanted)} "
                            f"({', '.join(wanted)}) for {module}.{'conv' if role == 'conv' else 'bn'}")
            continue
        n_used += 1
        if role == "conv":
            put(f"{module}.conv.weight", layer, layer.blobs[0])
        elif role == "scale":
            put(f"{module}.bn.weight", layer, layer.blobs[0])
            put(f"{module}.bn.bias", layer, layer.blobs[1])
        else:
            mean, var, factor = layer.blobs
            if factor.size != 1:
                problems.append(f"{layer.name}: moving-average factor blob has shape {factor.shape}, expected 1 value")
                continue
            f = np.float32(factor.reshape(-1)[0])
            # Caffe stores mean * f, var * f and f. A factor of 0 is taken as 1 (the DeepLab conversion
            # convention; BVLC's BatchNormLayer would zero the statistics instead). Trained files never have it.
            scale = np.float32(1) if f == 0 else np.float32(1) / f
            if f == 0 and (np.any(mean) or np.any(var)):
                log.append(f"{layer.name}: moving-average factor 0 taken as 1 (statistics used as stored)")
            put(f"{module}.bn.running_mean", layer, np.asarray(mean, np.float32) * scale)
            put(f"{module}.bn.running_var", layer, np.asarray(var, np.float32) * scale)
            put(f"{module}.bn.num_batches_tracked", layer, torch.tensor(0, dtype=torch.long))

    for key in shapes:
        if ".aspp." not in key and key not in state:
            problems.append(f"{key}: missing (expected from Caffe layer {_caffe_name(key, n_blocks)})")
    if problems:
        shown = "; ".join(problems[:20]) + (f"; ... and {len(problems) - 20} more" if len(problems) > 20 else "")
        raise CaffeError(f"weights do not fit DeepLab v2 (n_blocks={tuple(n_blocks)}, width={width}): "
                         f"{len(problems)} problem(s): {shown}")

    log.insert(0, f"{n_used} layers converted into {len(state)} backbone tensors; skipped {n_copies} MSC copies "
                  f"(res075/res05) and {n_empty} layers without weights")
    head, reason = _aspp_from_layers(aspp, shapes, n_aspp)
    if head is None:
        head = _fresh_aspp(shapes, n_aspp)
        log.append(f"ASPP head {reason}: initialised fresh (N(0, 0.01) weights, zero bias, seed {ASPP_SEED})")
    else:
        log.append(f"ASPP head {reason}")
    state.update(head)
    return {k: state[k] for k in shapes}, log


def _aspp_from_layers(aspp: dict[int, CaffeLayer], shapes: dict[str, tuple[int, ...]],
                      n_aspp: int) -> tuple[dict[str, torch.Tensor] | None, str]:
    """The head copied from the file, or None and why not."""
    if not aspp:
        return None, "not in the file"
    if len(aspp) < n_aspp:
        found = ", ".join(aspp[i].name for i in sorted(aspp))
        return None, f"incomplete in the file (only {found})"
    names = ", ".join(aspp[i].name for i in range(n_aspp))
    want_w, want_b = shapes["base.aspp.c0.weight"], shapes["base.aspp.c0.bias"]
    for i in range(n_aspp):
        blobs = aspp[i].blobs
        if len(blobs) != 2:
            return None, f"{aspp[i].name} has {len(blobs)} blobs, expected 2 (weight, bias)"
        if _squeeze_leading(blobs[0].shape) != _squeeze_leading(want_w) or blobs[1].size != want_b[0]:
            got = f"{tuple(blobs[0].shape)} + bias {tuple(blobs[1].shape)}"
            return None, f"{aspp[i].name} has shape {got}, the model needs {want_w} ({want_b[0]} classes)"
    head = {}
    for i in range(n_aspp):
        head[f"base.aspp.c{i}.weight"] = _tensor(aspp[i].blobs[0], shapes[f"base.aspp.c{i}.weight"])
        head[f"base.aspp.c{i}.bias"] = _tensor(aspp[i].blobs[1], shapes[f"base.aspp.c{i}.bias"])
    return head, f"copied from {names} ({want_b[0]} classes)"


def _fresh_aspp(shapes: dict[str, tuple[int, ...]], n_aspp: int) -> dict[str, torch.Tensor]:
    import torch

    gen = torch.Generator().manual_seed(ASPP_SEED)
    head = {}
    for i in range(n_aspp):
        head[f"base.aspp.c{i}.weight"] = torch.empty(shapes[f"base.aspp.c{i}.weight"]).normal_(0, 0.01, generator=gen)
        head[f"base.aspp.c{i}.bias"] = torch.zeros(shapes[f"base.aspp.c{i}.bias"])
    return head


def fresh_head(log: Sequence[str]) -> str | None:
    """The line of ``convert``'s log saying the ASPP head was initialised fresh (the file had none for the
    class count), or None when it was copied."""
    return next((line for line in log if line.startswith("ASPP head") and "fresh" in line), None)


def convert_caffemodel(path: str | os.PathLike, out_path: str | os.PathLike, n_classes: int,
                       n_blocks: Sequence[int] = (3, 4, 23, 3), width: int = 64) -> list[str]:
    """Read ``path``, convert it (see ``convert``) and save the state dict to ``out_path`` (atomically).
    Returns the log messages."""
    from deeplab.files import save_torch

    layers = read_caffemodel(path)
    try:
        state, log = convert(layers, n_classes, n_blocks, width)
    except CaffeError as e:
        raise CaffeError(f"{path}: {e}") from None
    del layers  # the conv weights live on in ``state``
    save_torch(state, out_path)
    return [f"read {path}", *log, f"wrote {len(state)} tensors to {out_path}"]
