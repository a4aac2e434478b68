import csv
import logging
import sys
from pathlib import Path

from deeplab.config import load_params
from deeplab.files import file_hash
from deeplab.stage import command, torchrun, under_torchrun
from deeplab.tracking import stage_run
from deeplab.train import train as run_training

log = logging.getLogger("stages.train")


def train(params: Path = Path("params.yaml"), lists: Path = Path("data/prepared"),
          init: Path = Path("data/models/init.pt"), out: Path = Path("data/models/final.pt"),
          checkpoint: Path = Path("data/checkpoints/last.pt"),
          log_csv: Path = Path("metrics/train_log.csv")) -> None:
    """Train DeepLab v2 from the initial weights; resumes from CHECKPOINT after an interruption."""
    p = load_params(params)
    t = p.train
    train_list = lists / f"{p.dataset.train_split}.txt"
    if under_torchrun():  # a worker of the job launched below
        run_training(p.dataset, p.model, t, train_list, init, out, checkpoint, log_csv)
        return
    with stage_run("train", p, params) as mlflow:
        if t.nproc_per_node * t.nnodes > 1:
            torchrun("stages.train", sys.argv[1:], t.nproc_per_node, t.nnodes, t.rdzv_endpoint)
            with open(log_csv, newline="") as f:
                rows = [r for r in csv.DictReader(f) if int(r["iteration"]) % t.log_every == 0]
            for r in rows:
                mlflow.log_metrics({"train_loss": float(r["loss"]), "lr": float(r["lr"])}, step=int(r["iteration"]))
            final_loss = float(rows[-1]["loss"]) if rows else float("nan")
        else:
            result = run_training(
                p.dataset, p.model, t, train_list, init, out, checkpoint, log_csv,
                on_log=lambda it, loss, lr: mlflow.log_metrics({"train_loss": loss, "lr": lr}, step=it))
            final_loss = result.final_loss
        mlflow.log_metric("final_train_loss", final_loss)
        mlflow.set_tag("weights.final.md5", file_hash(out))
        mlflow.log_artifact(str(log_csv))
        log.info("weights written to %s, training log to %s", out, log_csv)


app = command(train)
if __name__ == "__main__":
    app()
