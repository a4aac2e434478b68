import logging
from pathlib import Path

from deeplab.config import load_params
from deeplab.crf import choose_n_jobs, run_crf
from deeplab.data import read_image, read_list
from deeplab.stage import command
from deeplab.tracking import stage_run

log = logging.getLogger("stages.crf")


def crf(params: Path = Path("params.yaml"), lists: Path = Path("data/prepared"),
        logits: Path = Path("data/logits"), out: Path = Path("data/predictions/crf")) -> None:
    """Dense CRF over the saved logits of the validation split, in parallel, writing label maps."""
    p = load_params(params)
    with stage_run("crf", p, params) as mlflow:
        items = read_list(lists / f"{p.dataset.val_split}.txt")
        h, w = read_image(items[0].image).shape[:2]
        n_jobs = choose_n_jobs(p.crf.n_jobs, p.dataset.n_classes, h, w)
        mlflow.log_param("crf.n_jobs_used", n_jobs)
        run_crf(items, logits, out, p.crf, p.dataset.mean_bgr, n_jobs)
        log.info("%d CRF label maps in %s", len(items), out)


app = command(crf)
if __name__ == "__main__":
    app()
