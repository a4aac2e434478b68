import logging
from pathlib import Path

from deeplab.config import load_params
from deeplab.files import save_torch
from deeplab.models import build_model, calibrate_bn, init_from_scratch
from deeplab.stage import command
from deeplab.tracking import file_md5, stage_run
from deeplab.train import calibration_batches

log = logging.getLogger("stages.init")


def init(params: Path = Path("params.yaml"), lists: Path = Path("data/prepared"),
         out: Path = Path("data/models/init.pt")) -> None:
    """Produce the initial weights the train stage starts from."""
    p = load_params(params)
    m = p.model
    with stage_run("init", p) as mlflow:
        model = build_model(p.dataset.n_classes, m.n_blocks, m.width, m.atrous_rates, m.scales)
        if p.init.source == "scratch":
            init_from_scratch(model, p.init.seed)
            n = calibrate_bn(model, calibration_batches(lists / f"{p.dataset.train_split}.txt", p.dataset,
                                                        p.train.crop_size, p.init.seed))
            log.info("BatchNorm statistics calibrated on %d training crops", n)
        else:
            raise ValueError(f"init.source: {p.init.source!r} is not available yet; use 'scratch'")
        save_torch(model.state_dict(), out)
        mlflow.set_tag("weights.init.md5", file_md5(out))
        log.info("initial weights (%s) written to %s", p.init.source, out)


app = command(init)
if __name__ == "__main__":
    app()
