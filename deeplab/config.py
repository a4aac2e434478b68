"""Typed view of params.yaml: every section is validated on load, unknown keys are errors.

Every top-level section is required in a params file: the defaults of a run live in the file (params.yaml,
presets/), so a missing section is an error rather than a silent switch to the built-in defaults below,
which describe the reference ResNet-101 setup (``default_params``).
"""

from __future__ import annotations

import difflib
import logging
import math
import string
from pathlib import Path
from typing import Annotated, Literal, get_args

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from deeplab.arch import atrous_rates_for

PARAMS_FILE = Path("params.yaml")
log = logging.getLogger(__name__)

PositiveInt = Annotated[int, Field(gt=0)]
NonNegInt = Annotated[int, Field(ge=0)]
PositiveFloat = Annotated[float, Field(gt=0)]
Byte = Annotated[int, Field(ge=0, le=255)]
Device = Literal["auto", "cpu", "cuda"]


class Section(BaseModel):
    # No float param means anything at infinity or NaN (YAML's .inf / .nan): refused at load, naming the key,
    # not later as an OverflowError from a crop size or a NaN loss.
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class SyntheticConfig(Section):
    n_train: PositiveInt = 120
    n_val: PositiveInt = 30
    height: Annotated[int, Field(ge=32)] = 128
    width: Annotated[int, Field(ge=32)] = 128
    seed: int = 0


def placeholders(pattern: str) -> list[str]:
    """The ``{...}`` field names of a format pattern, in order, repeats kept; ValueError if it is malformed."""
    return [name for _, name, _, _ in string.Formatter().parse(pattern) if name is not None]


def class_names_problem(names: list[str]) -> str | None:
    """What makes a list of class names unusable, or None: an empty name, or one given twice (evaluate's
    per-class table, plots and MLflow metrics are keyed by name: a repeated one would hide a class's IoU)."""
    for i, name in enumerate(names):
        if not name.strip():
            return f"class {i} has an empty name"
        if name in names[:i]:
            return f"{name!r} names classes {names.index(name)} and {i}: each class needs its own name"
    return None


class CustomDatasetConfig(Section):
    """dataset.name custom: the user's own images and labels under dataset.root (README, "Your own dataset")."""

    # Paths under dataset.root with {split} and {id} placeholders, e.g. JPEGImages/{id}.jpg and
    # SegmentationClass/{id}.png, img_dir/{split}/{id}.jpg and ann_dir/{split}/{id}.png.
    images: str | None = None
    labels: str | None = None
    # A text file per split under dataset.root, e.g. ImageSets/Segmentation/{split}.txt: one id per line, or
    # '<image> <label>' paths under the root. null: the ids are the files that match `images`.
    split_list: str | None = None
    # The dataset.n_classes class names: a list, or a text file of one name per line (relative: under the root).
    classes: list[str] | str
    # An RGB colour per class for label maps, overlays and legends; null: the PASCAL VOC palette.
    colours: list[tuple[Byte, Byte, Byte]] | None = None
    # mmsegmentation's reduce_zero_label: value 0 is ignored and every other value v becomes v - 1.
    reduce_zero_label: bool = False
    # Label value in the files -> class index or dataset.ignore_label, e.g. {11: 255} to ignore a void class;
    # applied on top of reduce_zero_label.
    label_map: dict[Byte, Byte] = {}

    @model_validator(mode="after")
    def _patterns(self) -> CustomDatasetConfig:
        for key in ("images", "labels", "split_list"):
            pattern = getattr(self, key)
            if pattern is None:
                continue
            try:
                names = placeholders(pattern)
            except ValueError as e:
                raise ValueError(f"dataset.custom.{key}: {pattern!r} is not a valid pattern ({e})") from None
            allowed = ("split",) if key == "split_list" else ("split", "id")
            unknown = [n for n in names if n not in allowed]
            if unknown:
                raise ValueError(f"dataset.custom.{key}: unknown placeholder {{{unknown[0]}}} in {pattern!r} "
                                 f"(allowed: {', '.join('{' + a + '}' for a in allowed)})")
            if key != "split_list" and "id" not in names:
                raise ValueError(f"dataset.custom.{key}: {pattern!r} needs an {{id}} placeholder")
        if (self.images is None) != (self.labels is None):
            raise ValueError("dataset.custom.images and dataset.custom.labels: give both patterns or neither")
        if self.split_list is None:
            if self.images is None or self.labels is None:
                raise ValueError("dataset.custom: give the images and labels patterns, or a split_list of "
                                 "'<image> <label>' lines")
            names = placeholders(self.images)
            if names.count("id") != 1 or "split" not in names:
                raise ValueError(f"dataset.custom.images: {self.images!r}: without a split_list the ids are the "
                                 "files that match it, so it needs {split} and exactly one {id}")
        elif "split" not in placeholders(self.split_list):
            raise ValueError(f"dataset.custom.split_list: {self.split_list!r} needs a {{split}} placeholder "
                             "(one list per split)")
        return self


class DatasetConfig(Section):
    # One of deeplab.datasets.DATASETS: synthetic, voc12, cocostuff10k, cocostuff164k, coco21, custom.
    name: str = "synthetic"
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
    # The network's input, as its init weights expect: caffe, BGR minus mean_bgr (the DeepLab caffemodels);
    # imagenet, RGB / 255 standardised by ImageNet's mean and std (init.source torchvision). Trained weights
    # record it, so predict and hub follow it.
    normalization: Literal["caffe", "imagenet"] = "caffe"
    train_split: str = "train"
    val_split: str = "val"
    # COCO-Stuff 10k is evaluated on images and labels warped to a square of this size (reference protocol).
    warp_size: PositiveInt | None = None
    synthetic: SyntheticConfig = SyntheticConfig()
    # Required for dataset.name custom (the root too); read only then.
    custom: CustomDatasetConfig | None = None

    @field_validator("name")
    @classmethod
    def _known_dataset(cls, name: str) -> str:
        from deeplab.datasets import DATASETS  # the one table of datasets

        if name not in DATASETS:
            raise ValueError(f"dataset.name: unknown dataset {name!r} (allowed: {', '.join(DATASETS)})")
        return name

    @model_validator(mode="after")
    def _ignore_not_a_class(self) -> DatasetConfig:
        if self.ignore_label < self.n_classes:
            raise ValueError(f"dataset.ignore_label ({self.ignore_label}) is a class index: it must be at least "
                             f"dataset.n_classes ({self.n_classes}), e.g. 255, or those pixels would be trained "
                             "and scored as ignored")
        return self

    @model_validator(mode="after")
    def _custom_fits(self) -> DatasetConfig:
        c = self.custom
        if self.name != "custom":
            return self
        if c is None or not self.root:
            raise ValueError("dataset.name custom needs dataset.root (the dataset folder) and a dataset.custom "
                             "section (images, labels, classes; README, \"Your own dataset\")")
        n = self.n_classes
        if isinstance(c.classes, list) and len(c.classes) != n:
            raise ValueError(f"dataset.custom.classes: {len(c.classes)} names, but dataset.n_classes is {n}: "
                             "they must be equal")
        if isinstance(c.classes, list) and (problem := class_names_problem(c.classes)):
            raise ValueError(f"dataset.custom.classes: {problem}")
        if c.colours is not None and len(c.colours) != n:
            raise ValueError(f"dataset.custom.colours: {len(c.colours)} colours, but dataset.n_classes is {n}: "
                             "give one [r, g, b] per class, or null for the VOC palette")
        for value, new in c.label_map.items():
            if new >= n and new != self.ignore_label:
                raise ValueError(f"dataset.custom.label_map: {value}: {new} is neither a class index "
                                 f"(0..{n - 1}, dataset.n_classes {n}) nor dataset.ignore_label "
                                 f"({self.ignore_label})")
        return self


class ModelConfig(Section):
    # deeplabv2: Caffe-style ResNet (stride on the first 1x1), summed ASPP, frozen-BN recipe; deeplabv3:
    # torchvision-style ResNet (stride on the 3x3), multi-grid, ASPP with image pooling; deeplabv3plus: v3 plus
    # the decoder on the stride-4 features.
    arch: Literal["deeplabv2", "deeplabv3", "deeplabv3plus"] = "deeplabv2"
    # Backbone output stride; deeplabv2 is 8 only.
    output_stride: Literal[8, 16] = 8
    # Bottleneck blocks per stage (res2..res5): ResNet-101 is [3, 4, 23, 3].
    n_blocks: tuple[PositiveInt, PositiveInt, PositiveInt, PositiveInt] = (3, 4, 23, 3)
    # Stem width; stage outputs are 4x, 8x, 16x and 32x this (64 gives the real 256..2048).
    width: PositiveInt = 64
    # v2: 4 rates; v3 / v3+: 3 (12/24/36 at output stride 8, 6/12/18 at 16). null: the arch's own.
    atrous_rates: tuple[PositiveInt, ...] | None = (6, 12, 18, 24)
    # Extra input scales fused by max with the 1x output (MSC); empty disables multi-scale.
    scales: tuple[PositiveFloat, ...] = (0.5, 0.75)

    @model_validator(mode="after")
    def _arch_fits(self) -> ModelConfig:
        atrous_rates_for(self.arch, self.output_stride, self.atrous_rates)  # names the key in its ValueError
        return self


RELEASED_NAMES = ("cocostuff164k", "cocostuff10k", "voc12")
CAFFEMODEL_NAMES = ("init", "train_iter_20000", "train2_iter_20000")


class InitConfig(Section):
    source: Literal["scratch", "caffemodel", "checkpoint", "released", "torchvision"] = "scratch"
    # caffemodel: a local .caffemodel file, or null to download DeepLab's MS-COCO-pretrained init.caffemodel;
    # checkpoint: a PyTorch state dict (.pt/.pth) of this model, e.g. the reference project's released weights
    # or its converted COCO init (deeplabv1_resnet101-coco.pth); released: the reference's release asset init.name;
    # torchvision: torchvision's ImageNet resnet101 state dict (e.g. resnet101-63fe2227.pth from its hub cache).
    path: str | None = None
    # released: which of the reference's released weights to download (cocostuff164k, cocostuff10k, voc12);
    # caffemodel without path: which caffemodel of the authors' zip (init, train_iter_20000, train2_iter_20000).
    name: str | None = None
    # A mirror serving prototxt_and_model.zip (or the released .pth files) under the official file names
    # (replaces the official URL's folder), and its checksums.
    base_url: str | None = None
    checksums: dict[Literal["md5", "sha1", "sha256", "size"], str | int] = {}
    seed: int = 0

    @model_validator(mode="after")
    def _path_needed(self) -> InitConfig:
        if self.source in ("checkpoint", "torchvision") and not self.path:
            raise ValueError(f"init.path is required when init.source is {self.source!r}")
        allowed = {"released": RELEASED_NAMES, "caffemodel": CAFFEMODEL_NAMES}.get(self.source, ())
        if self.source == "released" and self.name is None:
            raise ValueError(f"init.name is required when init.source is 'released' (one of {', '.join(allowed)})")
        if self.source == "released" and self.path:
            raise ValueError("init.path is not used with init.source 'released' (init.name picks the weights); for "
                             "a released .pth file already on disk use init.source 'checkpoint'")
        if self.source == "caffemodel" and self.path and self.name:
            raise ValueError("init.name and init.path are both set: init.path names the caffemodel, init.name picks "
                             "one from the downloaded zip; set one of them")
        if self.name is not None and self.name not in allowed:
            what = f"one of {', '.join(allowed)}" if allowed else "not used (leave it out)"
            raise ValueError(f"init.name: {self.name!r} with init.source {self.source!r}: {what}")
        return self


class TrainConfig(Section):
    device: Device = "auto"
    # Data-parallel processes (torchrun): per node, and nodes; with nnodes > 1 every node runs the stage with
    # the same rdzv_endpoint (host:port of one of them). Effective batch = batch_size x iter_size x processes.
    nproc_per_node: PositiveInt = 1
    nnodes: PositiveInt = 1
    rdzv_endpoint: str | None = None
    # 0: no training, the init weights are the final weights (score released weights as they are).
    iterations: NonNegInt = 20000
    batch_size: PositiveInt = 5
    iter_size: PositiveInt = 2
    lr: PositiveFloat = 2.5e-4
    momentum: Annotated[float, Field(ge=0, lt=1)] = 0.9
    weight_decay: Annotated[float, Field(ge=0)] = 5e-4
    poly_power: Annotated[float, Field(ge=0)] = 0.9
    # The lr factor is updated every lr_step iterations, whatever the policy (DeepLab v2: poly every 10).
    lr_step: PositiveInt = 10
    # poly: (1 - t/T)^poly_power; step: step_factor^floor(t/step_size); cosine: (1 + cos(pi t/T)) / 2.
    lr_policy: Literal["poly", "step", "cosine"] = "poly"
    step_size: PositiveInt | None = None
    step_factor: Annotated[float, Field(gt=0, le=1)] = 0.1
    # Linear warmup: over the first warmup_iterations the factor rises from warmup_start_factor to 1 (0: off).
    warmup_iterations: NonNegInt = 0
    warmup_start_factor: Annotated[float, Field(ge=0, le=1)] = 0.0
    crop_size: PositiveInt = 321
    scales: tuple[PositiveFloat, ...] = (0.5, 0.75, 1.0, 1.25, 1.5)
    # A continuous random scale, uniform in [low, high], instead of the discrete train.scales (null: off).
    scale_range: tuple[PositiveFloat, PositiveFloat] | None = None
    flip: bool = True
    # Gaussian blur of the training crop with this probability, sigma uniform in [0, 1) pixels (0: off).
    blur_prob: Annotated[float, Field(ge=0, le=1)] = 0.0
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

    @model_validator(mode="after")
    def _schedule_and_scale(self) -> TrainConfig:
        if self.lr_policy == "step" and self.step_size is None:
            raise ValueError("train.step_size is required when train.lr_policy is 'step' (iterations between "
                             "lr drops by train.step_factor)")
        if self.scale_range is not None and self.scale_range[0] > self.scale_range[1]:
            raise ValueError(f"train.scale_range: {list(self.scale_range)} must be [low, high] with low <= high")
        return self


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
    # Only the first N validation images, in the crf stage and both evaluate stages (a CRF parameter search on
    # part of the validation set). null: all.
    subset: PositiveInt | None = None
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
    # No defaults: every section must be in the file (see the module docstring). The top-level ``seed`` of
    # earlier params files was read by nothing (and no stage lists it): accepted, with a warning naming the
    # seeds that are used.
    seed: int | None = None
    dataset: DatasetConfig
    model: ModelConfig
    init: InitConfig
    train: TrainConfig
    logits: LogitsConfig
    crf: CrfConfig
    evaluate: EvaluateConfig

    @model_validator(mode="after")
    def _seed_is_read_by_nothing(self) -> Params:
        if self.seed is not None:
            log.warning("seed: %s is read by nothing and changes nothing; the seeds are dataset.synthetic.seed (the "
                        "generated data), init.seed and train.seed: remove the top-level seed", self.seed)
        return self

    @model_validator(mode="after")
    def _init_fits_arch(self) -> Params:
        if self.init.source == "caffemodel" and self.model.arch != "deeplabv2":
            raise ValueError(f"init.source: the DeepLab caffemodels hold a deeplabv2 network, model.arch is "
                             f"{self.model.arch}; use init.source torchvision (ImageNet) or scratch for it")
        return self

    @model_validator(mode="after")
    def _crop_fits_model(self) -> Params:
        t, scales = self.train, self.model.scales
        bn_batch = t.batch_size if not t.freeze_bn else None
        if bn_batch == 1 and self.model.arch != "deeplabv2":
            raise ValueError(f"train.batch_size: 1 with train.freeze_bn false cannot train {self.model.arch}: the "
                             "BatchNorm of ASPP's image-pooling branch sees one value per channel; use at least 2")
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
    return Params(dataset=DatasetConfig(), model=ModelConfig(), init=InitConfig(), train=TrainConfig(),
                  logits=LogitsConfig(), crf=CrfConfig(), evaluate=EvaluateConfig())


class ParamsError(ValueError):
    """params.yaml is missing, unreadable or invalid; the message names the file and the key."""


def _section_at(loc: tuple[int | str, ...]) -> type[BaseModel] | None:
    """The section model holding the key at ``loc`` (Params for a top-level key), None inside a plain dict."""
    model: type[BaseModel] = Params
    for part in loc[:-1]:
        field = model.model_fields.get(str(part))
        ann = field.annotation if field else None
        # An optional section (dataset.custom): its model.
        ann = next((a for a in get_args(ann) if isinstance(a, type) and issubclass(a, BaseModel)), ann)
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
