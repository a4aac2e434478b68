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
import getpass
import hashlib
import json
import os
import pickle
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
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


def _experiment_id(client: Any, uri: str) -> str:
    exp = client.get_experiment_by_name(EXPERIMENT)
    if exp is not None:
        if KIND_TAG not in exp.tags:  # created before the tag was set
            client.set_experiment_tag(exp.experiment_id, KIND_TAG, KIND)
        return exp.experiment_id
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


def _parent_run(client: Any, exp_id: str, stage: str, tags: dict[str, str], params: Mapping[str, Any]) -> str:
    """The parent run of this pipeline execution: the newest one with the same key and DVC command, if it ended
    well and has no run of ``stage`` yet (a stage that runs again starts a new execution); else a new one, which
    gets the PIPELINE_SECTIONS of ``params`` (the same for every stage of it: the key holds the file's hash)."""
    key, dvc = tags["deeplab.pipeline"], tags["deeplab.dvc_process"]
    found = client.search_runs([exp_id], filter_string=f"tags.`deeplab.pipeline` = '{key}' and "
                               f"tags.`deeplab.dvc_process` = '{dvc}' and tags.`deeplab.role` = 'pipeline'",
                               order_by=["attributes.start_time DESC"], max_results=1)
    if found and found[0].info.status == "FINISHED":
        parent_id = found[0].info.run_id
        if not client.search_runs([exp_id], filter_string=f"tags.`mlflow.parentRunId` = '{parent_id}' and "
                                  f"tags.`deeplab.stage` = '{stage}'", max_results=1):
            return parent_id
    parent = client.create_run(exp_id, run_name=f"pipeline {key}",
                               tags={**tags, "deeplab.role": "pipeline", "mlflow.source.name": "dvc.yaml"})
    used = select(params, [s for s in PIPELINE_SECTIONS if s in params])
    client.log_batch(parent.info.run_id, params=_params(flatten(used)))
    client.set_terminated(parent.info.run_id)
    return parent.info.run_id


class Untracked:
    """Stands in for a StageRun under DEEPLAB_TRACKING=off: every logging call does nothing."""

    def __getattr__(self, name: str) -> Any:
        return lambda *args, **kwargs: None


# Hidden while MLflow imports: mlflow (which also ships as mlflow-skinny, without pandas) imports pandas only to
# register a pandas dataset constructor, and alembic's mako imports pygments only to highlight templates; both
# treat them as optional. Together they are ~0.6 s of CPU in every stage's start.
_OPTIONAL = ("pandas", "pygments")


def client(uri: str | None = None) -> Any:
    """An ``MlflowClient`` on ``uri`` (default: tracking_uri()), MLflow imported on first use, the store opened."""
    hidden = [m for m in _OPTIONAL if m not in sys.modules]
    sys.modules.update(dict.fromkeys(hidden))  # None in sys.modules: that import raises ImportError
    try:
        from mlflow.tracking import MlflowClient

        c = MlflowClient(tracking_uri=uri or tracking_uri())
        c.search_experiments(max_results=1)  # the store (SQLAlchemy, alembic) loads on first use: still hidden
    finally:
        for m in hidden:
            if sys.modules.get(m, 0) is None:
                del sys.modules[m]
    return c


def _params(params: Mapping[str, Any]) -> list[Any]:
    """MLflow Params of flat ``params``, lists as JSON."""
    from mlflow.entities import Param

    return [Param(k, json.dumps(v) if isinstance(v, list | tuple) else str(v)) for k, v in params.items()]


# The params sections that tell pipeline executions apart: logged on each parent run, so the runs table compares
# executions by them (logits / evaluate only say how, and on what device, results are computed).
PIPELINE_SECTIONS = ("dataset", "model", "init", "train", "crf")


class StageRun:
    """The open MLflow run of one stage: the logging calls the stages make (named as mlflow's fluent ones), on
    this run, and ``log_results`` / ``log_dataset`` that also go to the pipeline's parent run."""

    def __init__(self, c: Any, run_id: str, parent_id: str, stage: str) -> None:
        self.client, self.run_id, self.parent_id, self.stage = c, run_id, parent_id, stage
        self.now: int | None = None  # when the stage made the call being logged (ms), None: now

    def _metrics(self, metrics: Mapping[str, float], step: int | None) -> list[Any]:
        from mlflow.entities import Metric

        now = self.now or _now()
        return [Metric(k, float(v), now, step or 0) for k, v in metrics.items()]

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        self.client.log_batch(self.run_id, metrics=self._metrics(metrics, step))

    def log_metric(self, key: str, value: float, step: int | None = None) -> None:
        self.log_metrics({key: value}, step)

    def log_params(self, params: Mapping[str, Any]) -> None:
        self.client.log_batch(self.run_id, params=_params(params))

    def log_param(self, key: str, value: Any) -> None:
        self.log_params({key: value})

    def set_tag(self, key: str, value: Any) -> None:
        self.client.set_tag(self.run_id, key, str(value))

    def log_dict(self, d: Any, artifact_file: str) -> None:
        self.client.log_dict(self.run_id, d, artifact_file)

    def log_artifact(self, local_path: str, artifact_path: str | None = None) -> None:
        self.client.log_artifact(self.run_id, local_path, artifact_path)

    def log_artifacts(self, local_dir: str, artifact_path: str | None = None) -> None:
        self.client.log_artifacts(self.run_id, local_dir, artifact_path)

    def log_results(self, metrics: Mapping[str, float]) -> None:
        """Metrics of this stage that are results of the whole pipeline: on this run and on its parent."""
        for run_id in (self.run_id, self.parent_id):
            self.client.log_batch(run_id, metrics=self._metrics(metrics, None))

    def log_dataset(self, name: str, digest: str, source: Mapping[str, Any], sizes: Mapping[str, int]) -> None:
        """The dataset as an MLflow dataset input (the runs table's Dataset column) of this run and its parent:
        ``name``, ``digest`` (DVC's hash of the data), ``source`` (where it is) and the split sizes as its profile."""
        from mlflow.entities import Dataset, DatasetInput, InputTag

        dataset = Dataset(name=name, digest=digest[:36], source_type="local", source=json.dumps(dict(source)),
                          profile=json.dumps({"splits": dict(sizes), "num_rows": sum(sizes.values())}))
        for run_id in (self.run_id, self.parent_id):
            self.client.log_inputs(run_id, [DatasetInput(dataset, [InputTag("mlflow.data.context", "pipeline")])])


def dataset_of_lists(d: Any, lists: Path) -> tuple[str, str, dict[str, Any], dict[str, int]]:
    """``log_dataset``'s arguments for the dataset that ``d`` (a DatasetConfig) names, read from prepare's
    ``lists``."""
    from deeplab.data import read_list

    data = Path(d.root) if d.root else Path("data/raw")
    # Split sizes for the profile only (evaluate's scores read the val list alone, its one list dep).
    files = {split: lists / f"{split}.txt" for split in dict.fromkeys((d.train_split, d.val_split))}
    sizes = {split: len(read_list(f)) for split, f in files.items() if f.exists()}
    # DVC's hash of the dataset folder (the download stage's out, or a dep naming dataset.root); without one
    # (no DVC, or a root DVC does not track) the hash of the file lists, which name every file used.
    digest = dvc_hash(data) or dvc_hash(lists) or hashlib.md5(
        b"".join(files[split].read_bytes() for split in sizes)).hexdigest()
    return d.name, digest, {"uri": data.resolve().as_uri(), "lists": str(lists)}, sizes


def dvc_hash(path: Path, lock: Path = Path("dvc.lock")) -> str | None:
    """DVC's hash of ``path`` (a stage's dep or out in ``lock``: ``<md5>.dir`` for a folder), or None where the
    lock does not list it. The out's entry wins: the stage that wrote it is newer than any stage reading it."""
    import yaml

    try:
        stages = yaml.safe_load(lock.read_text())["stages"]
    except (OSError, KeyError, TypeError):
        return None
    root = lock.resolve().parent
    want = (path if path.is_absolute() else Path.cwd() / path).resolve()
    found: dict[str, str] = {}
    for spec in stages.values():
        for kind in ("outs", "deps"):
            for entry in spec.get(kind) or []:
                value = entry.get("md5") or entry.get("hash") if isinstance(entry, dict) else None
                if value and isinstance(entry.get("path"), str) and (root / entry["path"]).resolve() == want:
                    found.setdefault(kind, value)
    return found.get("outs") or found.get("deps")


@contextlib.contextmanager
def stage_run(stage: str, params: Any, params_file: Path) -> Iterator[StageRun]:
    """Start the MLflow child run of ``stage`` under this pipeline execution's parent run, keyed by git commit,
    DVC experiment and the content of ``params_file`` (the file ``params`` was loaded from). Logs as run params
    the params the stage lists in dvc.yaml (all of them outside a DVC project), and the whole resolved config
    as an artifact. Yields the StageRun.

    MLflow runs in a logger process (``serve``), one per store, shared by the stages that run while it is up:
    importing MLflow and opening the store take ~3 s of CPU, paid once per pipeline rather than once per stage,
    and never by the stage itself. The stage's calls go to it in order, stamped with the stage's clock, and the
    stage waits for them to be made before it ends. A tracking error fails the stage (after its work, naming it).

    The run ends FINISHED, FAILED on an exception, KILLED on SIGINT or SIGTERM (raised here as
    KeyboardInterrupt / Terminated); a failed or killed stage ends its parent the same way. A stage killed
    outright (SIGKILL) is ended KILLED by the logger, which outlives it (its own session: a signal to the stage's
    process group does not reach it), or else by the next stage run that starts on the same host."""
    if os.environ.get("DEEPLAB_TRACKING") == "off":  # a machine without MLflow (bench/device.sh on a bare GPU)
        yield Untracked()  # type: ignore[misc]
        return
    uri = tracking_uri()
    run = RunLogger(stage, uri, {
        "stage": stage, "params": params.model_dump(mode="json"), "params_file": str(params_file),
        "params_hash": file_hash(params_file), "commit": git_commit(),
        "exp_name": os.environ.get("DVC_EXP_NAME", "workspace"), "dvc_stage": os.environ.get("DVC_STAGE", stage),
        "dvc_params": dvc_stage_params(stage), "dvc_process": _dvc_process(), "pid": os.getpid(),
        "pid_start": process_start(os.getpid()) or "unknown", "source": sys.argv[0], "start_time": _now()})
    main = threading.current_thread() is threading.main_thread()  # only there can a handler be set
    previous = signal.signal(signal.SIGTERM, _raise_terminated) if main else None
    status = "FAILED"
    try:
        yield run  # type: ignore[misc]
        status = "FINISHED"
    except (KeyboardInterrupt, Terminated):
        status = "KILLED"
        raise
    finally:
        if main:  # None: a handler not set from Python, i.e. the default
            signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)
        error = run.close(status)
        if error and status == "FINISHED":  # a stage's own error wins: the logger's follows from it
            raise RuntimeError(error)


def _now() -> int:
    return int(time.time() * 1000)


def _address(uri: str) -> str:
    """The logger's socket for store ``uri``: abstract on Linux (no file to leave behind), else in the temp
    folder."""
    # Also keyed by this code and interpreter: after an edit or in another environment, a logger of its own.
    key = f"{os.getuid()}:{uri}:{sys.executable}:{file_hash(Path(__file__))}"
    name = f"deeplab-mlflow-{hashlib.sha256(key.encode()).hexdigest()[:24]}"
    if sys.platform.startswith("linux"):
        return f"\0{name}"
    # No peer credentials to check there: a folder only this user can enter keeps other users' processes out.
    folder = Path(tempfile.gettempdir()) / f"deeplab-{os.getuid()}"
    folder.mkdir(mode=0o700, exist_ok=True)
    st = folder.stat()
    if st.st_uid != os.getuid() or st.st_mode & 0o077:
        raise RuntimeError(f"MLflow tracking: {folder} is not this user's private folder (owner uid {st.st_uid}, "
                           f"mode {st.st_mode & 0o777:o}); remove it")
    return str(folder / name)


def _other_user(sock: socket.socket) -> int | None:
    """The user id of the process at the other end of a Unix socket when it is not this user's (Linux's
    SO_PEERCRED), else None (also where there are no peer credentials). Abstract sockets have no file
    permissions: any local user can connect to one, or bind its name first, and what goes over it is pickled, so
    each end checks that the other is this user's."""
    if not hasattr(socket, "SO_PEERCRED"):
        return None
    _pid, uid, _gid = struct.unpack("3i", sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                                          struct.calcsize("3i")))
    return None if uid == os.getuid() else uid


def _connect(uri: str, timeout: float = 120) -> socket.socket:
    """A connection to the logger of ``uri``, started here if none is up (or the one up is closing, idle)."""
    deadline, proc, address = time.monotonic() + timeout, None, _address(uri)
    while True:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.connect(address)
            if (uid := _other_user(sock)) is not None:
                sock.close()
                raise RuntimeError(f"MLflow tracking: the logger socket for {uri} is held by a process of another "
                                   f"user (uid {uid}); this stage's run is not sent to it")
            if sock.recv(1) == b"+":  # accepted by a logger that serves it, not reset by one going idle
                return sock
        except OSError:
            pass
        sock.close()
        if proc is None or proc.poll() is not None:
            if proc is not None and proc.returncode != 0:
                raise RuntimeError(f"MLflow tracking: the logger for {uri} exited with {proc.returncode}")
            package = str(Path(__file__).resolve().parents[1])  # this deeplab, wherever the stage was started
            env = {**os.environ,
                   "PYTHONPATH": os.pathsep.join(filter(None, [package, os.environ.get("PYTHONPATH")]))}
            # Its own session, no terminal streams: it outlives the stage, and holds no pipe of its caller open.
            proc = subprocess.Popen([sys.executable, "-c", "import sys; from deeplab.tracking import serve; "
                                     "serve(sys.argv[1])", uri], stdin=subprocess.DEVNULL,
                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env, cwd="/",
                                    start_new_session=True)
        if time.monotonic() > deadline:
            raise RuntimeError(f"MLflow tracking: no logger for {uri} after {timeout:.0f} s")
        time.sleep(0.02)


class RunLogger:
    """What a stage holds of its run: each StageRun call, sent to the logger (``serve``) that makes it."""

    def __init__(self, stage: str, uri: str, opening: dict[str, Any]) -> None:
        self.stage, self.broken, self.sock = stage, False, _connect(uri)
        self._send(opening)

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_") or not callable(getattr(StageRun, name, None)):
            raise AttributeError(f"a stage run has no {name!r}")
        return lambda *args, **kwargs: self._send((name, args, kwargs, _now()))

    def log_artifact(self, local_path: str, artifact_path: str | None = None) -> None:
        self._send(("log_artifact", (str(Path(local_path).resolve()), artifact_path), {}, _now()))

    def log_artifacts(self, local_dir: str, artifact_path: str | None = None) -> None:
        self._send(("log_artifacts", (str(Path(local_dir).resolve()), artifact_path), {}, _now()))

    def log_dataset_lists(self, d: Any, lists: Path) -> None:
        """StageRun.log_dataset of ``dataset_of_lists(d, lists)``."""
        self._send(("log_dataset", dataset_of_lists(d, lists), {}, _now()))

    def _send(self, message: Any) -> None:
        if self.broken:
            return
        data = pickle.dumps(message)
        held = threading.current_thread() is threading.main_thread()
        if held:  # a signal's handler raising mid-write would leave half a message in the socket
            old = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
        try:
            self.sock.sendall(data)
        except OSError:  # the logger is gone: close() says so
            self.broken = True
        finally:
            if held:
                signal.pthread_sigmask(signal.SIG_SETMASK, old)

    def close(self, status: str) -> str | None:
        """End the run with ``status`` once the logger has made every call; its error, else None."""
        self._send(("end", (status,), {}, _now()))
        try:
            self.sock.shutdown(socket.SHUT_WR)
            with self.sock.makefile("rb") as reply:
                error = pickle.load(reply)
        except (OSError, EOFError, pickle.UnpicklingError):
            error = f"MLflow tracking of stage {self.stage} failed: its logger ended before the run did"
        finally:
            self.sock.close()
        return error


# How long a logger waits for the next stage (DVC's own work between two stages: seconds).
IDLE_S = float(os.environ.get("DEEPLAB_TRACKING_IDLE_S", "30"))


def _store_file(uri: str) -> tuple[int, int] | None:
    """Which file a SQLite store is (device, inode), None for another store or none yet."""
    try:
        st = os.stat(uri.removeprefix("sqlite:///")) if uri.startswith("sqlite:///") else None
    except OSError:
        return None
    return (st.st_dev, st.st_ino) if st else None


def serve(uri: str) -> None:
    """The logger of store ``uri``: a process that loads MLflow once and serves the stage runs of every stage
    that connects (each on a thread of its own), until none has connected for IDLE_S seconds."""
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        listener.bind(_address(uri))
    except OSError:  # another logger serves this store (two stages started it at once)
        return
    listener.listen(64)
    listener.settimeout(1)
    loaded, store = threading.Event(), {}

    def load() -> None:
        try:
            store["client"], store["file"] = client(uri), _store_file(uri)
        except Exception as e:
            store["error"] = f"{type(e).__name__}: {e}"
        loaded.set()

    threading.Thread(target=load, daemon=True).start()
    state = {"active": 0, "last": time.monotonic()}
    lock, opening = threading.Lock(), threading.Lock()

    def handle(conn: socket.socket) -> None:
        try:
            _serve_run(conn, uri, loaded, store, opening)
        finally:
            conn.close()
            with lock:
                state["active"] -= 1
                state["last"] = time.monotonic()

    while True:
        try:
            conn, _ = listener.accept()
        except TimeoutError:
            with lock:  # a store that failed to open: no new runs (the next stage starts a fresh logger)
                done = state["active"] == 0 and ("error" in store or time.monotonic() - state["last"] > IDLE_S)
            if done:
                listener.close()  # a connection the kernel took meanwhile is reset: its stage starts another
                return
            continue
        if _other_user(conn) is not None:  # another user's process: nothing of it is read
            conn.close()
            continue
        if loaded.is_set() and "file" in store and _store_file(uri) != store["file"]:
            # The store was removed or replaced since (reset by hand): MLflow keeps its connections to the old
            # file, so this logger ends; the stage, refused, starts a fresh one.
            conn.close()
            listener.close()
            return
        with lock:
            state["active"] += 1
        conn.settimeout(None)
        try:
            conn.sendall(b"+")
        except OSError:
            conn.close()
            with lock:
                state["active"] -= 1
            continue
        threading.Thread(target=handle, args=(conn,)).start()


def _serve_run(conn: socket.socket, uri: str, loaded: threading.Event, store: dict[str, Any],
               opening_lock: threading.Lock) -> None:
    """One stage's run: opened, its calls made in order, ended as the stage says, or KILLED when the stage's
    end of the connection closes without a word (killed outright); the stage gets None or the error."""
    run, status, end, error, stage = None, "KILLED", None, None, "?"
    stream = conn.makefile("rb")
    try:
        opening = pickle.load(stream)
        stage = opening["stage"]
        loaded.wait()
        if "error" in store:
            raise RuntimeError(store["error"])
        with opening_lock:  # one at a time: a pipeline's parent run is looked up, or made, once
            run = _open_run(store["client"], uri, **opening)
        while True:
            try:
                name, args, kwargs, now = pickle.load(stream)
            except EOFError:
                break
            if name == "end":
                (status,), end = args, now
                break
            run.now = now
            getattr(run, name)(*args, **kwargs)
        run.client.set_terminated(run.run_id, status, end_time=end)
        if status != "FINISHED":
            run.client.set_terminated(run.parent_id, status, end_time=end)
    except Exception as e:  # one line, as the stages' own errors
        error = f"MLflow tracking of stage {stage} failed: {type(e).__name__}: {e}"
        if run is not None:
            with contextlib.suppress(Exception):
                run.client.set_terminated(run.run_id, "FAILED")
                run.client.set_terminated(run.parent_id, "FAILED")
    with contextlib.suppress(OSError):
        conn.sendall(pickle.dumps(error))


def _open_run(c: Any, uri: str, stage: str, params: dict[str, Any], params_file: str, params_hash: str,
              commit: str, exp_name: str, dvc_stage: str, dvc_params: list[str] | None, dvc_process: str,
              pid: int, pid_start: str, source: str, start_time: int) -> StageRun:
    """The MLflow run of one stage process (``pid``), under its pipeline execution's parent, with its params."""
    exp_id = _experiment_id(c, uri)
    mark_dead_runs(c, exp_id)
    key = f"{commit[:12]}-{exp_name}-{params_hash[:12]}"
    # mlflow.user / mlflow.source.*: what mlflow.start_run adds from its context providers (which import
    # GitPython, 0.3 s), cheaply, for the runs table's User and Source columns.
    tags = {"deeplab.pipeline": key, "git.commit": commit, "dvc.exp_name": exp_name,
            "deeplab.params_file": params_file, "deeplab.dvc_process": dvc_process,
            "mlflow.user": _user(), "mlflow.source.type": "LOCAL", "mlflow.source.name": source,
            "mlflow.source.git.commit": commit}
    parent_id = _parent_run(c, exp_id, stage, tags, params)
    process = {"deeplab.host": socket.gethostname(), "deeplab.pid": str(pid), "deeplab.pid_start": pid_start}
    run_id = c.create_run(exp_id, start_time=start_time, run_name=stage, tags={
        **tags, **process, "mlflow.parentRunId": parent_id, "deeplab.role": "stage", "deeplab.stage": stage,
        "dvc.stage": dvc_stage}).info.run_id
    run = StageRun(c, run_id, parent_id, stage)
    run.log_params(flatten(select(params, dvc_params) if dvc_params else params))
    run.log_dict(params, "config/params.json")
    return run


def _user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):  # no login name and no passwd entry (some containers)
        return "unknown"


def _raise_terminated(signum: int, frame: Any) -> None:
    raise Terminated(signum)
