from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
VOC_FIXTURES = SHARED / "fixtures" / "voc2012"
PROTOTXT = SHARED / "fixtures" / "deeplab_v2_prototxt" / "deploy.prototxt"

# What a pipeline run needs from the project: code, pipeline definition, DVC config.
PROJECT_FILES = ["deeplab", "stages", "dvc.yaml", ".dvc/config", ".gitignore", "params.yaml"]


def tiny_params(**overrides: object) -> dict:
    """The default params shrunk so the whole pipeline runs in well under a minute of compute."""
    p = yaml.safe_load((REPO / "params.yaml").read_text())
    p["dataset"]["synthetic"].update(n_train=12, n_val=4, height=64, width=64)
    p["model"].update(n_blocks=[1, 1, 1, 1], width=8)
    p["train"].update(iterations=40, batch_size=2, iter_size=1, crop_size=49, checkpoint_every=20, log_every=10)
    p["crf"].update(n_jobs=2)
    for key, value in overrides.items():
        section, _, name = key.partition(".")
        p[section][name] = value
    return p


def run_env(root: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["DVC_SITE_CACHE_DIR"] = str(root / ".site-cache")
    env["MLFLOW_DISABLE_TELEMETRY"] = "true"
    env.pop("MLFLOW_TRACKING_URI", None)
    env.pop("MLFLOW_RUN_ID", None)
    env.update(GIT_AUTHOR_NAME="test", GIT_AUTHOR_EMAIL="test@example.com", GIT_COMMITTER_NAME="test",
               GIT_COMMITTER_EMAIL="test@example.com")
    return env


def sh(root: Path, *cmd: str, check: bool = True) -> subprocess.CompletedProcess:
    res = subprocess.run(cmd, cwd=root, env=run_env(root), capture_output=True, text=True)
    if check and res.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({res.returncode}):\n{res.stdout[-4000:]}\n{res.stderr[-4000:]}")
    return res


def make_project(root: Path, params: dict) -> Path:
    """A git repository holding this project's pipeline with ``params``, committed."""
    root.mkdir(parents=True, exist_ok=True)
    for name in PROJECT_FILES:
        src = REPO / name
        if src.is_dir():
            shutil.copytree(src, root / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            (root / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, root / name)
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    (root / ".gitignore").write_text((root / ".gitignore").read_text() + "/.site-cache/\n")
    sh(root, "git", "init", "-q", "-b", "main")
    sh(root, "git", "add", "-A")
    sh(root, "git", "commit", "-q", "-m", "project")
    return root


def stages_run(output: str) -> list[str]:
    return [line.split("'")[1] for line in output.splitlines() if line.startswith("Running stage '")]


@pytest.fixture
def voc_fixtures() -> Path:
    if not VOC_FIXTURES.is_dir():
        pytest.skip(f"shared fixtures not found at {VOC_FIXTURES}")
    return VOC_FIXTURES
