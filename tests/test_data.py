import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from deeplab import synthetic
from deeplab.data import (
    PALETTE,
    DataError,
    Item,
    read_image,
    read_label,
    read_list,
    voc_layout_items,
    write_label,
    write_list,
)
from deeplab.loader import Augment, DrawSampler, SegmentationDataset, augment, to_input


def test_palette_is_the_voc_colour_map():
    assert PALETTE[0].tolist() == [0, 0, 0]
    assert PALETTE[1].tolist() == [128, 0, 0]
    assert PALETTE[15].tolist() == [192, 128, 128]  # person
    assert PALETTE[255].tolist() == [224, 224, 192]  # void


def test_real_voc_labels_decode_by_palette_index(voc_fixtures):
    a = read_label(voc_fixtures / "SegmentationClass" / "2007_000032.png")
    b = read_label(voc_fixtures / "SegmentationClass" / "2007_000033.png")
    assert a.shape == (281, 500) and b.shape == (366, 500)
    assert set(np.unique(a).tolist()) == {0, 1, 15, 255}
    assert set(np.unique(b).tolist()) == {0, 1, 255}
    # The colour of an aeroplane pixel is the palette's colour 1, proving we read indices, not RGB.
    rgb = np.asarray(Image.open(voc_fixtures / "SegmentationClass" / "2007_000032.png").convert("RGB"))
    assert rgb[a == 1][0].tolist() == PALETTE[1].tolist()
    image = read_image(voc_fixtures / "JPEGImages" / "2007_000032.jpg")
    assert image.shape == (281, 500, 3) and image.dtype == np.uint8


def test_label_roundtrip_and_rgb_label_rejected(tmp_path):
    lab = np.array([[0, 3], [255, 1]], np.uint8)
    write_label(tmp_path / "l.png", lab)
    assert np.array_equal(read_label(tmp_path / "l.png"), lab)
    Image.new("RGB", (2, 2)).save(tmp_path / "rgb.png")
    with pytest.raises(DataError, match="rgb.png: label must be a palette or grayscale"):
        read_label(tmp_path / "rgb.png")
    with pytest.raises(DataError, match=r"got mode RGB: a colour-coded label map\? Convert it to class indices "
                                        r"\(dataset.custom.colours only sets display colours\)"):
        read_label(tmp_path / "rgb.png")
    Image.new("LA", (2, 2)).save(tmp_path / "la.png")
    with pytest.raises(DataError, match=r"la.png: label must be a palette or grayscale image of class indices, got "
                                        r"mode LA$"):
        read_label(tmp_path / "la.png")


def test_jpeg_label_refused_its_compression_shifts_classes(tmp_path):
    """A grayscale JPEG of class indices decodes to other, still valid, classes near edges: refused by name
    instead of trained and scored as it decodes."""
    lab = np.zeros((40, 40), np.uint8)
    lab[:, 13:] = 1
    lab[:, 26:] = 2
    Image.fromarray(lab, mode="L").save(tmp_path / "l.jpg")
    decoded = np.asarray(Image.open(tmp_path / "l.jpg"))
    assert decoded.max() <= 2 and (decoded != lab).any()  # wrong, yet every value a class
    with pytest.raises(DataError, match=r"l\.jpg: label is a JPEG file, whose lossy compression changes class "
                                        r"values near edges: save labels losslessly \(PNG\)"):
        read_label(tmp_path / "l.jpg")
    Image.fromarray(lab, mode="L").save(tmp_path / "named.png", format="JPEG")  # by content, not by suffix
    with pytest.raises(DataError, match="named.png: label is a JPEG file"):
        read_label(tmp_path / "named.png", (tmp_path / "named.png").read_bytes())


def test_16_bit_and_bilevel_labels_read_by_value(tmp_path):
    """Grayscale labels are read by value at any depth: a 16-bit PNG (OpenCV's uint16 masks) holding class
    values was refused as 'not a palette or grayscale image'; values past 255 are named, never wrapped."""
    lab = np.array([[0, 1, 2], [255, 2, 0]], np.uint16)
    Image.fromarray(lab).save(tmp_path / "l16.png")
    assert Image.open(tmp_path / "l16.png").mode.startswith("I")
    assert read_label(tmp_path / "l16.png").tolist() == lab.tolist()
    assert read_label(tmp_path / "l16.png").dtype == np.uint8
    lab[0, 0] = 300  # would wrap to class 44 as uint8
    Image.fromarray(lab).save(tmp_path / "wide.png")
    with pytest.raises(DataError, match=r"wide\.png: label of mode I(;16)? with values 0\.\.300: class values must be "
                                        r"0\.\.255"):
        read_label(tmp_path / "wide.png")
    Image.fromarray(np.array([[0, 1], [1, 0]], bool)).save(tmp_path / "mask.png")  # mode 1
    assert read_label(tmp_path / "mask.png").tolist() == [[0, 1], [1, 0]]


def test_corrupt_and_missing_image_named(tmp_path):
    (tmp_path / "bad.jpg").write_bytes(b"\xff\xd8garbage")
    with pytest.raises(DataError, match="bad.jpg: cannot read image"):
        read_image(tmp_path / "bad.jpg")
    with pytest.raises(DataError, match="nope.jpg: image file not found"):
        read_image(tmp_path / "nope.jpg")


def test_read_image_converts_gray_and_rgba(tmp_path):
    Image.new("L", (5, 4), 7).save(tmp_path / "g.png")
    Image.new("RGBA", (5, 4), (1, 2, 3, 4)).save(tmp_path / "a.png")
    assert read_image(tmp_path / "g.png").shape == (4, 5, 3)
    assert read_image(tmp_path / "a.png")[0, 0].tolist() == [1, 2, 3]


def write_png16(path: Path, pixels: np.ndarray) -> None:
    """A 16-bit PNG (gray, RGB or RGBA by the channel count) from the spec: signature, IHDR, one zlib IDAT of
    unfiltered big-endian rows, IEND. PIL cannot write 48/64-bit PNGs."""
    h, w = pixels.shape[:2]
    colour = {1: 0, 3: 2, 4: 6}[1 if pixels.ndim == 2 else pixels.shape[2]]  # PNG colour type
    rows = b"".join(b"\x00" + row.astype(">u2").tobytes() for row in pixels)

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 16, colour, 0, 0, 0))
                     + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b""))


def test_read_image_scales_16_bit_and_refuses_float(tmp_path):
    values = np.array([[0, 1, 128, 129, 257, 32767], [32768, 40000, 65279, 65280, 65534, 65535]], np.uint16)
    gray8 = np.repeat(np.round(values / 257).astype(np.uint8)[..., None], 3, axis=2)
    Image.fromarray(values).save(tmp_path / "gray16.png")  # PIL's PNG encoder: 16-bit grayscale
    Image.frombytes("I;16B", (6, 2), values.astype(">u2").tobytes()).save(tmp_path / "gray16b.tif")
    Image.fromarray(values.astype(np.int32)).save(tmp_path / "gray32.tif")
    for name, mode in (("gray16.png", "I;16"), ("gray16b.tif", "I;16B"), ("gray32.tif", "I")):
        with Image.open(tmp_path / name) as im:
            assert im.mode == mode, name
        got = read_image(tmp_path / name)
        assert got.dtype == np.uint8 and np.array_equal(got, gray8), name  # not clipped to 255

    # 48/64-bit RGB(A): PIL keeps each value's high byte, within one level of round(x / 257).
    rgb = np.stack([values, values[::-1], 65535 - values], axis=-1)
    write_png16(tmp_path / "rgb48.png", rgb)
    write_png16(tmp_path / "rgba64.png", np.dstack([rgb, values]))
    for name in ("rgb48.png", "rgba64.png"):
        got = read_image(tmp_path / name)
        assert got.shape == (2, 6, 3) and np.abs(got.astype(int) - np.round(rgb / 257)).max() <= 1, name

    Image.fromarray(np.array([[0.25, 0.5]], np.float32)).save(tmp_path / "float.tif")
    with pytest.raises(DataError, match=r"float\.tif: floating-point image \(mode F\)"):
        read_image(tmp_path / "float.tif")
    Image.fromarray(np.array([[-1, 70000]], np.int32)).save(tmp_path / "wide.tif")
    with pytest.raises(DataError, match=r"wide\.tif: 32-bit integer image with values -1\.\.70000"):
        read_image(tmp_path / "wide.tif")


def test_to_input_is_bgr_minus_mean():
    rgb = np.array([[[10, 20, 30]]], np.uint8)
    x = to_input(rgb, (1.0, 2.0, 3.0))
    assert x[:, 0, 0].tolist() == [29.0, 18.0, 7.0]


def test_augment_pads_with_mean_and_ignore_then_crops():
    image = torch.ones(3, 10, 12)
    label = np.ones((10, 12), np.uint8)
    out_i, out_l = augment(image, label, Augment(16, (1.0,), False, 0), np.random.default_rng(0))
    assert out_i.shape == (3, 16, 16) and out_l.shape == (16, 16)
    assert (out_i[:, 10:, :] == 0).all() and (out_l[10:, :] == 255).all()
    assert (out_l[:10, :12] == 1).all()


def test_augment_scale_keeps_labels_nearest():
    label = np.zeros((20, 20), np.uint8)
    label[:, 10:] = 4
    _, out = augment(torch.zeros(3, 20, 20), label, Augment(10, (0.5,), False, 0), np.random.default_rng(1))
    assert set(np.unique(out).tolist()) == {0, 4}
    assert (out[:, :5] == 0).all() and (out[:, 5:] == 4).all()


def test_draw_sampler_replays_from_any_point():
    full = [x for _, x in zip(range(25), DrawSampler(7, seed=3), strict=False)]
    resumed = [x for _, x in zip(range(15), DrawSampler(7, seed=3, start=10), strict=False)]
    assert resumed == full[10:]
    assert sorted(i for i, _ in full[:7]) == list(range(7))  # each epoch is a permutation
    assert [d for _, d in full] == list(range(25))


def test_synthetic_is_deterministic_and_voc_layout(tmp_path):
    synthetic.generate(tmp_path / "a", 3, 2, 48, 40, 6, seed=5)
    synthetic.generate(tmp_path / "b", 3, 2, 48, 40, 6, seed=5)
    for rel in ["JPEGImages/train_00002.jpg", "SegmentationClass/val_00001.png"]:
        assert (tmp_path / "a" / rel).read_bytes() == (tmp_path / "b" / rel).read_bytes()
    items = voc_layout_items(tmp_path / "a", "train")
    assert [it.image_id for it in items] == ["train_00000", "train_00001", "train_00002"]
    lab = read_label(items[0].label)
    assert lab.shape == (48, 40)
    assert set(np.unique(lab).tolist()) <= set(range(6)) | {255}
    assert Image.open(items[0].label).mode == "P"


def test_synthetic_has_several_classes_and_real_edges(tmp_path):
    rng = np.random.default_rng([0, 0, 1])
    image, label = synthetic.make_sample(96, 96, 6, rng)
    assert len(set(np.unique(label).tolist()) - {0, 255}) >= 1
    # colour differs across the object boundary: the CRF has edges to follow
    inside, outside = image[(label > 0) & (label < 255)].mean(0), image[label == 0].mean(0)
    assert np.abs(inside - outside).max() > 15
    with pytest.raises(ValueError, match="dataset.n_classes"):
        synthetic.generate(tmp_path, 1, 1, 32, 32, 40, 0)


def test_prepare_lists_and_missing_file_named(tmp_path):
    synthetic.generate(tmp_path / "raw", 2, 1, 32, 32, 4, seed=0)
    from deeplab.config import DatasetConfig
    from deeplab.datasets import prepare

    counts = prepare(DatasetConfig(n_classes=4), tmp_path / "raw", tmp_path / "lists")
    assert counts == {"train": 2, "val": 1}
    ds = SegmentationDataset(tmp_path / "lists" / "train.txt", (104.0, 117.0, 123.0))
    image, label, image_id = ds[1]
    assert image.shape == (3, 32, 32) and label.dtype == torch.int64 and image_id == "train_00001"
    (tmp_path / "raw" / "JPEGImages" / "val_00000.jpg").unlink()
    with pytest.raises(DataError, match="val_00000.jpg"):
        prepare(DatasetConfig(n_classes=4), tmp_path / "raw", tmp_path / "lists")
    with pytest.raises(DataError, match="split list not found"):
        voc_layout_items(tmp_path / "raw", "test")


def test_an_id_listed_twice_is_named_for_every_dataset(tmp_path):
    """A split list holding an id twice (a hand-edited VOC-layout list) would have that image predicted into one
    file and scored twice; prepare names it and writes no list."""
    from deeplab.config import DatasetConfig
    from deeplab.datasets import prepare

    synthetic.generate(tmp_path / "raw", 2, 2, 32, 32, 4, seed=0)
    listing = tmp_path / "raw" / "ImageSets" / "Segmentation" / "val.txt"
    listing.write_text(listing.read_text() + "val_00000\n")
    with pytest.raises(DataError, match=r"synthetic split 'val': image id 'val_00000' is listed more than once"):
        prepare(DatasetConfig(n_classes=4), tmp_path / "raw", tmp_path / "lists")
    assert not (tmp_path / "lists").exists()


def test_prepare_leaves_what_a_run_from_scratch_makes(tmp_path):
    """prepare's output persists between DVC runs (dvc.yaml): what an earlier run left and this one did not
    write is removed (another split's list, its labels, a temporary file of a killed run); nothing else is."""
    from deeplab.config import DatasetConfig
    from deeplab.datasets import prepare

    synthetic.generate(tmp_path / "raw", 3, 2, 32, 32, 4, seed=0)
    cfg = DatasetConfig(n_classes=4)
    prepare(cfg, tmp_path / "raw", tmp_path / "fresh")
    out = tmp_path / "lists"
    stale = [out / "train_old.txt", out / "labels" / "train_old" / "x.png", out / ".val.txt.123.tmp"]
    for path in stale:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("left by an earlier run")
    prepare(cfg, tmp_path / "raw", out)

    def files(folder):
        return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))

    assert files(out) == files(tmp_path / "fresh") == ["classes.json", "train.txt", "val.txt"]
    assert (out / "val.txt").read_bytes() == (tmp_path / "fresh" / "val.txt").read_bytes()


def test_list_roundtrip_and_bad_list(tmp_path):
    items = [Item("a b", tmp_path / "x y.jpg", tmp_path / "l.png")]
    write_list(tmp_path / "l.txt", items)
    assert read_list(tmp_path / "l.txt") == items
    (tmp_path / "bad.txt").write_text("only\ttwo\n")
    with pytest.raises(DataError, match="bad.txt:1: expected 3"):
        read_list(tmp_path / "bad.txt")


def test_prepare_reports_every_bad_pair_at_once_and_writes_no_list(tmp_path):
    """Out-of-range label values, a size mismatch and an unreadable label, all in one error; no list written."""
    from PIL import Image

    from deeplab.config import DatasetConfig
    from deeplab.datasets import prepare

    synthetic.generate(tmp_path / "raw", 4, 2, 32, 32, 4, seed=0)
    labels = tmp_path / "raw" / "SegmentationClass"
    write_label(labels / "train_00000.png", np.full((32, 32), 7, np.uint8))  # 7 with n_classes 4
    write_label(labels / "train_00002.png", np.zeros((16, 32), np.uint8))
    (labels / "val_00001.png").write_bytes(b"not a png")
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(labels / "val_00000.png")  # RGB, not a label
    with pytest.raises(DataError) as err:
        prepare(DatasetConfig(n_classes=4), tmp_path / "raw", tmp_path / "lists")
    text = str(err.value)
    assert "train_00000.png: label values 7 (1024 pixels) are outside the allowed 0..3 (dataset.n_classes 4)" in text
    assert "train_00002.png: label size 32x16 differs from image size 32x32" in text
    assert "val_00001.png: cannot read label" in text and "val_00000.png: label must be a palette" in text
    assert not (tmp_path / "lists").exists()


def test_training_data_refuses_out_of_range_labels(tmp_path):
    synthetic.generate(tmp_path / "raw", 2, 1, 32, 32, 4, seed=0)
    write_list(tmp_path / "train.txt", voc_layout_items(tmp_path / "raw", "train"))
    write_label(tmp_path / "raw" / "SegmentationClass" / "train_00001.png", np.full((32, 32), 9, np.uint8))
    ds = SegmentationDataset(tmp_path / "train.txt", (0, 0, 0), n_classes=4)
    ds[0]
    with pytest.raises(DataError, match=r"train_00001\.png: label values 9"):
        ds[1]
