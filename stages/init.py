import logging
from pathlib import Path

from deeplab.caffe import convert_caffemodel
from deeplab.config import load_params
from deeplab.download import fetch_caffemodel
from deeplab.files import file_hash, save_torch
from deeplab.models import build_model, calibrate_bn, init_from_scratch, load_weights
from deeplab.stage import command
from deeplab.tracking import stage_run
from deeplab.train import calibration_batches

log = logging.getLogger("stages.init")


def init(params: Path = Path("params.yaml"), lists: Path = Path("data/prepared"),
         out: Path = Path("data/models/init.pt"), downloads: Path = Path("data/downloads")) -> None:
    """Produce the initial weights the train stage starts from: seeded from-scratch, a converted DeepLab
    caffemodel (downloaded unless init.path names one), or a PyTorch checkpoint."""
    p = load_params(params)
    m, i = p.model, p.init
    with stage_run("init", p, params) as mlflow:
        model = build_model(p.dataset.n_classes, m.n_blocks, m.width, m.atrous_rates, m.scales)
        if i.source == "scratch":
            init_from_scratch(model, i.seed)
            n = calibrate_bn(model, calibration_batches(lists / f"{p.dataset.train_split}.txt", p.dataset,
                                                        p.train.crop_size, i.seed))
            log.info("BatchNorm statistics calibrated on %d training crops", n)
            save_torch(model.state_dict(), out)
        elif i.source == "caffemodel":
            path = Path(i.path) if i.path else fetch_caffemodel(downloads, base_url=i.base_url,
                                                                checksums=i.checksums or None)
            mlflow.set_tag("init.caffemodel.md5", file_hash(path))
            for line in convert_caffemodel(path, out, p.dataset.n_classes, m.n_blocks, m.width):
                log.info("%s", line)
            load_weights(model, out)  # the converted file must fit the configured model
        else:
            fresh = load_weights(model, Path(i.path))
            if fresh:
                log.info("classifier head initialised fresh (%d tensors): class count differs", len(fresh))
            save_torch(model.state_dict(), out)
        mlflow.set_tag("weights.init.md5", file_hash(out))
        log.info("initial weights (%s) written to %s", i.source, out)


app = command(init)
if __name__ == "__main__":
    app()
