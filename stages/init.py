import logging
from pathlib import Path
from typing import Annotated

import typer

from deeplab.caffe import convert_caffemodel, fresh_head
from deeplab.config import load_params
from deeplab.download import fetch_caffemodel, fetch_released
from deeplab.files import file_hash, save_torch
from deeplab.imagenet import layout as tv_layout
from deeplab.imagenet import load_torchvision
from deeplab.loader import calibration_batches
from deeplab.models import (
    build_model,
    calibrate_bn,
    conflicts,
    from_v1_layout,
    init_from_scratch,
    load_state,
    load_weights,
    read_state_dict,
    read_weights_file,
)
from deeplab.stage import command
from deeplab.tracking import stage_run

log = logging.getLogger("stages.init")


def show(value: object) -> object:
    """A params value as params.yaml writes it (lists, not tuples)."""
    return list(value) if isinstance(value, tuple) else value


def warn_trained_on_val(caffemodel: Path, dataset: str, val_split: str) -> str | None:
    """The warning for scoring the DeepLab authors' VOC caffemodel trained on train+val on VOC's val images."""
    if caffemodel.name != "train2_iter_20000.caffemodel" or dataset != "voc12" or val_split == "test":
        return None
    text = (f"{caffemodel.name} was trained by the DeepLab authors on VOC 2012 train+val (with SBD): its scores on "
            f"dataset.val_split {val_split!r} are not a held-out measure (expect about 0.85-0.91 mean IoU, not "
            "76-78); train_iter_20000.caffemodel is the one trained on train_aug")
    log.warning("%s", text)
    return text


def untrained_head(what: str, n_classes: int, iterations: int) -> None:
    """With train.iterations 0 the initial weights are scored as they are: a head left fresh (its class count is
    not the weights') would be scored untrained, a chance-level result that looks like one of the weights'."""
    if iterations == 0:
        raise ValueError(f"{what}: holds no head for dataset.n_classes {n_classes}, so it would start fresh, and "
                         "train.iterations is 0: the untrained head would be scored. Give weights trained for "
                         f"{n_classes} classes, or train (train.iterations > 0)")


def init(params: Annotated[Path, typer.Option(help="Params file to read (dataset.*, model.*, init.*, "
                                                   "train.crop_size); must hold every section.")]
         = Path("params.yaml"),
         lists: Annotated[Path, typer.Option(help="The prepare stage's file lists (training crops calibrate "
                                                  "BatchNorm for init.source scratch).")] = Path("data/prepared"),
         out: Annotated[Path, typer.Option(help="Initial weights (state dict) to write.")]
         = Path("data/models/init.pt"),
         downloads: Annotated[Path, typer.Option(help="Folder for the downloaded caffemodel archive and "
                                                           "released weights.")]
         = Path("data/downloads")) -> None:
    """Produce the initial weights the train stage starts from: seeded from-scratch, a converted DeepLab
    caffemodel (downloaded unless init.path names one), a PyTorch checkpoint, the reference's released weights
    (init.source released, downloaded) or torchvision's ImageNet ResNet."""
    p = load_params(params)
    m, i = p.model, p.init
    # Checked before MLflow starts a run: a wrong path or model is a config error, not a failed run.
    if i.source != "scratch" and i.path and not Path(i.path).is_file():
        raise FileNotFoundError(f"init.path: {i.path}: no such {i.source} file (init.source is {i.source!r})")
    if i.source == "checkpoint":
        try:
            state, meta = read_weights_file(Path(i.path))
        except ValueError as e:  # names the file; say which setting gave it
            raise ValueError(f"init.path: {e}") from None
        state, dropped = from_v1_layout(state)
        if dropped:
            log.info("init.path %s is in the reference's DeepLabV1 layout (its COCO init): backbone keys prefixed "
                     "with base., its classifier (%s) dropped", i.path, ", ".join(dropped))
        if meta is not None:  # written by train: name the params that differ instead of listing tensors
            clash = conflicts(meta, arch=m.arch, output_stride=m.output_stride, n_blocks=m.n_blocks, width=m.width,
                              atrous_rates=m.atrous_rates)
            if clash:
                raise ValueError(f"init.path: {i.path}: the checkpoint was trained with another model: " + "; ".join(
                    f"model.{k} is {show(given)} in the params, {show(have)} in the file" for k, have, given in clash))
            fed = conflicts(meta, normalization=p.dataset.normalization, mean_bgr=p.dataset.mean_bgr)
            if fed and p.train.iterations == 0:  # scored as they are, fed otherwise than trained: a low score
                raise ValueError(f"init.path: {i.path}: train.iterations is 0, but the checkpoint was trained on "
                                 "other input: " + "; ".join(f"dataset.{k} is {show(given)} in the params, "
                                                              f"{show(have)} in the file" for k, have, given in fed))
            if conflicts(meta, mean_bgr=p.dataset.mean_bgr):  # fine-tuning adapts to the new input
                log.warning("init.path %s was trained with input mean %s, dataset.mean_bgr is %s", i.path,
                            show(meta["mean_bgr"]), show(p.dataset.mean_bgr))
            if meta["normalization"] != p.dataset.normalization:
                log.warning("init.path %s was trained with dataset.normalization %s, the params say %s", i.path,
                            meta["normalization"], p.dataset.normalization)
    if i.source == "torchvision":
        try:
            state = read_state_dict(Path(i.path))
        except ValueError as e:
            raise ValueError(f"init.path: {e}") from None
        blocks, width = tv_layout(state)
        if (blocks, width) != (m.n_blocks, m.width):
            raise ValueError(f"init.path: {i.path}: the torchvision ResNet has n_blocks {list(blocks)} and width "
                             f"{width}, the params give model.n_blocks {show(m.n_blocks)} and model.width {m.width} "
                             "(resnet101: [3, 4, 23, 3] and 64)")
        untrained_head(f"init.path: {i.path}: torchvision's ImageNet ResNet", p.dataset.n_classes, p.train.iterations)
    with stage_run("init", p, params) as mlflow:
        model = build_model(p.dataset.n_classes, m.n_blocks, m.width, m.atrous_rates, m.scales, m.arch,
                            m.output_stride)
        if i.source == "scratch":
            init_from_scratch(model, i.seed)
            n = calibrate_bn(model, calibration_batches(lists / f"{p.dataset.train_split}.txt", p.dataset,
                                                        p.train.crop_size, i.seed))
            log.info("BatchNorm statistics calibrated on %d training crops", n)
            save_torch(model.state_dict(), out)
        elif i.source == "caffemodel":
            path = Path(i.path) if i.path else fetch_caffemodel(downloads, f"{i.name or 'init'}.caffemodel",
                                                                base_url=i.base_url, checksums=i.checksums or None)
            mlflow.set_tag("init.caffemodel.md5", file_hash(path))
            warning = warn_trained_on_val(path, p.dataset.name, p.dataset.val_split)
            if warning:
                mlflow.set_tag("init.warning", warning)
            lines = convert_caffemodel(path, out, p.dataset.n_classes, m.n_blocks, m.width)
            for line in lines:
                log.info("%s", line)
            if fresh_head(lines):
                try:
                    untrained_head(f"init caffemodel {path}", p.dataset.n_classes, p.train.iterations)
                except ValueError:
                    out.unlink()
                    raise
            load_weights(model, out)  # the converted file must fit the configured model
        elif i.source == "torchvision":
            init_from_scratch(model, i.seed)  # the head's init; the backbone is replaced below
            for line in load_torchvision(model, state, Path(i.path)):
                log.info("%s", line)
            if p.dataset.normalization != "imagenet":
                log.warning("torchvision's weights expect ImageNet-normalised RGB input, dataset.normalization is "
                            "%s: set it to imagenet", p.dataset.normalization)
            save_torch(model.state_dict(), out)
        else:
            if i.source == "released":
                path = fetch_released(i.name, downloads, i.base_url, i.checksums or None)
                mlflow.set_tag("init.released", path.name)
                log.info("released weights %s (init.name %s)", path.name, i.name)
                state = read_weights_file(path)[0]
            else:
                path = Path(i.path)
            fresh = load_state(model, state, path)
            if fresh:
                untrained_head(f"init {i.source} weights {path}", p.dataset.n_classes, p.train.iterations)
                log.info("classifier head initialised fresh (%d tensors): class count differs", len(fresh))
            save_torch(model.state_dict(), out)
        mlflow.set_tag("weights.init.md5", file_hash(out))
        log.info("initial weights (%s) written to %s", i.source, out)


app = command(init)
if __name__ == "__main__":
    app()
