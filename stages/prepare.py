import logging
from pathlib import Path
from typing import Annotated

import typer

from deeplab import datasets
from deeplab.config import load_params
from deeplab.stage import command
from deeplab.tracking import repo_root, stage_run

log = logging.getLogger(__name__)


def prepare(params: Annotated[Path, typer.Option(help="Params file to read (dataset.*); must hold every section.")]
            = Path("params.yaml"),
            raw: Annotated[Path, typer.Option(help="The download stage's folder (unless dataset.root names one).")]
            = Path("data/raw"),
            out: Annotated[Path, typer.Option(help="Folder for the <split>.txt file lists (and warped images).")]
            = Path("data/prepared")) -> None:
    """Write the train and validation file lists (and any pre-processing the dataset needs) into OUT."""
    p = load_params(params)
    d = p.dataset
    with stage_run("prepare", p, params) as mlflow:
        root = Path(d.root) if d.root else raw
        counts = datasets.prepare(d, root, out)
        n_files = 2 * sum(counts.values())  # an image and a label per item of each split (one if they are one)
        if (hint := datasets.large_dataset_hint(root, repo_root(), n_files)) is not None:
            log.warning("%s", hint)
        mlflow.log_metrics({f"n_{split}": n for split, n in counts.items()})


app = command(prepare)
if __name__ == "__main__":
    app()
