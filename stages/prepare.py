from pathlib import Path

from deeplab import datasets
from deeplab.config import load_params
from deeplab.stage import command
from deeplab.tracking import stage_run


def prepare(params: Path = Path("params.yaml"), raw: Path = Path("data/raw"),
            out: Path = Path("data/prepared")) -> None:
    """Write the train and validation file lists (and any pre-processing the dataset needs) into OUT."""
    p = load_params(params)
    d = p.dataset
    with stage_run("prepare", p, params) as mlflow:
        counts = datasets.prepare(d, Path(d.root) if d.root else raw, out)
        mlflow.log_metrics({f"n_{split}": n for split, n in counts.items()})


app = command(prepare)
if __name__ == "__main__":
    app()
