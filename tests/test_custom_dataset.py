"""dataset.name custom: the user's own files in layouts built here, through a real `dvc repro`, and the
checks that name bad files, values and params."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from pydantic import ValidationError

from deeplab.config import DatasetConfig, ParamsError, load_params
from deeplab.data import PALETTE, DataError, read_label, read_list
from deeplab.datasets import class_names, prepare, split_items
from tests.conftest import ALL_STAGES, make_project, sh, stages_run, tiny_params

H, W = 40, 48
# Per class: the colour its pixels have in the images, so a few iterations learn something.
COLOURS = [(30, 30, 30), (220, 40, 40), (40, 200, 60)]


def _pair(rng: np.random.Generator, classes: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """An RGB image and its label map (values from ``classes``, first one the background): a few rectangles."""
    label = np.full((H, W), classes[0], np.uint8)
    for c in classes[1:]:
        y, x = int(rng.integers(0, H // 2)), int(rng.integers(0, W // 2))
        label[y:y + H // 2, x:x + W // 2] = c
    colour = np.array([COLOURS[v % len(COLOURS)] for v in range(256)], np.uint8)
    image = np.clip(colour[label].astype(int) + rng.integers(-20, 20, (H, W, 3)), 0, 255).astype(np.uint8)
    return image, label


def _save_label(path: Path, label: np.ndarray, palette: bool) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    im = Image.fromarray(label, mode="P" if palette else "L")
    if palette:
        im.putpalette(PALETTE.tobytes())
    im.save(path)


def _save_image(path: Path, image: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(image).save(path)


def voc_style(root: Path) -> dict:
    """JPEGImages/{id}.jpg, palette PNGs in SegmentationClass/, ImageSets/Segmentation/{split}.txt lists."""
    rng = np.random.default_rng(0)
    for split, n in (("train", 5), ("val", 3)):
        ids = [f"{split}_{i:03d}" for i in range(n)]
        for i in ids:
            image, label = _pair(rng, [0, 1, 2])
            _save_image(root / "JPEGImages" / f"{i}.jpg", image)
            _save_label(root / "SegmentationClass" / f"{i}.png", label, palette=True)
        (root / "ImageSets" / "Segmentation").mkdir(parents=True, exist_ok=True)
        (root / "ImageSets" / "Segmentation" / f"{split}.txt").write_text("".join(f"{i}\n" for i in ids))
    (root / "JPEGImages" / "unlisted.jpg").write_bytes(b"not listed, never read")
    return {"n_classes": 3, "train_split": "train", "val_split": "val",
            "custom": {"images": "JPEGImages/{id}.jpg", "labels": "SegmentationClass/{id}.png",
                       "split_list": "ImageSets/Segmentation/{split}.txt",
                       "classes": ["background", "red thing", "green thing"],
                       "colours": [[0, 0, 0], [200, 0, 0], [0, 200, 0]]}}


def mmseg_style(root: Path) -> dict:
    """img_dir/{split}/{id}.jpg and grayscale ann_dir/{split}/{id}.png where 0 is unlabelled
    (reduce_zero_label), the class names in a text file under the root; no split lists."""
    rng = np.random.default_rng(1)
    for split, n in (("train", 5), ("val", 3)):
        for k in range(n):
            image, label = _pair(rng, [1, 2, 3, 0])  # file values: 1..3 the classes, 0 unlabelled
            _save_image(root / "img_dir" / split / f"{k:04d}.jpg", image)
            _save_label(root / "ann_dir" / split / f"{k:04d}.png", label, palette=False)
    (root / "classes.txt").write_text("road\nsky (clear)\ntree\n")
    return {"n_classes": 3, "train_split": "train", "val_split": "val",
            "custom": {"images": "img_dir/{split}/{id}.jpg", "labels": "ann_dir/{split}/{id}.png",
                       "classes": "classes.txt", "reduce_zero_label": True}}


def camvid_style(root: Path) -> dict:
    """{split}/{id}.png images and {split}annot/{id}.png grayscale labels whose void value 3 is remapped to
    the ignore label; evaluated on the test split."""
    rng = np.random.default_rng(2)
    for split, n in (("train", 5), ("test", 3)):
        for k in range(n):
            image, label = _pair(rng, [0, 1, 2, 3])
            _save_image(root / split / f"0001TP_{k:06d}.png", image)
            _save_label(root / f"{split}annot" / f"0001TP_{k:06d}.png", label, palette=False)
    return {"n_classes": 3, "train_split": "train", "val_split": "test",
            "custom": {"images": "{split}/{id}.png", "labels": "{split}annot/{id}.png",
                       "classes": ["sky", "building", "road"], "label_map": {3: 255}}}


LAYOUTS = {"voc": (voc_style, ["background", "red thing", "green thing"]),
           "mmseg": (mmseg_style, ["road", "sky (clear)", "tree"]),
           "camvid": (camvid_style, ["sky", "building", "road"])}


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_custom_dataset_through_dvc_repro(tmp_path, layout):
    build, names = LAYOUTS[layout]
    data = tmp_path / "my-data"  # outside the repository
    dataset = build(data)
    params = tiny_params()
    params["dataset"] = {**{k: v for k, v in params["dataset"].items() if k != "synthetic"},
                         "name": "custom", "root": str(data), **dataset}
    params["train"]["iterations"] = 4
    params["crf"]["iterations"] = 2
    params["evaluate"]["n_examples"] = 2
    root = make_project(tmp_path / "repo", params)
    res = sh(root, "dvc", "repro")
    assert set(stages_run(res.stdout)) == ALL_STAGES
    val = dataset["val_split"]
    items = read_list(root / "data" / "prepared" / f"{val}.txt")
    assert len(items) == 3 and len(read_list(root / "data" / "prepared" / "train.txt")) == 5
    labels = [root / it.label for it in items]  # relative: under the project; absolute: the user's own
    for label in labels:  # every label the later stages read holds classes and ignore only
        assert set(np.unique(read_label(label)).tolist()) <= {0, 1, 2, 255}
    if layout == "voc":
        assert all(label.is_relative_to(data) for label in labels)  # used as they are: nothing to remap
    else:  # remapped copies: CamVid's void value 3 and mmseg's unlabelled 0 became ignore
        assert all(label.parent == root / "data" / "prepared" / "labels" / val for label in labels)
        source = {"camvid": data / "testannot", "mmseg": data / "ann_dir" / "val"}[layout] / labels[0].name
        void = 3 if layout == "camvid" else 0
        assert np.array_equal(read_label(labels[0]) == 255, read_label(source) == void)
    for kind in ("raw", "crf"):
        scores = json.loads((root / "metrics" / kind / "scores.json").read_text())
        assert 0 <= scores["mean_iou"] <= 1
        rows = (root / "metrics" / kind / "class_iou.csv").read_text().splitlines()
        assert [r.rsplit(",", 1)[0] for r in rows[1:]] == names
        assert len(list((root / "data" / "predictions" / kind).glob("*.png"))) == 3
    # The weights carry the names: hub's model.meta and predict's legends read them.
    meta = torch.load(root / "data" / "models" / "final.pt", weights_only=True)["deeplab"]
    assert meta["class_names"] == names and meta["dataset"] == "custom"
    if layout == "voc":  # its own colours, in the metadata and in predict's label maps and legends
        from deeplab.predict import predict_images

        assert meta["colours"] == [[0, 0, 0], [200, 0, 0], [0, 200, 0]]
        lines: list[str] = []
        image = data / "JPEGImages" / "val_000.jpg"
        assert predict_images([image], root / "data" / "models" / "final.pt", tmp_path / "pred", device="cpu",
                              echo=lines.append) == 0
        assert Image.open(tmp_path / "pred" / "val_000_label.png").getpalette()[:9] == [0, 0, 0, 200, 0, 0, 0, 200, 0]
        shown = lines[0].rsplit("(", 1)[1].rstrip(")").split(", ")
        assert shown and set(shown) <= set(names)
    else:
        assert "colours" not in meta
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{root / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("deeplab").experiment_id],
                              "tags.`deeplab.stage` = 'evaluate@raw'")
    logged = {k for k in runs[0].data.metrics if k.startswith("raw_iou_")}
    assert logged and logged <= {f"raw_iou_{n.replace('(', '_').replace(')', '_')}" for n in names}
    if layout == "mmseg":
        # The class file corrected (its names were in the wrong order): it changes no list, yet the per-class
        # table and the weights' metadata must follow (they kept the old names after a rerun of prepare alone).
        fixed = ["tree", "road", "sky (clear)"]
        (data / "classes.txt").write_text("".join(f"{n}\n" for n in fixed))
        assert {"prepare", "train", "evaluate@raw", "evaluate@crf"} <= set(stages_run(sh(root, "dvc", "repro").stdout))
        for kind in ("raw", "crf"):
            rows = (root / "metrics" / kind / "class_iou.csv").read_text().splitlines()
            assert [r.rsplit(",", 1)[0] for r in rows[1:]] == fixed
        assert torch.load(root / "data" / "models" / "final.pt", weights_only=True)["deeplab"]["class_names"] == fixed


def _custom(root: Path, **custom: object) -> DatasetConfig:
    spec = {"images": "{split}/{id}.png", "labels": "{split}annot/{id}.png", "classes": ["a", "b", "c"], **custom}
    return DatasetConfig(name="custom", root=str(root), n_classes=3, custom=spec)


def test_prepare_names_every_bad_file_value_and_size_at_once(tmp_path):
    data = tmp_path / "data"
    camvid_style(data)
    labels = data / "trainannot"
    _save_label(labels / "0001TP_000000.png", np.full((H, W), 7, np.uint8), palette=False)  # 7 with 3 classes
    _save_label(labels / "0001TP_000001.png", np.zeros((H // 2, W), np.uint8), palette=False)
    (labels / "0001TP_000002.png").unlink()
    (data / "testannot" / "0001TP_000001.png").unlink()
    (data / "test" / "0001TP_000002.png").write_bytes(b"not an image")
    cfg = _custom(data, label_map={3: 255})
    cfg = cfg.model_copy(update={"val_split": "test"})
    with pytest.raises(DataError) as err:
        prepare(cfg, data, tmp_path / "out")
    text = str(err.value)
    assert "5 of 8 image/label pairs are bad" in text
    assert (f"{labels / '0001TP_000000.png'}: label values 7 (1920 pixels) are outside the allowed 0..2 "
            "(dataset.n_classes 3) and 255 (dataset.ignore_label) after dataset.custom's label_map") in text
    assert f"{labels / '0001TP_000001.png'}: label size 48x20 differs from image size 48x40" in text
    assert f"{labels / '0001TP_000002.png'}: label file not found" in text
    assert f"{data / 'testannot' / '0001TP_000001.png'}: label file not found" in text
    assert f"{data / 'test' / '0001TP_000002.png'}: cannot read image" in text
    assert not (tmp_path / "out").exists()
    # Without the label_map the void value 3 is itself out of range, in every file that has it.
    with pytest.raises(DataError, match=r"testannot/0001TP_000000\.png: label values 3 \(\d+ pixels\) are outside"):
        prepare(_custom(data).model_copy(update={"val_split": "test", "train_split": "test"}), data,
                tmp_path / "out")


def test_split_lists_one_id_or_two_columns(tmp_path):
    data = tmp_path / "data"
    voc_style(data)
    (data / "lists").mkdir()
    (data / "lists" / "val.txt").write_text("/JPEGImages/val_000.jpg /SegmentationClass/val_000.png\n\n"
                                            "JPEGImages/val_002.jpg SegmentationClass/val_002.png\n")
    cfg = DatasetConfig(name="custom", root=str(data), n_classes=3,
                        custom={"split_list": "lists/{split}.txt", "classes": ["a", "b", "c"]})
    items = split_items(cfg, data, "val")
    assert [(it.image_id, it.image, it.label) for it in items] == [
        (i, data / "JPEGImages" / f"{i}.jpg", data / "SegmentationClass" / f"{i}.png") for i in ("val_000", "val_002")]
    (data / "lists" / "train.txt").write_text("".join(f"JPEGImages/{i}.jpg SegmentationClass/{i}.png\n" for i in (
        data / "ImageSets" / "Segmentation" / "train.txt").read_text().split()))
    (data / "JPEGImages" / "val_002.jpg").unlink()  # listed, so missing: named by prepare's check
    with pytest.raises(DataError, match=r"1 of 7 image/label pairs are bad:\n  .*val_002\.jpg: image file not found"):
        prepare(cfg, data, tmp_path / "out")
    (data / "lists" / "train.txt").unlink()
    (data / "lists" / "val.txt").write_text("val_000\n")
    with pytest.raises(DataError, match=r"val\.txt:1: expected '<image> <label>' \(one id per line needs"):
        split_items(cfg, data, "val")
    with pytest.raises(DataError, match=r"train\.txt: split list of split 'train' not found"):
        split_items(cfg, data, "train")
    (data / "lists" / "val.txt").write_text("a b c\n")
    with pytest.raises(DataError, match=r"val\.txt:1: expected '<image> <label>'.*got 3 columns"):
        split_items(cfg, data, "val")


def test_labels_beside_the_images_are_no_images_of_their_own(tmp_path):
    """CamVid's own layout, {id}.png beside its {id}_L.png label: the images pattern matched the labels too, and
    each label became an id whose label ({id}_L_L.png) was missing. An image whose name only looks like a
    label (no image of that id) stays."""
    data = tmp_path / "data"
    camvid_style(data)
    for label in (data / "trainannot").iterdir():
        label.rename(data / "train" / f"{label.stem}_L.png")
    (data / "train" / "lonely_L.png").write_bytes((data / "train" / "0001TP_000000.png").read_bytes())
    cfg = _custom(data, labels="{split}/{id}_L.png")
    assert [it.image_id for it in split_items(cfg, data, "train")] == [
        *(f"0001TP_{k:06d}" for k in range(5)), "lonely_L"]
    assert split_items(cfg, data, "train")[0].label == data / "train" / "0001TP_000000_L.png"


def test_split_list_ids_may_hold_spaces(tmp_path):
    """One id per line: an id with a space ('IMG 0001', as the glob finds it) was read as '<image> <label>'
    paths 'IMG' and '0001', neither found; it is the id when its image exists, else the line is a pair."""
    data = tmp_path / "data"
    voc_style(data)
    for kind, ext in (("JPEGImages", "jpg"), ("SegmentationClass", "png")):
        (data / kind / f"val_000.{ext}").rename(data / kind / f"val 000.{ext}")
    (data / "val.txt").write_text("val 000\nval_001\nJPEGImages/val_002.jpg SegmentationClass/val_002.png\n")
    cfg = DatasetConfig(name="custom", root=str(data), n_classes=3, custom={
        "images": "JPEGImages/{id}.jpg", "labels": "SegmentationClass/{id}.png", "split_list": "{split}.txt",
        "classes": ["a", "b", "c"]})
    assert [(it.image_id, it.image, it.label) for it in split_items(cfg, data, "val")] == [
        (i, data / "JPEGImages" / f"{i}.jpg", data / "SegmentationClass" / f"{i}.png")
        for i in ("val 000", "val_001", "val_002")]


def test_ids_stay_inside_the_folders_they_name_files_in(tmp_path):
    """A split list's ids name data/logits/<id>.npy, the predictions and remapped labels: a subfolder is fine,
    an id with '..' (its image found through it) or starting with '/' would write outside them, untracked."""
    data = tmp_path / "data"
    voc_style(data)
    (data / "JPEGImages" / "sub").mkdir()
    (data / "SegmentationClass" / "sub").mkdir()
    for kind, ext in (("JPEGImages", "jpg"), ("SegmentationClass", "png")):
        (data / kind / f"val_000.{ext}").rename(data / kind / "sub" / f"val_000.{ext}")
    custom = {"images": "JPEGImages/{id}.jpg", "labels": "SegmentationClass/{id}.png", "split_list": "{split}.txt",
              "classes": ["a", "b", "c"], "label_map": {1: 1}}
    cfg = DatasetConfig(name="custom", root=str(data), n_classes=3, custom=custom)
    (data / "val.txt").write_text("sub/val_000\nval_001\n")
    out = tmp_path / "out"
    prepare(cfg.model_copy(update={"train_split": "val"}), data, out)
    assert (out / "labels" / "val" / "sub" / "val_000.png").is_file()
    for bad in ("sub/../val_001", "/sub/val_000", "sub//val_000", "./val_001"):
        (data / "val.txt").write_text(f"val_001\n{bad}\n")
        with pytest.raises(DataError, match=rf"custom split 'val': image id {re.escape(repr(bad))} is not a relative "
                                            r"path inside its folder \(1 such ids\)"):
            split_items(cfg, data, "val")


def test_image_files_in_another_case_are_named_not_left_out(tmp_path):
    """Without a split list the ids are the files matching dataset.custom.images: IMG.PNG files beside .png
    ones were left out of the split silently (2 of 5 training images gone); a leading '/' is under the root
    for the glob too (it raised pathlib's 'Non-relative patterns are unsupported')."""
    data = tmp_path / "data"
    camvid_style(data)
    for k in (1, 3):
        (data / "train" / f"0001TP_{k:06d}.png").rename(data / "train" / f"0001TP_{k:06d}.PNG")
    for images in ("{split}/{id}.png", "/{split}/{id}.png"):
        with pytest.raises(DataError, match=rf"train/0001TP_000001\.PNG: matches dataset.custom.images "
                                            rf"'{re.escape(images)}' of split 'train' but for the case of letters "
                                            r"\(2 such files, which would be left out\)"):
            split_items(_custom(data, images=images), data, "train")
    assert len(split_items(_custom(data, images="/{split}/{id}.png"), data, "test")) == 3


def test_binary_masks_of_0_and_255_are_refused_not_scored_perfect(tmp_path):
    """Two classes, masks saved as 0/255 (the common binary format): 255 is the ignore label, so every
    foreground pixel was ignored, training saw background alone and evaluate gave mean IoU 1.0. prepare now
    stops naming the cause and the label_map that fixes it, which then prepares."""
    data = tmp_path / "data"
    camvid_style(data)
    for label in (*(data / "trainannot").iterdir(), *(data / "testannot").iterdir()):
        _save_label(label, np.where(read_label(label) == 1, 255, 0).astype(np.uint8), palette=False)
    spec = {"images": "{split}/{id}.png", "labels": "{split}annot/{id}.png", "classes": ["background", "object"]}
    cfg = DatasetConfig(name="custom", root=str(data), n_classes=2, val_split="test", custom=spec)
    with pytest.raises(DataError) as err:
        prepare(cfg, data, tmp_path / "out")
    assert str(err.value) == (
        "custom split 'train': the labels hold only class 0 (background) of dataset.n_classes 2, nothing to learn "
        "the others from: file value(s) 255 give dataset.ignore_label 255, which is ignored (binary masks saved as "
        "0/255? dataset.custom.label_map {255: 1} makes 255 class 1)")
    assert not (tmp_path / "out").exists()
    fixed = DatasetConfig(name="custom", root=str(data), n_classes=2, val_split="test",
                          custom={**spec, "label_map": {255: 1}})
    assert prepare(fixed, data, tmp_path / "out") == {"train": 5, "test": 3}


def test_reduce_zero_label_never_shifts_a_value_onto_the_ignore_label(tmp_path):
    """With dataset.ignore_label 10, file value 11 shifts to class index 10: no class (n_classes 3), so it is
    named like file value 12 is, not silently ignored; label_map can still send it to the ignore label."""
    from deeplab.data import label_values_error
    from deeplab.datasets import label_lut

    custom = {"images": "{split}/{id}.jpg", "labels": "{split}/{id}.png", "classes": ["a", "b", "c"],
              "reduce_zero_label": True}
    cfg = DatasetConfig(name="custom", root=str(tmp_path), n_classes=3, ignore_label=10, custom=custom)
    label = np.array([[0, 1, 2, 3], [11, 11, 255, 1]], np.uint8)
    assert label_values_error(label, 3, 10, label_lut(cfg)) == (
        "label values 11 (2 pixels) are outside the allowed 0..2 (dataset.n_classes 3) and 10 "
        "(dataset.ignore_label) after dataset.custom's label_map / reduce_zero_label (they map to class 10, not "
        "the ignore label)")
    mapped = DatasetConfig(name="custom", root=str(tmp_path), n_classes=3, ignore_label=10,
                           custom={**custom, "label_map": {11: 10}})
    lut = label_lut(mapped)
    assert label_values_error(label, 3, 10, lut) is None
    assert lut[label].tolist() == [[10, 0, 1, 2], [10, 10, 10, 0]]
    # The usual ignore label 255: nothing shifts onto it, values 1..254 become 0..253.
    lut = label_lut(DatasetConfig(name="custom", root=str(tmp_path), n_classes=3, custom=custom))
    assert lut[[0, 1, 3, 254, 255]].tolist() == [255, 0, 2, 253, 255]


def test_classes_file_must_fit_n_classes(tmp_path):
    data = tmp_path / "data"
    camvid_style(data)
    (data / "names.txt").write_text("sky\nroad\n")
    cfg = _custom(data, classes="names.txt")
    with pytest.raises(DataError, match=r"names\.txt: 2 class names \(dataset.custom.classes\), but "
                                        r"dataset.n_classes is 3"):
        class_names(cfg)
    (data / "names.txt").write_text("sky\n\nroad\nbuilding\n")
    assert class_names(cfg) == ["sky", "road", "building"]
    with pytest.raises(DataError, match=r"nope\.txt: cannot read dataset.custom.classes"):
        class_names(_custom(data, classes="nope.txt"))
    with pytest.raises(DataError, match=r"no files match dataset.custom.images '\{split\}/\{id\}.jpg'"):
        split_items(_custom(data, images="{split}/{id}.jpg"), data, "train")


def test_class_file_and_split_list_from_a_windows_editor(tmp_path):
    """UTF-8 with a byte-order mark and CRLF line ends (Notepad): the mark is no part of the first class name or
    id; a file in another encoding is named, not a codec traceback."""
    data = tmp_path / "data"
    voc_style(data)
    ids = (data / "ImageSets" / "Segmentation" / "val.txt").read_text().split()
    (data / "names.txt").write_bytes("\ufeffsky\r\nroad\r\n\r\ncaf\u00e9\r\n".encode())
    (data / "val.txt").write_bytes(("\ufeff" + "".join(f"{i}\r\n" for i in ids)).encode())
    cfg = DatasetConfig(name="custom", root=str(data), n_classes=3, custom={
        "images": "JPEGImages/{id}.jpg", "labels": "SegmentationClass/{id}.png", "split_list": "{split}.txt",
        "classes": "names.txt"})
    assert class_names(cfg) == ["sky", "road", "caf\u00e9"]
    assert [it.image_id for it in split_items(cfg, data, "val")] == ids
    (data / "names.txt").write_bytes("sky\nroad\ncaf\u00e9\n".encode("latin-1"))
    with pytest.raises(DataError, match=r"names\.txt: dataset.custom.classes is not UTF-8 text \(byte 12: "):
        class_names(cfg)
    (data / "val.txt").write_bytes("\u00e9t\u00e9\n".encode("latin-1"))
    with pytest.raises(DataError, match=r"val\.txt: the split list is not UTF-8 text \(byte 0: "):
        split_items(cfg, data, "val")


def test_class_names_must_be_distinct_and_not_empty(tmp_path):
    """Per-class IoU, its plots and the MLflow metrics raw_iou_<name> are keyed by name: a name given twice
    made one class's IoU overwrite the other's, silently. Refused in a class file (by line count kept: blank
    lines are skipped) as in the params' list."""
    data = tmp_path / "data"
    camvid_style(data)
    (data / "names.txt").write_text("sky\nroad\nsky\n")
    with pytest.raises(DataError, match=r"names\.txt: 'sky' names classes 0 and 2: each class needs its own name "
                                        r"\(dataset.custom.classes"):
        class_names(_custom(data, classes="names.txt"))
    for classes, problem in ((["a", "b", "a"], "'a' names classes 0 and 2"), (["a", " ", "c"], "class 1 has an "
                                                                                                 "empty name")):
        with pytest.raises(ValidationError, match=f"dataset.custom.classes: {problem}"):
            _custom(data, classes=classes)


def _write(tmp_path: Path, dataset: dict) -> Path:
    p = tiny_params()
    p["dataset"].update(dataset)
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(p))
    return path


@pytest.mark.parametrize(("dataset", "message"), [
    ({"name": "custom", "root": "/d", "custom": {"image": "{split}/{id}.jpg"}},
     "dataset.custom.image: unknown key; did you mean dataset.custom.images? (allowed dataset.custom keys: images, "
     "labels, split_list, classes, colours, reduce_zero_label, label_map)"),
    ({"name": "coco"}, "dataset.name: unknown dataset 'coco' (allowed: synthetic, voc12, cocostuff10k, "
                       "cocostuff164k, coco21, custom)"),
    ({"name": "custom"}, "dataset.name custom needs dataset.root (the dataset folder) and a dataset.custom"),
    ({"name": "custom", "root": "/d", "n_classes": 3, "custom": {"images": "{id}.jpg", "labels": "{id}.png",
                                                                  "classes": ["a", "b", "c"]}},
     "dataset.custom.images: '{id}.jpg': without a split_list the ids are the files that match it, so it needs "
     "{split} and exactly one {id}"),
    ({"name": "custom", "root": "/d", "custom": {"images": "{split}/{name}.jpg", "labels": "{id}.png",
                                                 "classes": ["a"]}},
     "dataset.custom.images: unknown placeholder {name} in '{split}/{name}.jpg' (allowed: {split}, {id})"),
    ({"name": "custom", "root": "/d", "n_classes": 3, "custom": {"images": "{split}/{id}.jpg",
                                                                  "labels": "{id}.png", "classes": ["a", "b"]}},
     "dataset.custom.classes: 2 names, but dataset.n_classes is 3: they must be equal"),
    ({"name": "custom", "root": "/d", "n_classes": 3, "custom": {"images": "{split}/{id}.jpg",
                                                                  "labels": "{id}.png", "classes": ["a", "b", "c"],
                                                                  "label_map": {11: 40}}},
     "dataset.custom.label_map: 11: 40 is neither a class index (0..2, dataset.n_classes 3) nor "
     "dataset.ignore_label (255)"),
    ({"name": "custom", "root": "/d", "n_classes": 3, "custom": {"images": "{split}/{id}.jpg",
                                                                  "labels": "{id}.png", "classes": ["a", "b", "c"],
                                                                  "colours": [[0, 0, 0]]}},
     "dataset.custom.colours: 1 colours, but dataset.n_classes is 3"),
])
def test_custom_params_errors_name_the_key_and_allowed_values(tmp_path, dataset, message):
    with pytest.raises(ParamsError) as err:
        load_params(_write(tmp_path, dataset))
    assert message in str(err.value)


def test_class_names_with_commas_stay_one_csv_column():
    import csv

    from stages.evaluate import class_iou_csv, metric_key

    text = class_iou_csv(["background", 'car, "parked"', "sky (clear)"], [0.5, None, 0.25])
    assert list(csv.reader(text.splitlines())) == [["class", "iou"], ["background", "0.500000"],
                                                   ['car, "parked"', ""], ["sky (clear)", "0.250000"]]
    assert metric_key('car, "parked"') == "car_ _parked_" and metric_key("road-2.a b") == "road-2.a b"


def test_names_that_give_one_metric_key_keep_a_metric_each():
    from stages.evaluate import metric_keys

    assert metric_keys(["a/b", "sky", "a_b", "a?b"]) == ["a_b_0", "sky", "a_b_2", "a_b_3"]
    assert metric_keys(["road", "sky (clear)"]) == ["road", "sky _clear_"]


def test_list_digests_are_the_listed_files_md5_remapped_labels_included(tmp_path):
    """The md5 columns are what DVC would compute for the very files the list names: for a remapped custom
    dataset the written label, not the source one (the stages after prepare rerun on them)."""
    import csv

    from deeplab.files import file_hash

    data = tmp_path / "data"
    camvid_style(data)
    plain = DatasetConfig(name="custom", root=str(data), n_classes=4, val_split="test",
                          custom={"images": "{split}/{id}.png", "labels": "{split}annot/{id}.png",
                                  "classes": ["a", "b", "c", "void"]})
    remapped = _custom(data, label_map={3: 255}).model_copy(update={"val_split": "test"})
    for cfg, custom, out in ((plain, False, tmp_path / "plain"), (remapped, True, tmp_path / "remapped")):
        prepare(cfg, data, out)
        rows = list(csv.reader((out / "train.txt").open(), delimiter="\t"))
        assert rows and all(len(r) == 5 for r in rows)
        for _, image, label, image_md5, label_md5 in rows:
            assert (image_md5, label_md5) == (file_hash(image), file_hash(label))
            assert Path(label).is_relative_to(out) == bool(custom)
