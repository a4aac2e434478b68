import logging
from pathlib import Path
from typing import Annotated

import typer

from deeplab.config import load_params
from deeplab.crf import choose_n_jobs, run_crf
from deeplab.data import read_image, read_list
from deeplab.stage import command
from deeplab.tracking import stage_run

log = logging.getLogger("stages.crf")


def crf(params: Annotated[Path, typer.Option(help="Params file to read (dataset.*, crf.*); must hold every "
                                                  "section.")] = Path("params.yaml"),
        lists: Annotated[Path, typer.Option(help="The prepare stage's file lists (the validation split).")]
        = Path("data/prepared"),
        logits: Annotated[Path, typer.Option(help="The logits stage's <id>.npy logits.")] = Path("data/logits"),
        out: Annotated[Path, typer.Option(help="Folder for the CRF <id>.png label maps.")]
        = Path("data/predictions/crf"),
        progress: Annotated[Path, typer.Option(help="Finished maps keyed by settings, code and inputs; not a DVC "
                                                    "output, so a rerun after an interruption resumes from it.")]
        = Path("data/crf_progress")) -> None:
    """Dense CRF over the saved logits of the validation split (its first crf.subset images when set), in
    parallel, writing label maps."""
    p = load_params(params)
    with stage_run("crf", p, params) as mlflow:
        items = read_list(lists / f"{p.dataset.val_split}.txt")[:p.crf.subset]
        h, w = read_image(items[0].image).shape[:2]
        n_jobs = choose_n_jobs(p.crf.n_jobs, p.dataset.n_classes, h, w)
        mlflow.log_param("crf.n_jobs_used", n_jobs)
        computed = run_crf(items, logits, out, p.crf, p.dataset.mean_bgr, n_jobs, progress)
        mlflow.log_metrics({"crf_computed": computed, "crf_reused": len(items) - computed})
        log.info("%d CRF label maps in %s (%d computed, %d reused)", len(items), out, computed, len(items) - computed)


app = command(crf)
if __name__ == "__main__":
    app()
