import logging
import sys
from pathlib import Path
from typing import Annotated

import torch
import typer

from deeplab.config import load_params
from deeplab.files import file_hash
from deeplab.infer import dump_logits
from deeplab.loader import SegmentationDataset
from deeplab.models import build_model, load_weights
from deeplab.stage import command, torchrun, under_torchrun
from deeplab.tracking import stage_run
from deeplab.train import Dist, pick_device

log = logging.getLogger("stages.logits")


def logits(params: Annotated[Path, typer.Option(help="Params file to read (dataset.*, model.*, logits.*); must "
                                                     "hold every section.")] = Path("params.yaml"),
           lists: Annotated[Path, typer.Option(help="The prepare stage's file lists (the validation split).")]
           = Path("data/prepared"),
           weights: Annotated[Path, typer.Option(help="Trained weights from the train stage.")]
           = Path("data/models/final.pt"),
           out: Annotated[Path, typer.Option(help="Folder for <id>.npy float16 logits.")] = Path("data/logits"),
           predictions: Annotated[Path, typer.Option(help="Folder for the raw <id>.png label maps.")]
           = Path("data/predictions/raw")) -> None:
    """Multi-scale inference on the validation split: stride-8 float16 logits and raw label maps."""
    p = load_params(params)
    if p.logits.nproc_per_node > 1 and not under_torchrun():
        with stage_run("logits", p, params) as mlflow:
            mlflow.set_tag("weights.final.md5", file_hash(weights))
            torchrun("stages.logits", sys.argv[1:], p.logits.nproc_per_node)
        return
    dist = Dist.from_env()
    m = p.model
    model = build_model(p.dataset.n_classes, m.n_blocks, m.width, m.atrous_rates, m.scales, m.arch, m.output_stride)
    load_weights(model, weights)
    dataset = SegmentationDataset(lists / f"{p.dataset.val_split}.txt", p.dataset.mean_bgr,
                                  normalization=p.dataset.normalization)
    device = pick_device(p.logits.device)
    if device.type == "cuda" and dist.world > 1:
        device = torch.device("cuda", dist.local_rank)
    shard = range(dist.rank, len(dataset), dist.world)
    cuda = device.type == "cuda"
    torch.backends.cudnn.benchmark = cuda  # the fast path is for GPUs only, as in training

    def run() -> int:
        return dump_logits(model, dataset, out, predictions, device, p.logits.num_workers,
                           amp=p.logits.amp and cuda, channels_last=p.logits.channels_last and cuda,
                           indices=shard)

    if under_torchrun():  # one shard of the job launched above
        n = run()
    else:
        with stage_run("logits", p, params) as mlflow:
            mlflow.set_tag("weights.final.md5", file_hash(weights))
            n = run()
    log.info("%d logits written to %s, raw predictions to %s", n, out, predictions)


app = command(logits)
if __name__ == "__main__":
    app()
