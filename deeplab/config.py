"""Typed view of params.yaml: every section is validated on load, unknown keys are errors."""

from __future__ import annotations

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
    # A dataset already on disk: nothing is downloaded, its layout is checked. null: download into data/raw.
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


class Params(Section):
    seed: int = 0
    dataset: DatasetConfig = DatasetConfig()
    model: ModelConfig = ModelConfig()
    init: InitConfig = InitConfig()
    train: TrainConfig = TrainConfig()
    logits: LogitsConfig = LogitsConfig()
    crf: CrfConfig = CrfConfig()
    evaluate: EvaluateConfig = EvaluateConfig()


class ParamsError(ValueError):
    """params.yaml is missing, unreadable or invalid; the message names the file and the key."""


def _describe(err: ValidationError, path: Path) -> str:
    lines = [f"{path}: invalid parameters"]
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"]) or "<root>"
        if e["type"] == "extra_forbidden":
            lines.append(f"  {key}: unknown key")
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
