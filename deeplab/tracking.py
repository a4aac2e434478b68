"""MLflow tracking shared by the stages.

Store: ``MLFLOW_TRACKING_URI`` if exported, else SQLite at the repository root (``DVC_ROOT`` inside DVC
experiment temp copies, so temp runs land in the main store). Every stage run is a child of one parent
run per pipeline execution, keyed by git commit, DVC experiment and params.yaml content, and carries
the same tags, so the runs of one ``dvc repro`` sit together in the UI.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from deeplab.files import file_hash

EXPERIMENT = "deeplab"
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")


def repo_root() -> Path:
    return Path(os.environ.get("DVC_ROOT") or Path.cwd()).resolve()


def tracking_uri() -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{repo_root() / 'mlflow.db'}"


def git_commit(cwd: Path | None = None) -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, check=True)
        return out.stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out.update(flatten(v, f"{key}."))
        else:
            out[key] = v
    return out


def _experiment_id(client: Any) -> str:
    exp = client.get_experiment_by_name(EXPERIMENT)
    if exp is not None:
        return exp.experiment_id
    uri = tracking_uri()
    location = None
    if uri.startswith("sqlite:///"):
        # Artifacts beside the database, absolute, so temp-copy runs do not write into a deleted folder.
        location = (Path(uri.removeprefix("sqlite:///")).parent / "mlartifacts").as_uri()
    return client.create_experiment(EXPERIMENT, artifact_location=location)


def select(params: Mapping[str, Any], keys: Sequence[str]) -> dict[str, Any]:
    """The entries of nested ``params`` named by dotted ``keys`` (``"crf"``, ``"dataset.n_classes"``)."""
    out: dict[str, Any] = {}
    for key in keys:
        value: Any = params
        for part in key.split("."):
            value = value[part]
        out[key] = value
    return out


def dvc_stage_params(stage: str, dvc_yaml: Path = Path("dvc.yaml")) -> list[str] | None:
    """The params a stage lists in dvc.yaml (``evaluate@crf`` -> the ``evaluate`` foreach body), or None."""
    import yaml

    try:
        stages = yaml.safe_load(dvc_yaml.read_text())["stages"]
    except (OSError, KeyError, TypeError):
        return None
    spec = stages.get(stage.split("@")[0], {})
    spec = spec.get("do", spec)
    return [p for p in spec.get("params", []) if isinstance(p, str)] or None


class Untracked:
    """Stands in for the mlflow module under DEEPLAB_TRACKING=off: every logging call does nothing."""

    def __getattr__(self, name: str) -> Any:
        return lambda *args, **kwargs: None


@contextlib.contextmanager
def stage_run(stage: str, params: Any) -> Iterator[Any]:
    """Start the MLflow child run of ``stage`` under this pipeline execution's parent run. Logs as run params
    the params the stage lists in dvc.yaml (all of them outside a DVC project), and the whole resolved
    config as an artifact. Yields the ``mlflow`` module with the run active."""
    if os.environ.get("DEEPLAB_TRACKING") == "off":  # a machine without MLflow (bench/device.sh on a bare GPU)
        yield Untracked()
        return
    import mlflow
    from mlflow.tracking import MlflowClient

    mlflow.set_tracking_uri(tracking_uri())
    client = MlflowClient()
    exp_id = _experiment_id(client)
    commit = git_commit()
    exp_name = os.environ.get("DVC_EXP_NAME", "workspace")
    params_file = Path("params.yaml")
    params_hash = file_hash(params_file)[:12] if params_file.exists() else "none"
    key = f"{commit[:12]}-{exp_name}-{params_hash}"
    tags = {"deeplab.pipeline": key, "git.commit": commit, "dvc.exp_name": exp_name}
    found = client.search_runs([exp_id], filter_string=f"tags.`deeplab.pipeline` = '{key}' and "
                               "tags.`deeplab.role` = 'pipeline'", max_results=1)
    if found:
        parent_id = found[0].info.run_id
    else:
        parent = client.create_run(exp_id, run_name=f"pipeline {key}", tags={**tags, "deeplab.role": "pipeline"})
        parent_id = parent.info.run_id
        client.set_terminated(parent_id)
    with mlflow.start_run(experiment_id=exp_id, run_name=stage, parent_run_id=parent_id,
                          tags={**tags, "deeplab.role": "stage", "deeplab.stage": stage,
                                "dvc.stage": os.environ.get("DVC_STAGE", stage)}):
        resolved = params.model_dump(mode="json")
        keys = dvc_stage_params(stage)
        used = select(resolved, keys) if keys else resolved
        mlflow.log_params({k: json.dumps(v) if isinstance(v, list | tuple) else v for k, v in flatten(used).items()})
        mlflow.log_dict(resolved, "config/params.json")
        yield mlflow
