"""MLflow tracking shared by the stages.

Store: ``MLFLOW_TRACKING_URI`` if exported, else SQLite at the repository root (``DVC_ROOT`` inside DVC
experiment temp copies, so temp runs land in the main store). Every stage run is a child of one parent
run per pipeline execution (one ``dvc repro`` or ``dvc exp run``), keyed by git commit, DVC experiment and the
content of the params file the stage loaded, and carries the same tags, so the runs of one execution sit
together in the UI. Stage runs record host, pid and process start time, so a run whose process died without a
word (SIGKILL) can be told from a live one and ended KILLED.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import threading
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


# The experiment's kind as MLflow 3 records it: model training, not GenAI. (The 3.17 UI opens an experiment by its
# own GenAI / Machine learning switch, GenAI unless changed, so the README points at the runs tab's URL.)
KIND_TAG, KIND = "mlflow.experimentKind", "custom_model_development"


def _experiment_id(client: Any) -> str:
    exp = client.get_experiment_by_name(EXPERIMENT)
    if exp is not None:
        if KIND_TAG not in exp.tags:  # created before the tag was set
            client.set_experiment_tag(exp.experiment_id, KIND_TAG, KIND)
        return exp.experiment_id
    uri = tracking_uri()
    location = None
    if uri.startswith("sqlite:///"):
        # Artifacts beside the database, absolute, so temp-copy runs do not write into a deleted folder.
        location = (Path(uri.removeprefix("sqlite:///")).parent / "mlartifacts").as_uri()
    return client.create_experiment(EXPERIMENT, artifact_location=location, tags={KIND_TAG: KIND})


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


class Terminated(BaseException):
    """SIGTERM arrived while a stage run was open (a BaseException, like KeyboardInterrupt: nothing may catch it
    as an ordinary error)."""

    def __init__(self, signum: int) -> None:
        super().__init__(f"terminated by signal {signum}")
        self.signum = signum


def _proc_fields(pid: int) -> list[str] | None:
    """The fields of /proc/PID/stat after the command name (state first), or None without such a process."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return text[text.rindex(")") + 2:].split()


def process_start(pid: int) -> str | None:
    """When process ``pid`` started, as ``<boot id>:<clock ticks since boot>`` (exact, unlike a wall-clock time,
    so a live process always matches what it recorded); None if it is gone or a zombie."""
    fields = _proc_fields(pid)
    if fields is None or fields[0] in ("Z", "X"):
        return None
    return f"{Path('/proc/sys/kernel/random/boot_id').read_text().strip()}:{fields[19]}"


def _can_see_processes() -> bool:
    return Path("/proc/self/stat").exists()


def _dvc_process() -> str:
    """``host:pid:start`` of the nearest ancestor that is a dvc command (the ``dvc repro`` or ``dvc exp run``
    running this stage), or "none": the stages one DVC command runs form one pipeline execution."""
    pid = os.getppid()
    for _ in range(8):
        fields = _proc_fields(pid) if pid > 1 else None
        if fields is None:
            break
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
        except OSError:
            break
        if "dvc" in (os.path.basename(a) for a in argv[:2]) or argv[1:3] == ["-m", "dvc"]:
            return f"{socket.gethostname()}:{pid}:{process_start(pid)}"
        pid = int(fields[1])
    return "none"


def mark_dead_runs(client: Any, exp_id: str) -> list[str]:
    """End as KILLED the RUNNING stage runs whose process is provably gone: started on this host, and its pid is
    dead or now belongs to a process with another start time (SIGKILL, out-of-memory kill, power loss). A run
    of a live process, or of another host, is left alone. Their parents end KILLED too. Returns the run ids."""
    if not _can_see_processes():
        return []
    host = socket.gethostname()
    runs = client.search_runs([exp_id], filter_string="attributes.status = 'RUNNING' and "
                              f"tags.`deeplab.role` = 'stage' and tags.`deeplab.host` = '{host}'", max_results=1000)
    killed = []
    for run in runs:
        tags = run.data.tags
        pid, start = tags.get("deeplab.pid"), tags.get("deeplab.pid_start")
        if not pid or not start or process_start(int(pid)) == start:
            continue
        client.set_terminated(run.info.run_id, "KILLED")
        parent = tags.get("mlflow.parentRunId")
        if parent:
            client.set_terminated(parent, "KILLED")
        killed.append(run.info.run_id)
    return killed


def _parent_run(client: Any, exp_id: str, stage: str, tags: dict[str, str]) -> str:
    """The parent run of this pipeline execution: the newest one with the same key and DVC command, if it ended
    well and has no run of ``stage`` yet (a stage that runs again starts a new execution); else a new one."""
    key, dvc = tags["deeplab.pipeline"], tags["deeplab.dvc_process"]
    found = client.search_runs([exp_id], filter_string=f"tags.`deeplab.pipeline` = '{key}' and "
                               f"tags.`deeplab.dvc_process` = '{dvc}' and tags.`deeplab.role` = 'pipeline'",
                               order_by=["attributes.start_time DESC"], max_results=1)
    if found and found[0].info.status == "FINISHED":
        parent_id = found[0].info.run_id
        if not client.search_runs([exp_id], filter_string=f"tags.`mlflow.parentRunId` = '{parent_id}' and "
                                  f"tags.`deeplab.stage` = '{stage}'", max_results=1):
            return parent_id
    parent = client.create_run(exp_id, run_name=f"pipeline {key}", tags={**tags, "deeplab.role": "pipeline"})
    client.set_terminated(parent.info.run_id)
    return parent.info.run_id


class Untracked:
    """Stands in for the mlflow module under DEEPLAB_TRACKING=off: every logging call does nothing."""

    def __getattr__(self, name: str) -> Any:
        return lambda *args, **kwargs: None


@contextlib.contextmanager
def stage_run(stage: str, params: Any, params_file: Path) -> Iterator[Any]:
    """Start the MLflow child run of ``stage`` under this pipeline execution's parent run, keyed by git commit,
    DVC experiment and the content of ``params_file`` (the file ``params`` was loaded from). Logs as run params
    the params the stage lists in dvc.yaml (all of them outside a DVC project), and the whole resolved config
    as an artifact. Yields the ``mlflow`` module with the run active.

    The run ends FINISHED, FAILED on an exception, KILLED on SIGINT or SIGTERM (raised here as
    KeyboardInterrupt / Terminated); a failed or killed stage ends its parent the same way. A stage killed
    outright (SIGKILL) is ended KILLED by the next stage run that starts on the same host."""
    if os.environ.get("DEEPLAB_TRACKING") == "off":  # a machine without MLflow (bench/device.sh on a bare GPU)
        yield Untracked()
        return
    import mlflow
    from mlflow.tracking import MlflowClient

    mlflow.set_tracking_uri(tracking_uri())
    client = MlflowClient()
    exp_id = _experiment_id(client)
    mark_dead_runs(client, exp_id)
    commit = git_commit()
    exp_name = os.environ.get("DVC_EXP_NAME", "workspace")
    key = f"{commit[:12]}-{exp_name}-{file_hash(params_file)[:12]}"
    tags = {"deeplab.pipeline": key, "git.commit": commit, "dvc.exp_name": exp_name,
            "deeplab.params_file": str(params_file), "deeplab.dvc_process": _dvc_process()}
    parent_id = _parent_run(client, exp_id, stage, tags)
    process = {"deeplab.host": socket.gethostname(), "deeplab.pid": str(os.getpid()),
               "deeplab.pid_start": process_start(os.getpid()) or "unknown"}
    mlflow.start_run(experiment_id=exp_id, run_name=stage, parent_run_id=parent_id,
                     tags={**tags, **process, "deeplab.role": "stage", "deeplab.stage": stage,
                           "dvc.stage": os.environ.get("DVC_STAGE", stage)})
    main = threading.current_thread() is threading.main_thread()  # only there can a handler be set
    previous = signal.signal(signal.SIGTERM, _raise_terminated) if main else None
    status = "FAILED"
    try:
        resolved = params.model_dump(mode="json")
        keys = dvc_stage_params(stage)
        used = select(resolved, keys) if keys else resolved
        mlflow.log_params({k: json.dumps(v) if isinstance(v, list | tuple) else v for k, v in flatten(used).items()})
        mlflow.log_dict(resolved, "config/params.json")
        yield mlflow
        status = "FINISHED"
    except (KeyboardInterrupt, Terminated):
        status = "KILLED"
        raise
    finally:
        if main:  # None: a handler not set from Python, i.e. the default
            signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)
        mlflow.end_run(status)
        if status != "FINISHED":
            client.set_terminated(parent_id, status)


def _raise_terminated(signum: int, frame: Any) -> None:
    raise Terminated(signum)
