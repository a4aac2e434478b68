import logging
from pathlib import Path

import typer

from deeplab.config import load_params
from deeplab.data import read_list
from deeplab.datasets import class_names
from deeplab.files import write_json, write_text
from deeplab.metrics import accumulate, scores
from deeplab.stage import command
from deeplab.tracking import stage_run
from deeplab.viz import plot_confusion

log = logging.getLogger("stages.evaluate")


def evaluate(kind: str = typer.Argument(..., help="which predictions: raw or crf"),
             params: Path = Path("params.yaml"), lists: Path = Path("data/prepared"),
             predictions: Path = Path("data/predictions"), out: Path = Path("metrics")) -> None:
    """Scores of the raw or CRF predictions against the validation labels, with per-class IoU and
    confusion-matrix plots."""
    if kind not in ("raw", "crf"):
        raise ValueError(f"kind: expected 'raw' or 'crf', got {kind!r}")
    p = load_params(params)
    d = p.dataset
    with stage_run(f"evaluate@{kind}", p) as mlflow:
        hist = accumulate(read_list(lists / f"{d.val_split}.txt"), predictions / kind, d.n_classes)
        s = scores(hist)
        names = class_names(d.name, d.n_classes)
        class_iou = s.pop("class_iou")
        dest = out / kind
        write_json(dest / "scores.json", s)
        write_text(dest / "class_iou.csv", "class,iou\n" + "".join(
            f"{n},{'' if v is None else f'{v:.6f}'}\n" for n, v in zip(names, class_iou, strict=True)))
        write_text(dest / "confusion.csv", "\n".join(",".join(map(str, r)) for r in hist.tolist()) + "\n")
        plot_confusion(hist, names, dest / "confusion.png")
        mlflow.log_metrics({f"{kind}_{k}": v for k, v in s.items()})
        mlflow.log_metrics({f"{kind}_iou_{n}": v for n, v in zip(names, class_iou, strict=True) if v is not None})
        mlflow.log_artifacts(str(dest), artifact_path=f"metrics/{kind}")
        log.info("%s: mean IoU %.4f, pixel accuracy %.4f -> %s", kind, s["mean_iou"], s["pixel_accuracy"], dest)


app = command(evaluate)
if __name__ == "__main__":
    app()
