"""Typed view of params.yaml: every section is validated on load, unknown keys are errors.

Every top-level section is required in a params file: the defaults of a run live in the file (params.yaml,
presets/), so a missing section is an error rather than a silent switch to the built-in defaults below,
which describe the reference ResNet-101 setup (``default_params``).
"""

from __future__ import annotations

import difflib
import math
from pathlib import Path
from typing import Annotated, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

PARAMS_FILE = Path("params.yaml")

PositiveInt = Annotated[int, Field(gt=0)]
NonNegInt = Annotated[int, Field(ge=0)]
PositiveFloat = Annotated[float, Field(gt=0)]
Device = Literal["auto", "cpu", "cuda"]


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class SyntheticConfig(Section):
    n_train: PositiveInt = 120
    n_val: PositiveInt = 30
    height: Annotated[int, Field(ge=32)] = 128
    width: Annotated[int, Field(ge=32)] = 128
    seed: int = 0


class DatasetConfig(Section):
    name: Literal["synthetic", "voc12", "cocostuff10k", "cocostuff164k"] = "synthetic"
    # The dataset folder. The download stage's own output (params.yaml: data/raw; null here) is downloaded or
    # generated. Any other folder is a dataset already on disk: nothing is downloaded, its layout is checked, and
    # DVC hashes it in place as the prepare stage's dependency (dvc.yaml lists ${dataset.root}: null fails there).
    root: str | None = None
    # A mirror serving the archives under their official file names (replaces each official URL's folder).
    base_url: str | None = None
    # Expected checksums per archive file name ({md5|sha1|sha256|size: value}) for a mirror whose archives
    # differ from the official ones; they replace the published values for that file.
    checksums: dict[str, dict[Literal["md5", "sha1", "sha256", "size"], str | int]] = {}
    n_classes: Annotated[int, Field(ge=2, le=255)] = 6
    ignore_label: Annotated[int, Field(ge=0, le=255)] = 255
    mean_bgr: tuple[float, float, float] = (104.008, 116.669, 122.675)
    train_split: str = "train"
    val_split: str = "val"
    # COCO-Stuff 10k is evaluated on images and labels warped to a square of this size (reference protocol).
    warp_size: PositiveInt | None = None
    synthetic: SyntheticConfig = SyntheticConfig()

    @model_validator(mode="after")
    def _ignore_not_a_class(self) -> DatasetConfig:
        if self.ignore_label < self.n_classes:
            raise ValueError(f"dataset.ignore_label ({self.ignore_label}) is a class index: it must be at least "
                             f"dataset.n_classes ({self.n_classes}), e.g. 255, or those pixels would be trained "
                             "and scored as ignored")
        return self


class ModelConfig(Section):
    # Bottleneck blocks per stage (res2..res5): ResNet-101 is [3, 4, 23, 3].
    n_blocks: tuple[PositiveInt, PositiveInt, PositiveInt, PositiveInt] = (3, 4, 23, 3)
    # Stem width; stage outputs are 4x, 8x, 16x and 32x this (64 gives the real 256..2048).
    width: PositiveInt = 64
    atrous_rates: tuple[PositiveInt, ...] = (6, 12, 18, 24)
    # Extra input scales fused by max with the 1x output (MSC); empty disables multi-scale.
    scales: tuple[PositiveFloat, ...] = (0.5, 0.75)


class InitConfig(Section):
    source: Literal["scratch", "caffemodel", "checkpoint"] = "scratch"
    # caffemodel: a local .caffemodel file, or null to download DeepLab's MS-COCO-pretrained init.caffemodel;
    # checkpoint: a PyTorch state dict (.pt/.pth) of this model, e.g. the reference project's released weights.
    path: str | None = None
    # A mirror serving prototxt_and_model.zip (replaces the official URL's folder), and its checksums.
    base_url: str | None = None
    checksums: dict[Literal["md5", "sha1", "sha256", "size"], str | int] = {}
    seed: int = 0

    @model_validator(mode="after")
    def _path_needed(self) -> InitConfig:
        if self.source == "checkpoint" and not self.path:
            raise ValueError("init.path is required when init.source is 'checkpoint'")
        return self


class TrainConfig(Section):
    device: Device = "auto"
    # Data-parallel processes (torchrun): per node, and nodes; with nnodes > 1 every node runs the stage with
    # the same rdzv_endpoint (host:port of one of them). Effective batch = batch_size x iter_size x processes.
    nproc_per_node: PositiveInt = 1
    nnodes: PositiveInt = 1
    rdzv_endpoint: str | None = None
    iterations: PositiveInt = 20000
    batch_size: PositiveInt = 5
    iter_size: PositiveInt = 2
    lr: PositiveFloat = 2.5e-4
    momentum: Annotated[float, Field(ge=0, lt=1)] = 0.9
    weight_decay: Annotated[float, Field(ge=0)] = 5e-4
    poly_power: Annotated[float, Field(ge=0)] = 0.9
    lr_step: PositiveInt = 10
    crop_size: PositiveInt = 321
    scales: tuple[PositiveFloat, ...] = (0.5, 0.75, 1.0, 1.25, 1.5)
    flip: bool = True
    freeze_bn: bool = True
    num_workers: NonNegInt = 0
    seed: int = 0
    deterministic: bool = False
    checkpoint_every: PositiveInt = 1000
    log_every: PositiveInt = 10
    # CUDA fast path: bf16 autocast and channels_last (ignored on CPU).
    amp: bool = True
    channels_last: bool = True
    compile: bool = False


class LogitsConfig(Section):
    device: Device = "auto"
    # Shard the validation split over this many torchrun processes.
    nproc_per_node: PositiveInt = 1
    num_workers: NonNegInt = 0
    # The CUDA fast path that bench/infer.py measures: bf16 autocast, channels_last, cudnn.benchmark.
    amp: bool = True
    channels_last: bool = True


class CrfConfig(Section):
    # pydensecrf: pydensecrf2 in joblib workers; torch: the PyTorch permutohedral lattice (CUDA when present).
    backend: Literal["pydensecrf", "torch"] = "pydensecrf"
    device: Device = "auto"
    # Where pydensecrf workers run: loky processes on this machine, or a Dask cluster at `scheduler`
    # (or $DASK_SCHEDULER_ADDRESS); its workers must see the same data/ paths.
    parallel: Literal["loky", "dask"] = "loky"
    scheduler: str | None = None
    iterations: PositiveInt = 10
    pos_xy_std: PositiveFloat = 1.0
    pos_w: Annotated[float, Field(ge=0)] = 3.0
    bi_xy_std: PositiveFloat = 67.0
    bi_rgb_std: PositiveFloat = 3.0
    bi_w: Annotated[float, Field(ge=0)] = 4.0
    # pydensecrf: worker processes; torch on CPU: threads. null: all cores (pydensecrf: capped by available memory).
    n_jobs: PositiveInt | None = None
    # torch backend: images of one size per mean-field batch. null: what ~70% of free GPU memory holds (at most
    # 16), 1 on CPU.
    batch_size: PositiveInt | None = None
    # Reproduce the reference's bug of feeding the mean-subtracted BGR image cast to uint8 (parity checks only).
    reference_image_quirk: bool = False


class EvaluateConfig(Section):
    # Validation images shown in the prediction grid.
    n_examples: NonNegInt = 4


def min_crop_size(scales: tuple[float, ...], bn_batch: int | None = None) -> int:
    """The smallest ``train.crop_size`` that trains: MSC feeds the network ``floor(crop * s)`` pixels per
    scale (F.interpolate's rounding), which must keep one; the stride-8 network then yields at least one logit
    and the loss shrinks the labels to it. With ``bn_batch`` (BatchNorm learning, batch of one) every
    branch's logit map must hold more than one value per channel."""
    c = 1
    while any(math.floor(c * s) < 1 for s in scales):
        c += 1
    if bn_batch == 1:
        from deeplab.models import output_size  # torch: only for this rare setting

        while min(output_size(math.floor(c * s)) for s in (1.0, *scales)) < 2:
            c += 1
    return c


class Params(Section):
    # No defaults: every section must be in the file (see the module docstring).
    seed: int
    dataset: DatasetConfig
    model: ModelConfig
    init: InitConfig
    train: TrainConfig
    logits: LogitsConfig
    crf: CrfConfig
    evaluate: EvaluateConfig

    @model_validator(mode="after")
    def _crop_fits_model(self) -> Params:
        t, scales = self.train, self.model.scales
        bn_batch = t.batch_size if not t.freeze_bn else None
        need = min_crop_size(scales, bn_batch)
        if t.crop_size < need:
            why = (f"every model.scales {list(scales)} input, floor(crop_size x scale), needs at least one pixel"
                   if need == min_crop_size(scales) else
                   "with train.freeze_bn false and train.batch_size 1, BatchNorm needs more than one logit per "
                   f"channel in every model.scales {list(scales)} branch (output stride 8)")
            raise ValueError(f"train.crop_size: {t.crop_size} is below the minimum {need} for this model: {why}")
        return self


def default_params() -> Params:
    """The built-in defaults of every section (ResNet-101, synthetic data): only for tools that may run
    without a params file (``deeplab predict``); stages always read a complete one."""
    return Params(seed=0, dataset=DatasetConfig(), model=ModelConfig(), init=InitConfig(), train=TrainConfig(),
                  logits=LogitsConfig(), crf=CrfConfig(), evaluate=EvaluateConfig())


class ParamsError(ValueError):
    """params.yaml is missing, unreadable or invalid; the message names the file and the key."""


def _section_at(loc: tuple[int | str, ...]) -> type[BaseModel] | None:
    """The section model holding the key at ``loc`` (Params for a top-level key), None inside a plain dict."""
    model: type[BaseModel] = Params
    for part in loc[:-1]:
        field = model.model_fields.get(str(part))
        ann = field.annotation if field else None
        if not (isinstance(ann, type) and issubclass(ann, BaseModel)):
            return None
        model = ann
    return model


def _unknown_key(loc: tuple[int | str, ...]) -> str:
    key = ".".join(str(p) for p in loc)
    section = _section_at(loc)
    if section is None:
        return f"{key}: unknown key"
    allowed = list(section.model_fields)
    prefix = ".".join(str(p) for p in loc[:-1])
    close = difflib.get_close_matches(str(loc[-1]), allowed, n=1)
    hint = f"; did you mean {prefix + '.' if prefix else ''}{close[0]}?" if close else ""
    where = f"{prefix} keys" if prefix else "sections"
    return f"{key}: unknown key{hint} (allowed {where}: {', '.join(allowed)})"


def _describe(err: ValidationError, path: Path) -> str:
    lines = [f"{path}: invalid parameters"]
    errors = err.errors()
    missing = [str(e["loc"][0]) for e in errors if e["type"] == "missing" and len(e["loc"]) == 1]
    if missing:
        lines.append(f"  missing sections: {', '.join(missing)} (every section must be in the file; "
                     "params.yaml and presets/ are complete examples)")
    for e in errors:
        loc = e["loc"]
        key = ".".join(str(p) for p in loc) or "<root>"
        if e["type"] == "missing" and len(loc) == 1:
            continue
        if e["type"] == "extra_forbidden":
            lines.append(f"  {_unknown_key(loc)}")
        elif e["type"] == "value_error":  # our validators' messages name their keys and values
            lines.append(f"  {e['msg'].removeprefix('Value error, ')}")
        else:
            lines.append(f"  {key}: {e['msg']} (got {e.get('input')!r})")
    return "\n".join(lines)


def load_params(path: str | Path = PARAMS_FILE) -> Params:
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except FileNotFoundError:
        raise ParamsError(f"{path}: file not found") from None
    except yaml.YAMLError as e:
        raise ParamsError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(raw, dict):
        raise ParamsError(f"{path}: top level must be a mapping of sections")
    try:
        return Params.model_validate(raw)
    except ValidationError as e:
        raise ParamsError(_describe(e, path)) from None
