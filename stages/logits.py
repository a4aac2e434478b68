import logging
from pathlib import Path

from deeplab.config import load_params
from deeplab.data import SegmentationDataset
from deeplab.infer import dump_logits
from deeplab.models import build_model, load_weights
from deeplab.stage import command
from deeplab.tracking import file_md5, stage_run
from deeplab.train import pick_device

log = logging.getLogger("stages.logits")


def logits(params: Path = Path("params.yaml"), lists: Path = Path("data/prepared"),
           weights: Path = Path("data/models/final.pt"), out: Path = Path("data/logits"),
           predictions: Path = Path("data/predictions/raw")) -> None:
    """Multi-scale inference on the validation split: stride-8 float16 logits and raw label maps."""
    p = load_params(params)
    m = p.model
    with stage_run("logits", p) as mlflow:
        model = build_model(p.dataset.n_classes, m.n_blocks, m.width, m.atrous_rates, m.scales)
        load_weights(model, weights)
        mlflow.set_tag("weights.final.md5", file_md5(weights))
        dataset = SegmentationDataset(lists / f"{p.dataset.val_split}.txt", p.dataset.mean_bgr)
        device = pick_device(p.logits.device)
        n = dump_logits(model, dataset, out, predictions, device, p.logits.num_workers,
                        amp=p.logits.amp and device.type == "cuda")
        log.info("%d logits written to %s, raw predictions to %s", n, out, predictions)


app = command(logits)
if __name__ == "__main__":
    app()
