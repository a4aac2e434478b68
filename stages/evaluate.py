import csv
import io
import logging
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated

import numpy as np
import typer

from deeplab.config import load_params
from deeplab.data import Item, read_image, read_label, read_list
from deeplab.datasets import class_names, colour_table
from deeplab.files import write_json, write_text
from deeplab.metrics import accumulate, scores
from deeplab.stage import command
from deeplab.tracking import stage_run
from deeplab.viz import plot_class_iou, plot_confusion, plot_examples, top_confusions

log = logging.getLogger("stages.evaluate")

# Prediction kinds in pipeline order; the examples grid of one kind shows it and the kinds before it.
KINDS = ("raw", "crf")
TITLES = {"raw": "raw prediction", "crf": "CRF prediction"}


def shown_kinds(kind: str, predictions: Path) -> list[str]:
    """``kind`` and, where their folders exist, the kinds before it (declared deps of this stage in dvc.yaml),
    never a later one: evaluate@raw must not depend on the crf stage."""
    before = KINDS[:KINDS.index(kind)]
    return [k for k in before if (predictions / k).is_dir()] + [kind]


def example_rows(items: Sequence[Item], predictions: Path, kinds: Sequence[str]) -> list[tuple[str, list[np.ndarray]]]:
    return [(it.image_id, [read_image(it.image), read_label(it.label),
                           *(read_label(predictions / k / f"{it.image_id}.png") for k in kinds)]) for it in items]


def metric_key(name: str) -> str:
    """A class name as MLflow accepts it in a metric name (a custom dataset's names may hold any character)."""
    return re.sub(r"[^\w.\- ]", "_", name)


def metric_keys(names: Sequence[str]) -> list[str]:
    """``metric_key`` of each name, with the class index appended where two names give the same key ('a/b'
    and 'a_b'): one metric per class, none overwriting another."""
    keys = [metric_key(n) for n in names]
    return [f"{k}_{i}" if keys.count(k) > 1 else k for i, k in enumerate(keys)]


def class_iou_csv(names: Sequence[str], class_iou: Sequence[float | None]) -> str:
    """``class,iou`` rows; a name holding a comma or quote (a custom dataset's) is quoted, CSV-style."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["class", "iou"])
    w.writerows([n, "" if v is None else f"{v:.6f}"] for n, v in zip(names, class_iou, strict=True))
    return buf.getvalue()


def confusions_csv(hist: np.ndarray, names: Sequence[str], k: int = 20) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["ground_truth", "predicted", "pixels", "share_of_ground_truth"])
    for gt, pred, pixels, share in top_confusions(hist, k):
        w.writerow([names[gt], names[pred], pixels, f"{share:.6f}"])
    return buf.getvalue()


def evaluate(kind: str = typer.Argument(..., help="which predictions: raw or crf"),
             params: Annotated[Path, typer.Option(help="Params file to read (dataset.*, evaluate.*, "
                                                       "crf.subset); must hold every section.")] = Path("params.yaml"),
             lists: Annotated[Path, typer.Option(help="The prepare stage's file lists (the validation split).")]
             = Path("data/prepared"),
             predictions: Annotated[Path, typer.Option(help="Folder holding the raw/ and crf/ label maps.")]
             = Path("data/predictions"),
             out: Annotated[Path, typer.Option(help="Metrics folder: results go to OUT/KIND.")]
             = Path("metrics")) -> None:
    """Scores of the raw or CRF predictions against the validation labels (the first crf.subset images when
    set), with per-class IoU and confusion-matrix plots, the most confused class pairs and a grid of example
    predictions."""
    if kind not in KINDS:
        raise ValueError(f"kind: expected 'raw' or 'crf', got {kind!r}")
    p = load_params(params)
    d = p.dataset
    with stage_run(f"evaluate@{kind}", p, params) as mlflow:
        items = read_list(lists / f"{d.val_split}.txt")[:p.crf.subset]  # the images the crf stage saw
        hist = accumulate(items, predictions / kind, d.n_classes, d.ignore_label)
        s = scores(hist)
        names = class_names(d)
        class_iou = s.pop("class_iou")
        dest = out / kind
        write_json(dest / "scores.json", s)
        write_text(dest / "class_iou.csv", class_iou_csv(names, class_iou))
        write_text(dest / "confusion.csv", "\n".join(",".join(map(str, r)) for r in hist.tolist()) + "\n")
        write_text(dest / "top_confusions.csv", confusions_csv(hist, names))
        plot_confusion(hist, names, dest / "confusion.png")
        plot_class_iou(class_iou, names, dest / "class_iou.png", s["mean_iou"])
        kinds = shown_kinds(kind, predictions)
        plot_examples(example_rows(items[:p.evaluate.n_examples], predictions, kinds),
                      ["image", "ground truth", *(TITLES[k] for k in kinds)], names, dest / "examples.png",
                      colours=colour_table(d))
        # On the pipeline's parent run too; with the image count scored (crf.subset past the split's size, as
        # the params record it, scores them all).
        mlflow.log_results({**{f"{kind}_{k}": v for k, v in s.items()}, f"{kind}_n_images": len(items)})
        mlflow.log_dataset_lists(d, lists)
        mlflow.log_metrics({f"{kind}_iou_{k}": v for k, v in zip(metric_keys(names), class_iou, strict=True)
                            if v is not None})
        mlflow.log_artifacts(str(dest), artifact_path=f"metrics/{kind}")
        log.info("%s: mean IoU %.4f, pixel accuracy %.4f -> %s", kind, s["mean_iou"], s["pixel_accuracy"], dest)


app = command(evaluate)
if __name__ == "__main__":
    app()
