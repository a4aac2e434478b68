"""Pictures and tables of the evaluate stage and of ``deeplab predict``: valid, small PNGs and right numbers."""

from __future__ import annotations

import csv
import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from deeplab.data import PALETTE, Item, atomic_save, write_label, write_list
from deeplab.datasets import COCO_STUFF_CLASSES
from deeplab.viz import (
    examples_grid,
    legend,
    overlay,
    plot_class_iou,
    plot_examples,
    present_classes,
    top_confusions,
)

NAMES = ["background", "disc", "box", "triangle", "ring", "stripe-band"]


def png(path: Path) -> Image.Image:
    with Image.open(path) as im:
        im.verify()
    im = Image.open(path)
    im.load()
    assert im.format == "PNG"
    return im


def scene(h: int, w: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A noisy RGB image (the worst case for PNG size) and a blocky label map with an ignore border."""
    rng = np.random.default_rng(seed)
    rgb = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    label = np.zeros((h, w), np.uint8)
    label[h // 4:h // 2, w // 4:] = 1 + seed % 5
    label[h // 2:, : w // 3] = 3
    label[:2] = 255
    return rgb, label


def test_top_confusions_against_a_hand_made_matrix():
    hist = np.array([[50, 10, 0, 5],
                     [2, 30, 8, 0],
                     [0, 10, 20, 0],
                     [0, 0, 0, 0]])
    assert top_confusions(hist) == [
        (0, 1, 10, 10 / 65),
        (2, 1, 10, 10 / 30),  # tie with the first: ground-truth class order
        (1, 2, 8, 8 / 40),
        (0, 3, 5, 5 / 65),
        (1, 0, 2, 2 / 40),
    ]
    assert top_confusions(hist, k=2) == [(0, 1, 10, 10 / 65), (2, 1, 10, 10 / 30)]
    assert top_confusions(np.diag([3, 4])) == []


@pytest.mark.parametrize("names", [NAMES, list(COCO_STUFF_CLASSES)])
def test_class_iou_chart_is_a_small_png(tmp_path, names):
    rng = np.random.default_rng(0)
    iou = [None if i % 7 == 3 else float(rng.random()) for i in range(len(names))]
    path = tmp_path / "class_iou.png"
    plot_class_iou(iou, names, path, mean_iou=0.42)
    im = png(path)
    shown = sum(v is not None for v in iou)
    assert 300 <= im.width <= 1000 and 150 <= im.height <= 40 * shown + 400
    assert path.stat().st_size < 300_000
    plot_class_iou([None] * 3, NAMES[:3], path)  # nothing to show: still a picture
    png(path)


def test_examples_grid_is_a_small_png(tmp_path):
    rows = []
    for i in range(4):
        rgb, gt = scene(300, 400 + 50 * i, i)
        pred = np.where(gt == 255, 0, gt)
        rows.append((f"img{i}", [rgb, gt, pred, np.roll(pred, 5, axis=1)]))
    columns = ["image", "ground truth", "raw prediction", "CRF prediction"]
    path = tmp_path / "examples.png"
    plot_examples(rows, columns, NAMES, path)
    im = png(path)
    assert 4 * 100 < im.width < 1400 and 4 * 100 < im.height < 1400
    assert path.stat().st_size < 400_000

    grid = examples_grid(rows[:1], columns, NAMES, cell=64)
    assert grid.width < 4 * 100 + 100  # panels shrunk to the cell (titles may be wider), plus the id column
    small = examples_grid([("s", [np.zeros((20, 30, 3), np.uint8), np.ones((20, 30), np.uint8)])],
                          ["image", "ground truth"], NAMES)
    # Never enlarged: the label panel keeps its 30 x 20 pixels, and its colour.
    arr = np.asarray(small)
    assert (np.all(arr == PALETTE[1], axis=-1).sum(1) == 30).sum() == 20

    with pytest.raises(ValueError, match="panels"):
        examples_grid([("x", [rgb])], columns, NAMES)

    plot_examples([], columns, NAMES, path)  # evaluate.n_examples: 0 still writes the declared plot
    png(path)


def test_overlay_is_image_beside_blend_above_a_legend():
    rgb, label = scene(60, 80, 1)
    label[label == 255] = 0
    im = overlay(rgb, label, NAMES)
    arr = np.asarray(im)
    assert im.width >= 2 * 80 and im.height > 60
    assert np.array_equal(arr[:60, :80], rgb)
    right = arr[:60, 82:162].astype(int)  # after a 2-pixel gap
    expected = (rgb.astype(int) + PALETTE[label].astype(int)) / 2
    assert np.abs(right - expected).max() <= 1

    big = overlay(np.zeros((3000, 2000, 3), np.uint8), np.zeros((3000, 2000), np.uint8), NAMES, max_side=500)
    assert big.height < 600 and big.width < 1100


def test_legend_wraps_and_lists_the_entries_given():
    entries = present_classes(np.arange(6, dtype=np.uint8), NAMES)
    one_row, wrapped = legend(entries, 2000), legend(entries, 120)
    assert one_row.width == 2000 and wrapped.height > 2 * one_row.height
    arr = np.asarray(one_row)
    for i in range(1, 6):  # a swatch of each class colour
        assert np.all(arr == PALETTE[i], axis=-1).any()
    assert not np.all(arr == PALETTE[9], axis=-1).any()


# ---------------------------------------------------------------------------------------------------------
# The evaluate stage's artifacts, logged into a real MLflow store of the test's own


@pytest.fixture
def val_split(tmp_path: Path, monkeypatch) -> Path:
    """A prepared validation split of 3 images with raw and CRF predictions."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    items = []
    for i in range(3):
        rgb, gt = scene(40, 50, i)
        atomic_save(Image.fromarray(rgb), tmp_path / "raw" / f"im{i}.jpg")
        write_label(tmp_path / "raw" / f"im{i}.png", gt)
        pred = np.where(gt == 255, 0, gt)
        write_label(tmp_path / "predictions" / "raw" / f"im{i}.png", np.roll(pred, 3, axis=0))
        write_label(tmp_path / "predictions" / "crf" / f"im{i}.png", pred)
        items.append(Item(f"im{i}", tmp_path / "raw" / f"im{i}.jpg", tmp_path / "raw" / f"im{i}.png"))
    write_list(tmp_path / "prepared" / "val.txt", items)
    params = yaml.safe_load((Path(__file__).resolve().parents[1] / "params.yaml").read_text())
    params["evaluate"] = {"n_examples": 2}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    return tmp_path


def run_evaluate(root: Path, kind: str) -> Path:
    import stages.evaluate as ev

    ev.evaluate(kind, params=root / "params.yaml", lists=root / "prepared", predictions=root / "predictions",
                out=root / "metrics")
    return root / "metrics" / kind


@pytest.mark.parametrize("kind", ["raw", "crf"])
def test_evaluate_writes_all_artifacts(val_split, kind):
    dest = run_evaluate(val_split, kind)
    assert sorted(p.name for p in dest.iterdir()) == sorted(
        ["scores.json", "class_iou.csv", "confusion.csv", "confusion.png", "class_iou.png", "top_confusions.csv",
         "examples.png"])
    with open(dest / "top_confusions.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    hist = np.loadtxt(dest / "confusion.csv", delimiter=",", dtype=np.int64)
    assert rows == [{"ground_truth": NAMES[g], "predicted": NAMES[p], "pixels": str(n), "share_of_ground_truth":
                     f"{s:.6f}"} for g, p, n, s in top_confusions(hist)]
    assert (kind == "crf") == (not rows)  # the CRF "predictions" here are the ground truth itself
    png(dest / "class_iou.png")
    ex = png(dest / "examples.png")
    assert ex.width > 3 * 50 and all(p.stat().st_size < 400_000 for p in dest.glob("*.png"))
    from mlflow.tracking import MlflowClient

    client = MlflowClient()
    run = client.search_runs([client.get_experiment_by_name("deeplab").experiment_id],
                             f"tags.`deeplab.stage` = 'evaluate@{kind}'")[0]
    logged = {a.path for a in client.list_artifacts(run.info.run_id, f"metrics/{kind}")}
    assert f"metrics/{kind}/examples.png" in logged and f"metrics/{kind}/top_confusions.csv" in logged


def test_examples_columns_follow_the_kind(val_split):
    from stages.evaluate import shown_kinds

    preds = val_split / "predictions"
    assert shown_kinds("raw", preds) == ["raw"]  # never the later crf folder, even if it exists
    assert shown_kinds("crf", preds) == ["raw", "crf"]
    raw_width = png(run_evaluate(val_split, "raw") / "examples.png").width
    crf_width = png(run_evaluate(val_split, "crf") / "examples.png").width
    assert crf_width > raw_width  # one more column
    shutil.rmtree(preds / "raw")
    assert shown_kinds("crf", preds) == ["crf"]
    png(run_evaluate(val_split, "crf") / "examples.png")
