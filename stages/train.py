import logging
from pathlib import Path

from deeplab.config import load_params
from deeplab.stage import command
from deeplab.tracking import file_md5, stage_run
from deeplab.train import train as run_training

log = logging.getLogger("stages.train")


def train(params: Path = Path("params.yaml"), lists: Path = Path("data/prepared"),
          init: Path = Path("data/models/init.pt"), out: Path = Path("data/models/final.pt"),
          checkpoint: Path = Path("data/checkpoints/last.pt"),
          log_csv: Path = Path("metrics/train_log.csv")) -> None:
    """Train DeepLab v2 from the initial weights; resumes from CHECKPOINT after an interruption."""
    p = load_params(params)
    with stage_run("train", p) as mlflow:
        result = run_training(
            p.dataset, p.model, p.train, lists / f"{p.dataset.train_split}.txt", init, out, checkpoint, log_csv,
            on_log=lambda it, loss, lr: mlflow.log_metrics({"train_loss": loss, "lr": lr}, step=it))
        mlflow.log_metric("final_train_loss", result.final_loss)
        mlflow.set_tag("weights.final.md5", file_md5(out))
        mlflow.log_artifact(str(log_csv))
        log.info("weights written to %s, training log to %s", out, log_csv)


app = command(train)
if __name__ == "__main__":
    app()
