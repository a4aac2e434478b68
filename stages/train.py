import csv
import logging
import sys
from pathlib import Path
from typing import Annotated, Any

import torch
import typer

from deeplab.config import load_params
from deeplab.files import file_hash
from deeplab.stage import command, torchrun, under_torchrun
from deeplab.tracking import stage_run
from deeplab.train import train as run_training

log = logging.getLogger("stages.train")


def log_series(mlflow: Any, log_csv: Path, log_every: int, iterations: int, through: int | None = None,
               ) -> list[dict[str, str]]:
    """The loss and lr of the training log's iterations that one process logs as it trains (every log_every-th
    and the last), up to ``through``, as MLflow series; returns the log's rows."""
    with open(log_csv, newline="") as f:
        rows = list(csv.DictReader(f))
    for r in rows:
        it = int(r["iteration"])
        if (it % log_every == 0 or it == iterations) and (through is None or it <= through):
            mlflow.log_metrics({"train_loss": float(r["loss"]), "lr": float(r["lr"])}, step=it)
    return rows


def train(params: Annotated[Path, typer.Option(help="Params file to read (dataset.*, model.*, train.*); must "
                                                    "hold every section.")] = Path("params.yaml"),
          lists: Annotated[Path, typer.Option(help="The prepare stage's file lists.")] = Path("data/prepared"),
          init: Annotated[Path, typer.Option(help="Initial weights from the init stage.")]
          = Path("data/models/init.pt"),
          out: Annotated[Path, typer.Option(help="Final weights (state dict) to write.")]
          = Path("data/models/final.pt"),
          checkpoint: Annotated[Path, typer.Option(help="Checkpoint written every train.checkpoint_every "
                                                        "iterations and resumed from when it matches.")]
          = Path("data/checkpoints/last.pt"),
          log_csv: Annotated[Path, typer.Option(help="CSV of the loss and lr per iteration.")]
          = Path("metrics/train_log.csv")) -> None:
    """Train DeepLab v2 from the initial weights; resumes from CHECKPOINT after an interruption. With
    train.iterations 0 the initial weights become the final weights untrained (to score released weights)."""
    p = load_params(params)
    t = p.train
    train_list = lists / f"{p.dataset.train_split}.txt"
    if under_torchrun():  # a worker of the job launched below
        run_training(p.dataset, p.model, t, train_list, init, out, checkpoint, log_csv)
        return
    with stage_run("train", p, params) as mlflow:
        mlflow.set_tag("deeplab.trained", str(t.iterations > 0).lower())  # false: the init weights, untrained
        # CPU training is bit-identical only where torch picks the same kernels (AVX-512, AVX2, ...) and splits
        # their sums over as many threads (one per core by default): the tags tell apart two runs of one commit
        # on two kinds of machine (README: Results of the default pipeline).
        mlflow.set_tag("torch.cpu_capability", torch.backends.cpu.get_cpu_capability())
        mlflow.set_tag("torch.num_threads", torch.get_num_threads())
        if t.iterations == 0:  # evaluate-only: no processes are launched for it
            run_training(p.dataset, p.model, t, train_list, init, out, checkpoint, log_csv)
            final_loss = None
        elif t.nproc_per_node * t.nnodes > 1:
            torchrun("stages.train", sys.argv[1:], t.nproc_per_node, t.nnodes, t.rdzv_endpoint)
            rows = log_series(mlflow, log_csv, t.log_every, t.iterations)
            final_loss = float(rows[-1]["loss"]) if rows else float("nan")
        else:
            result = run_training(
                p.dataset, p.model, t, train_list, init, out, checkpoint, log_csv,
                on_log=lambda it, loss, lr: mlflow.log_metrics({"train_loss": loss, "lr": lr}, step=it))
            if result.resumed_from:  # the interrupted run's iterations too, from the log the checkpoint carried
                mlflow.set_tag("deeplab.resumed_from", result.resumed_from)
                log_series(mlflow, log_csv, t.log_every, t.iterations, through=result.resumed_from)
            final_loss = result.final_loss
        if final_loss is not None:
            mlflow.log_metric("final_train_loss", final_loss)
        mlflow.set_tag("weights.final.md5", file_hash(out))
        mlflow.log_artifact(str(log_csv))
        log.info("weights written to %s, training log to %s", out, log_csv)


app = command(train)
if __name__ == "__main__":
    app()
