"""COCO 2017 with 21 classes (dataset coco21): a COCO-format fixture served from loopback through download,
prepare's mask rendering (exact pixels, the 1,000-pixel threshold, resume) and one short `dvc repro`."""

import json

import numpy as np
import pytest
from PIL import Image

import deeplab.datasets as datasets
from deeplab.config import DatasetConfig
from deeplab.data import VOC_CLASSES, DataError, read_label, read_list
from deeplab.datasets import DATASETS, class_names, prepare
from deeplab.download import fetch_dataset
from deeplab.predict import resolve_params
from tests.conftest import NO_TRACKING, make_project, sh, stages_run, tiny_params
from tests.official_layouts import ArchiveServer, coco21_fixture, md5

SPLITS = dict(train_split="train2017", val_split="val2017")


@pytest.fixture
def coco_root(tmp_path):
    files, expected = coco21_fixture()
    with ArchiveServer() as server:
        server.files.update(files)
        cfg = DatasetConfig(name="coco21", n_classes=21, base_url=server.url, **SPLITS,
                            checksums={f: {"md5": md5(data)} for f, data in files.items()})
        root = fetch_dataset(cfg, tmp_path / "raw", tmp_path / "downloads")
    return cfg, root, expected


def _check_prepared(out, expected, base=None):
    """The lists hold exactly the kept images, each with its expected mask (paths relative to ``base``, the
    project, when the stage wrote them)."""
    for split, masks in expected.items():
        items = read_list(out / f"{split}.txt")
        assert [it.image_id for it in items] == sorted(masks)  # the small and empty images are dropped
        for it in items:
            label = base / it.label if base else it.label
            assert label == out / "labels" / split / f"{it.image_id}.png"
            assert np.array_equal(read_label(label), masks[it.image_id]), (split, it.image_id)


def test_entry_and_config():
    ds = DATASETS["coco21"]
    assert [a.filename for a in ds.archives] == ["train2017.zip", "val2017.zip", "annotations_trainval2017.zip"]
    assert all(a.md5 or a.sha1 for a in ds.archives)  # every checksum is published
    assert ds.archives[:2] == DATASETS["cocostuff164k"].archives[:2]  # the images, described once
    assert datasets.COCO21_CATEGORIES[15] == 1 and len(datasets.COCO21_CATEGORIES) == 21  # person
    cfg = DatasetConfig(name="coco21", n_classes=21, **SPLITS)
    assert class_names(cfg) == list(VOC_CLASSES)
    assert resolve_params(dataset="coco21").dataset.n_classes == 21  # predict --dataset coco21
    with pytest.raises(ValueError, match=r"allowed: .*coco21"):
        DatasetConfig(name="coco", n_classes=21)


def test_download_and_prepare_render_exact_masks(coco_root, tmp_path):
    cfg, root, expected = coco_root
    assert (root / "images" / "train2017").is_dir() and (root / "annotations" / "instances_val2017.json").is_file()
    counts = prepare(cfg, root, tmp_path / "prepared", n_jobs=1)
    assert counts == {"train2017": 3, "val2017": 3}
    _check_prepared(tmp_path / "prepared", expected)


def test_prepare_resumes_and_never_counts_a_partial_mask(coco_root, tmp_path, monkeypatch):
    cfg, root, expected = coco_root
    out = tmp_path / "prepared"
    rendered = []
    real_mask, real_save = datasets.coco21_mask, Image.Image.save

    def counting(instances, h, w):
        rendered.append(len(instances))
        return real_mask(instances, h, w)

    def interrupted(im, fp, *args, **kwargs):  # the second PNG written is cut off midway
        if len(rendered) == 2:
            with open(fp, "wb") as f:
                f.write(b"\x89PNG\r\n\x1a\n partial")
            raise KeyboardInterrupt
        return real_save(im, fp, *args, **kwargs)

    monkeypatch.setattr(datasets, "coco21_mask", counting)
    monkeypatch.setattr(Image.Image, "save", interrupted)
    with pytest.raises(KeyboardInterrupt):
        prepare(cfg, root, out, n_jobs=1)
    train = out / "labels" / "train2017"
    # The cut-off mask is not there, under its name or a temporary one.
    assert sorted(p.name for p in train.iterdir()) == [".annotations.sha256", "000000000100.png"]
    monkeypatch.setattr(Image.Image, "save", real_save)
    rendered.clear()
    prepare(cfg, root, out, n_jobs=1)
    assert len(rendered) == 6 + 4 - 1  # every mask but the finished one
    _check_prepared(out, expected)
    # Once done, nothing is rendered again; a mask that was removed is rendered again.
    (train / "000000000101.png").unlink()
    rendered.clear()
    prepare(cfg, root, out, n_jobs=1)
    assert len(rendered) == 1
    _check_prepared(out, expected)
    # The resumed folder holds what a run from scratch makes, markers and annotation digests included.
    prepare(cfg, root, tmp_path / "fresh", n_jobs=1)
    assert sorted(str(p.relative_to(out)) for p in out.rglob("*")) == sorted(
        str(p.relative_to(tmp_path / "fresh")) for p in (tmp_path / "fresh").rglob("*"))
    # Changed annotations: every mask of that split is rendered again.
    instances = root / "annotations" / "instances_val2017.json"
    coco = json.loads(instances.read_text())
    coco["annotations"] = [a for a in coco["annotations"] if a["image_id"] != 201]
    instances.write_text(json.dumps(coco))
    rendered.clear()
    assert prepare(cfg, root, out, n_jobs=1) == {"train2017": 3, "val2017": 2}
    assert len(rendered) == 4 and not (out / "labels" / "val2017" / "000000000201.png").exists()


def test_prepare_renders_again_when_the_rendering_rule_changes(coco_root, tmp_path, monkeypatch):
    """The masks are kept between runs (persistent output) for the same annotations only if they were made by
    the same rule: a changed threshold (or class table, or rendering code; datasets.py is prepare's dependency,
    so DVC reruns it) must render them again, never reuse the masks and drop markers of the old rule."""
    cfg, root, _ = coco_root
    out = tmp_path / "prepared"
    before = prepare(cfg, root, out, n_jobs=1)
    monkeypatch.setattr(datasets, "COCO21_MIN_PIXELS", 0)  # every image with a labelled pixel is kept
    after = prepare(cfg, root, out, n_jobs=1)
    fresh = prepare(cfg, root, tmp_path / "fresh", n_jobs=1)
    assert after == fresh != before
    for split in SPLITS.values():
        assert (out / f"{split}.txt").read_text().replace(str(out), "") == (
            tmp_path / "fresh" / f"{split}.txt").read_text().replace(str(tmp_path / "fresh"), "")


def test_image_missing_from_the_annotations_is_named(coco_root, tmp_path):
    cfg, root, _ = coco_root
    (root / "images" / "val2017" / "000000000200.jpg").rename(root / "images" / "val2017" / "000000000999.jpg")
    with pytest.raises(DataError, match=r"instances_val2017.json: 1 images of split 'val2017' have no entry, "
                                        r"e.g. 000000000999.jpg"):
        prepare(cfg, root, tmp_path / "prepared", n_jobs=1)


def test_dvc_repro_to_metrics(tmp_path):
    files, expected = coco21_fixture()
    with ArchiveServer() as server:
        server.files.update(files)
        params = tiny_params()
        params["dataset"] = {
            **{k: v for k, v in params["dataset"].items() if k != "synthetic"},
            "name": "coco21", "n_classes": 21, **SPLITS, "base_url": server.url,
            "checksums": {f: {"md5": md5(data)} for f, data in files.items()}}
        params["train"].update(iterations=2, checkpoint_every=2, log_every=1)
        root = make_project(tmp_path / "repo", params)
        res = sh(root, "dvc", "repro", "evaluate@raw", env=NO_TRACKING)  # the CRF's way is the same for every dataset
    assert {"download", "prepare", "train", "evaluate@raw"} <= set(stages_run(res.stdout))
    _check_prepared(root / "data" / "prepared", expected, root)
    scores = json.loads((root / "metrics" / "raw" / "scores.json").read_text())
    assert 0 <= scores["mean_iou"] <= 1
    rows = (root / "metrics" / "raw" / "class_iou.csv").read_text().splitlines()
    assert len(rows) == 22 and rows[16].startswith("person,")
    assert len(list((root / "data" / "predictions" / "raw").glob("*.png"))) == 3
