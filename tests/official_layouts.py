"""Small archives in the exact official layouts (a few images each), and a loopback HTTP server for them.

The server speaks HTTP Range and can be told to drop the connection midway through a file, so the real
download code is tested against real sockets."""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
import threading
import zipfile
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest
import scipy.io
from PIL import Image

from deeplab.data import PALETTE
from tests.conftest import VOC_FIXTURES, in_ci


class ArchiveServer:
    """Serves ``files`` (name -> bytes) on 127.0.0.1. ``drop_after[name] = n`` makes the next response for
    that file stop after n bytes (the connection closes); ``log`` records (name, Range header)."""

    def __init__(self) -> None:
        self.files: dict[str, bytes] = {}
        self.drop_after: dict[str, int] = {}
        self.fail: dict[str, int] = {}  # name -> number of 503 answers still to give
        self.log: list[tuple[str, str | None]] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:
                pass

            def do_GET(self) -> None:  # noqa: N802
                name = self.path.lstrip("/").split("?")[0]
                rng = self.headers.get("Range")
                server.log.append((name, rng))
                if server.fail.get(name, 0) > 0:
                    server.fail[name] -= 1
                    self.send_response(503)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                data = server.files.get(name)
                if data is None:
                    self.send_response(404)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                start = 0
                etag = f'"{hashlib.md5(data).hexdigest()}"'
                if rng and self.headers.get("If-Range", etag) != etag:  # changed since: the whole file
                    rng = None
                if rng:
                    start = int(rng.removeprefix("bytes=").split("-")[0])
                    if start >= len(data):
                        self.send_response(416)
                        self.send_header("Content-Range", f"bytes */{len(data)}")
                        self.send_header("Content-Length", "0")
                        self.end_headers()
                        return
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                else:
                    self.send_response(200)
                body = data[start:]
                self.send_header("ETag", etag)
                self.send_header("Content-Length", str(len(body)))
                self.send_header("Accept-Ranges", "bytes")
                self.end_headers()
                cut = server.drop_after.pop(name, None)
                if cut is not None:
                    self.wfile.write(body[:cut])
                    self.wfile.flush()
                    self.close_connection = True
                    self.connection.shutdown(2)
                    return
                self.wfile.write(body)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self) -> ArchiveServer:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def md5(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()


def _jpeg(rng: np.random.Generator, h: int, w: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(buf, "JPEG")
    return buf.getvalue()


def _png(label: np.ndarray, palette: bool) -> bytes:
    im = Image.fromarray(label.astype(np.uint8), mode="P" if palette else "L")
    if palette:
        im.putpalette(PALETTE.tobytes())
    buf = io.BytesIO()
    im.save(buf, "PNG")
    return buf.getvalue()


def _blocks(rng: np.random.Generator, h: int, w: int, classes: list[int]) -> np.ndarray:
    """A label map of a few rectangles, so a tiny model has something learnable."""
    lab = np.full((h, w), classes[0], np.uint8)
    for c in classes[1:]:
        y, x = int(rng.integers(0, h // 2)), int(rng.integers(0, w // 2))
        lab[y:y + h // 3, x:x + w // 3] = c
    return lab


def _zip(entries: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        for name, data in entries.items():
            z.writestr(name, data)
    return buf.getvalue()


def _tar(entries: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as t:
        for name, data in entries.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            t.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def voc_archives(n_train: int = 6, n_val: int = 3, seed: int = 0) -> dict[str, bytes]:
    """VOCtrainval tar (with the two real VOC samples when available), SegmentationClassAug.zip, list.zip."""
    rng = np.random.default_rng(seed)
    ids = [f"2008_{i:06d}" for i in range(n_train + n_val)]
    tar: dict[str, bytes] = {}
    aug: dict[str, bytes] = {"__MACOSX/SegmentationClassAug/._junk": b"x"}
    base = "VOCdevkit/VOC2012"
    real = []
    if not VOC_FIXTURES.is_dir() and in_ci():  # CI has shared/: without it the real samples would go untested
        pytest.fail(f"shared fixtures not found at {VOC_FIXTURES} (CI=true)")
    if VOC_FIXTURES.is_dir():
        real = ["2007_000032", "2007_000033"]
        for i in real:
            tar[f"{base}/JPEGImages/{i}.jpg"] = (VOC_FIXTURES / "JPEGImages" / f"{i}.jpg").read_bytes()
            png = (VOC_FIXTURES / "SegmentationClass" / f"{i}.png").read_bytes()
            tar[f"{base}/SegmentationClass/{i}.png"] = png
            # SegmentationClassAug holds the same indices as grayscale PNGs
            aug[f"SegmentationClassAug/{i}.png"] = _png(np.array(Image.open(io.BytesIO(png))), palette=False)
    for i in ids:
        tar[f"{base}/JPEGImages/{i}.jpg"] = _jpeg(rng, 60, 80)
        lab = _blocks(rng, 60, 80, [0, int(rng.integers(1, 21)), 255])
        tar[f"{base}/SegmentationClass/{i}.png"] = _png(lab, palette=True)
        aug[f"SegmentationClassAug/{i}.png"] = _png(lab, palette=False)
    all_ids = real + ids
    train, val = all_ids[: n_train + (1 if real else 0)], all_ids[n_train + (1 if real else 0):]
    tar[f"{base}/ImageSets/Segmentation/train.txt"] = "".join(f"{i}\n" for i in train).encode()
    tar[f"{base}/ImageSets/Segmentation/val.txt"] = "".join(f"{i}\n" for i in val).encode()

    def listing(split_ids: list[str]) -> bytes:
        return "".join(f"/JPEGImages/{i}.jpg /SegmentationClassAug/{i}.png\n" for i in split_ids).encode()

    lists = {"list/train_aug.txt": listing(train), "list/val.txt": listing(val),
             "list/train.txt": listing(train), "list/trainval_aug.txt": listing(all_ids)}
    return {"VOCtrainval_11-May-2012.tar": _tar(tar), "SegmentationClassAug.zip": _zip(aug),
            "list.zip": _zip(lists)}


def mat_bytes(s: np.ndarray) -> bytes:
    buf = io.BytesIO()
    scipy.io.savemat(buf, {"S": s, "names": np.array(["unlabeled", "person"], dtype=object)}, format="5")
    return buf.getvalue()


def cocostuff10k_archive(n_train: int = 6, n_test: int = 3, seed: int = 1) -> dict[str, bytes]:
    """cocostuff-10k-v1.1.zip: images/, annotations/*.mat (field S, 0 = unlabeled, 1..182), imageLists/."""
    rng = np.random.default_rng(seed)
    ids = [f"COCO_train2014_{i:012d}" for i in range(n_train + n_test)]
    entries: dict[str, bytes] = {}
    for k, i in enumerate(ids):
        entries[f"images/{i}.jpg"] = _jpeg(rng, 48, 64)
        s = _blocks(rng, 48, 64, [0, *rng.integers(1, 183, size=2).tolist()])
        # Real files store S as double in some versions and uint8/16 in others: cover both.
        entries[f"annotations/{i}.mat"] = mat_bytes(s.astype(np.float64 if k % 2 else np.uint16))
    entries["imageLists/train.txt"] = "".join(f"{i}\n" for i in ids[:n_train]).encode()
    entries["imageLists/test.txt"] = "".join(f"{i}\n" for i in ids[n_train:]).encode()
    entries["imageLists/all.txt"] = "".join(f"{i}\n" for i in ids).encode()
    return {"cocostuff-10k-v1.1.zip": _zip(entries)}


def cocostuff164k_archives(n_train: int = 6, n_val: int = 3, seed: int = 2) -> dict[str, bytes]:
    """train2017.zip, val2017.zip and stuffthingmaps_trainval2017.zip (grayscale PNGs 0..181, 255)."""
    rng = np.random.default_rng(seed)
    out: dict[str, bytes] = {}
    maps: dict[str, bytes] = {}
    for split, n in (("train2017", n_train), ("val2017", n_val)):
        images = {}
        for k in range(n):
            i = f"{(k + 1) * 139 + (0 if split == 'train2017' else 7):012d}"
            images[f"{split}/{i}.jpg"] = _jpeg(rng, 48, 64)
            maps[f"{split}/{i}.png"] = _png(_blocks(rng, 48, 64, [0, 181, 255]), palette=False)
        out[f"{split}.zip"] = _zip(images)
    out["stuffthingmaps_trainval2017.zip"] = _zip(maps)
    return out



def _box(y0: int, y1: int, x0: int, x1: int, size: int = 48) -> np.ndarray:
    m = np.zeros((size, size), bool)
    m[y0:y1, x0:x1] = True
    return m


def _polygon(y0: int, y1: int, x0: int, x1: int) -> list[float]:
    """A rectangle's outline; COCO's rasteriser fills exactly rows y0..y1-1, columns x0..x1-1."""
    return [x0, y0, x1, y0, x1, y1, x0, y1]


def _rle(m: np.ndarray) -> dict:
    """Uncompressed RLE, as COCO stores crowd regions: run lengths over the column-major pixels, from 0s."""
    flat = m.flatten(order="F").astype(np.int8)
    edges = np.flatnonzero(np.diff(np.concatenate([[0], flat, [1 - flat[-1]]])))
    counts = np.diff(np.concatenate([[0], edges])).tolist()
    return {"counts": counts, "size": list(m.shape)}


def coco21_fixture(seed: int = 3) -> tuple[dict[str, bytes], dict[str, dict[str, np.ndarray]]]:
    """train2017.zip, val2017.zip and annotations_trainval2017.zip (instances_<split>.json) of 48x48 images,
    and the 21-class mask prepare must render for each image it keeps (per split, by id). Covers polygons (one
    and several per instance), uncompressed RLE (crowd and not), compressed RLE, overlaps (the first instance
    keeps a pixel), categories outside the 21, an image without instances and the 1,000-pixel threshold
    (1,000 dropped, 1,001 kept) in both splits."""
    from pycocotools import mask as coco_mask

    rng = np.random.default_rng(seed)
    s = 48
    person, car, dog, cat, bird, bus, cow, traffic_light = 1, 3, 18, 17, 16, 6, 21, 10  # COCO ids
    first = lambda n: np.arange(s * s).reshape(s, s, order="F") < n  # noqa: E731 (first n column-major pixels)
    compressed = coco_mask.encode(np.asfortranarray(_box(8, 44, 2, 38).astype(np.uint8)))
    compressed["counts"] = compressed["counts"].decode()
    # split -> [(instances: [(COCO category, segmentation, iscrowd)], expected mask or None if dropped)]
    spec: dict[str, list[tuple[list, np.ndarray | None]]] = {"train2017": [], "val2017": []}
    m = np.zeros((s, s), np.uint8)
    m[_box(4, 40, 4, 40)] = 15
    m[_box(30, 46, 30, 46) & (m == 0)] = 7
    m[_box(0, 4, 0, 48)] = 12
    m[_box(44, 48, 0, 20)] = 12
    spec["train2017"].append(([(person, [_polygon(4, 40, 4, 40)], 0),
                               (car, _rle(_box(30, 46, 30, 46)), 1),  # crowd: painted as car below the person
                               (traffic_light, [_polygon(40, 48, 20, 30)], 0),  # not one of the 21: background
                               (dog, [_polygon(0, 4, 0, 48), _polygon(44, 48, 0, 20)], 0)], m))
    spec["train2017"].append(([(cat, _rle(_box(2, 42, 3, 43)), 0)], np.where(_box(2, 42, 3, 43), 8, 0)))
    spec["train2017"].append(([(bird, [_polygon(0, 30, 0, 30)], 0)], None))  # 900 pixels: dropped
    spec["train2017"].append(([], None))  # no instances
    spec["train2017"].append(([(cow, _rle(first(1000)), 0)], None))  # exactly 1,000: dropped
    spec["train2017"].append(([(cow, _rle(first(1001)), 0)], np.where(first(1001), 10, 0)))
    spec["val2017"].append(([(bus, [_polygon(5, 40, 5, 40)], 0)], np.where(_box(5, 40, 5, 40), 6, 0)))
    spec["val2017"].append(([(person, compressed, 1)], np.where(_box(8, 44, 2, 38), 15, 0)))
    spec["val2017"].append(([(dog, [_polygon(10, 40, 10, 40)], 0)], None))  # 900 pixels: dropped too
    spec["val2017"].append(([(dog, _rle(_box(0, 40, 0, 30)), 1)], np.where(_box(0, 40, 0, 30), 12, 0)))
    out: dict[str, bytes] = {}
    annotations: dict[str, bytes] = {}
    expected: dict[str, dict[str, np.ndarray]] = {}
    ann_id = 1
    for k, (split, rows) in enumerate(spec.items()):
        images, anns, zipped, expected[split] = [], [], {}, {}
        for n, (instances, mask) in enumerate(rows):
            image_id = 100 * (k + 1) + n
            name = f"{image_id:012d}.jpg"
            zipped[f"{split}/{name}"] = _jpeg(rng, s, s)
            images.append({"id": image_id, "file_name": name, "height": s, "width": s})
            for category, segmentation, crowd in instances:
                anns.append({"id": ann_id, "image_id": image_id, "category_id": category, "iscrowd": crowd,
                             "segmentation": segmentation, "area": 0.0, "bbox": [0, 0, 1, 1]})
                ann_id += 1
            if mask is not None:
                expected[split][name.removesuffix(".jpg")] = mask.astype(np.uint8)
        out[f"{split}.zip"] = _zip(zipped)
        categories = [{"id": i, "name": f"c{i}", "supercategory": "x"} for i in range(1, 91)]
        annotations[f"annotations/instances_{split}.json"] = json.dumps(
            {"images": images, "annotations": anns, "categories": categories}).encode()
    out["annotations_trainval2017.zip"] = _zip(annotations)
    return out, expected


def coco21_archives() -> dict[str, bytes]:
    return coco21_fixture()[0]
