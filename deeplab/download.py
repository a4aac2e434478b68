"""The download stage's logic: produce the dataset named in params under the stage's output folder."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

from deeplab import synthetic
from deeplab.config import DatasetConfig

log = logging.getLogger(__name__)


def fetch_dataset(cfg: DatasetConfig, out: Path) -> Path:
    """Build the dataset in a temporary sibling folder and move it into place when complete, so an
    interrupted stage never leaves a half-made ``out``."""
    tmp = out.with_name(f".{out.name}.partial")
    shutil.rmtree(tmp, ignore_errors=True)
    if cfg.name == "synthetic":
        s = cfg.synthetic
        synthetic.generate(tmp, s.n_train, s.n_val, s.height, s.width, cfg.n_classes, s.seed)
    else:  # the Literal in DatasetConfig keeps this unreachable
        raise ValueError(f"dataset.name: unsupported dataset {cfg.name!r}")
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    log.info("dataset %s written to %s", cfg.name, out)
    return out
