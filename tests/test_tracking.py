"""deeplab.tracking on a real SQLite store, read back with MlflowClient: run status when a stage fails or is
killed, parent runs per pipeline execution and what they carry (params, results, dataset), the experiment kind
the MLflow UI opens on.

The stage is a tiny typer command (deeplab.stage.command, as every stage) that loads a params file, enters
stage_run and then succeeds, logs results, raises, or blocks until killed: a real process where signals, exit
status or the process tree are under test, its function called in the test's process otherwise.
"""

from __future__ import annotations

import json
import os
import pickle
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO, _copy_empty_store, run_env, skip_or_fail, tiny_params

STAGE = textwrap.dedent("""
    import sys
    import time
    from pathlib import Path

    import typer

    from deeplab.config import load_params
    from deeplab.stage import command
    from deeplab.tracking import stage_run


    def main(stage: str, action: str, params: Path = Path("params.yaml")) -> None:
        p = load_params(params)
        with stage_run(stage, p, params) as run:
            if action == "fail":
                raise ValueError("the stage failed")
            if action == "results":
                run.log_results({"raw_mean_iou": 0.75, "raw_pixel_accuracy": 0.875})
                run.log_dataset("synthetic", "0123456789abcdef0123456789abcdef.dir", {"uri": "file:///data"},
                                {"train": 12, "val": 4})
            if action == "block":
                print("running", flush=True)
                time.sleep(600)
            if action == "modules":  # what the stage's own process has loaded while its run is open
                run.log_metrics({"loss": 0.5}, step=1)
                print(sorted(m for m in ("mlflow", "sqlalchemy", "alembic") if m in sys.modules), flush=True)
            if action == "work":
                Path("work.done").write_text("done")
""")
STAGE_SCRIPT = STAGE + "\n\ncommand(main)()\n"


@pytest.fixture
def store(tmp_path) -> Path:
    """A folder with params.yaml, other.yaml (another lr), the stage script; MLflow's store is its mlflow.db, made
    (empty): a test reading it while a stage's logger opens its run would otherwise race it to create the tables."""
    _copy_empty_store(tmp_path)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(tiny_params()))
    (tmp_path / "other.yaml").write_text(yaml.safe_dump(tiny_params(**{"train.lr": 5e-4})))
    (tmp_path / "stage.py").write_text(STAGE_SCRIPT)
    return tmp_path


def _env(root: Path) -> dict[str, str]:
    env = run_env(root)
    env["PYTHONPATH"] = str(REPO)
    env["MLFLOW_TRACKING_URI"] = f"sqlite:///{root / 'mlflow.db'}"
    for name in ("DVC_ROOT", "DVC_STAGE", "DVC_EXP_NAME"):
        env.pop(name, None)
    return env


def _stage(root: Path, stage: str, action: str = "ok", *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "stage.py", stage, action, *args], cwd=root, env=_env(root),
                          capture_output=True, text=True, timeout=300)


@pytest.fixture
def here(store, monkeypatch):
    """Runs the stage script's main in this process, in ``store``, for tests where the stage needs no process
    of its own (no signal, no exit status, no process tree): each saves a Python start and MLflow's import."""
    monkeypatch.chdir(store)
    for name, value in _env(store).items():
        if os.environ.get(name) != value:
            monkeypatch.setenv(name, value)
    for name in ("DVC_ROOT", "DVC_STAGE", "DVC_EXP_NAME", "MLFLOW_RUN_ID"):
        monkeypatch.delenv(name, raising=False)
    namespace: dict = {}
    exec(compile(STAGE, "stage.py", "exec"), namespace)

    def run(stage: str, action: str = "ok", params: str = "params.yaml") -> None:
        namespace["main"](stage, action, Path(params))

    return run


def _blocking(root: Path, stage: str) -> subprocess.Popen:
    """A stage process that has entered its run and sleeps."""
    # SIGINT back to its default first: a child inherits an ignored SIGINT (as some test runners' workers have
    # it), and Python then never raises KeyboardInterrupt.
    proc = subprocess.Popen([sys.executable, "stage.py", stage, "block"], cwd=root, env=_env(root),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    line = proc.stdout.readline()
    if line.strip() != "running":
        proc.kill()
        raise AssertionError(f"stage did not start: {line!r}\n{proc.stderr.read()[-3000:]}")
    _wait(lambda: _stage_runs(root, stage), f"the {stage} run in the store")  # its logger opens it meanwhile
    return proc


def _wait(condition, what: str, timeout: float = 180):
    """``condition()`` once it is true (the logger process works on its own time; MLflow alone imports in ~20 s
    on a loaded machine)."""
    deadline = time.monotonic() + timeout
    while not (value := condition()):
        if time.monotonic() > deadline:
            raise AssertionError(f"no {what} after {timeout} s")
        time.sleep(0.2)
    return value


def _logger_of(pid: int) -> int:
    """The pid of a stage process's logger (its one child)."""
    (child,) = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    return int(child)


def _client(root: Path):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=f"sqlite:///{root / 'mlflow.db'}")


def _runs(root: Path, role: str) -> list:
    client = _client(root)
    exp = client.get_experiment_by_name("deeplab")
    if exp is None:  # no stage's logger has made it yet
        return []
    runs = client.search_runs([exp.experiment_id], f"tags.`deeplab.role` = '{role}'",
                              order_by=["attributes.start_time ASC"])
    return runs


def _stage_runs(root: Path, stage: str) -> list:
    return [r for r in _runs(root, "stage") if r.data.tags["deeplab.stage"] == stage]


def _status(root: Path, run_id: str) -> str:
    return _client(root).get_run(run_id).info.status


def test_sigkilled_stage_run_is_ended_killed_by_its_logger(store):
    proc = _blocking(store, "train")
    (run,) = _stage_runs(store, "train")
    assert run.data.tags["deeplab.pid"] == str(proc.pid)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    _wait(lambda: _status(store, run.info.run_id) == "KILLED", "KILLED run")
    # The logger ends the run, then its parent: two writes, with no stage left waiting for both.
    _wait(lambda: _status(store, run.data.tags["mlflow.parentRunId"]) == "KILLED", "KILLED parent run")


def test_sigkilled_stage_and_logger_are_marked_killed_when_the_next_one_starts(store):
    proc = _blocking(store, "train")
    (run,) = _stage_runs(store, "train")
    os.kill(_logger_of(proc.pid), signal.SIGKILL)  # both gone at once: power loss, the OOM killer
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert _status(store, run.info.run_id) == "RUNNING"  # nothing could say otherwise
    res = _stage(store, "train")
    assert res.returncode == 0, res.stderr[-3000:]
    old, new = _stage_runs(store, "train")
    assert old.info.run_id == run.info.run_id
    assert (old.info.status, new.info.status) == ("KILLED", "FINISHED")
    assert _status(store, old.data.tags["mlflow.parentRunId"]) == "KILLED"


def test_run_of_a_live_stage_stays_running_and_sigterm_ends_it_killed(store):
    proc = _blocking(store, "train")
    try:
        res = _stage(store, "train")  # a parallel run of the same stage (two `dvc exp run --temp`)
        assert res.returncode == 0, res.stderr[-3000:]
        live, other = _stage_runs(store, "train")
        assert (live.info.status, other.info.status) == ("RUNNING", "FINISHED")
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=180)  # MLflow alone imports in ~20 s on a loaded machine
    assert proc.returncode == -signal.SIGTERM  # it still dies of the signal, as dvc expects
    assert _status(store, live.info.run_id) == "KILLED"
    assert _status(store, live.data.tags["mlflow.parentRunId"]) == "KILLED"
    assert _status(store, other.data.tags["mlflow.parentRunId"]) == "FINISHED"


def test_ctrl_c_ends_run_killed(store):
    proc = _blocking(store, "crf")
    proc.send_signal(signal.SIGINT)
    proc.wait(timeout=180)  # MLflow alone imports in ~20 s on a loaded machine
    (run,) = _stage_runs(store, "crf")
    assert run.info.status == "KILLED"  # mlflow's own context manager would say FAILED
    assert _status(store, run.data.tags["mlflow.parentRunId"]) == "KILLED"


def test_the_stage_works_while_its_logger_loads_mlflow(store):
    res = _stage(store, "train", "modules")
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.split("\n")[0] == "[]"  # neither MLflow nor its store in the stage's process
    (run,) = _stage_runs(store, "train")
    assert run.info.status == "FINISHED"
    (loss,) = _client(store).get_metric_history(run.info.run_id, "loss")
    assert (loss.value, loss.step) == (0.5, 1)
    assert run.info.start_time <= loss.timestamp <= run.info.end_time  # the stage's clock, not the logger's
    assert json.loads((Path(_client(store).download_artifacts(run.info.run_id, "config/params.json")))
                      .read_text())["train"]["lr"] == tiny_params()["train"]["lr"]


def test_a_tracking_error_fails_the_stage_after_its_work(store):
    env = {**_env(store), "MLFLOW_TRACKING_URI": "nosuchscheme://store"}
    res = subprocess.run([sys.executable, "stage.py", "train", "work"], cwd=store, env=env, capture_output=True,
                         text=True, timeout=300)
    assert (store / "work.done").exists()  # the work was not held up by MLflow
    assert res.returncode == 1, res.stderr[-3000:]
    assert "error: MLflow tracking of stage train failed" in res.stderr


def _loggers(root: Path) -> list[int]:
    """The pids of the logger processes serving root's store."""
    uri, found = f"sqlite:///{root / 'mlflow.db'}", []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            argv = cmdline.read_bytes().split(b"\0")
        except OSError:
            continue
        if uri.encode() in argv and any(b"import serve" in a for a in argv):
            found.append(int(cmdline.parent.name))
    return found


def test_stages_share_one_logger_that_ends_when_idle(store):
    env = {**_env(store), "DEEPLAB_TRACKING_IDLE_S": "8"}
    for stage in ("download", "prepare"):
        res = subprocess.run([sys.executable, "stage.py", stage, "ok"], cwd=store, env=env, capture_output=True,
                             text=True, timeout=300)
        assert res.returncode == 0, res.stderr[-3000:]
        if stage == "download":
            (logger,) = _loggers(store)
    assert _loggers(store) == [logger]  # the second stage used the first one's: MLflow loaded once
    assert [r.info.status for r in _runs(store, "stage")] == ["FINISHED", "FINISHED"]
    _wait(lambda: not _loggers(store), "end of the idle logger", timeout=120)


def test_runs_after_the_store_was_removed_go_to_the_new_store(store, here):
    here("download")
    (store / "mlflow.db").unlink()  # a store reset by hand while the logger is up
    here("prepare")
    assert [r.data.tags["deeplab.stage"] for r in _runs(store, "stage")] == ["prepare"]


def test_exception_ends_run_and_parent_failed(store):
    res = _stage(store, "train", "fail")
    assert res.returncode == 1 and "the stage failed" in res.stderr
    (run,) = _stage_runs(store, "train")
    assert run.info.status == "FAILED"
    assert _status(store, run.data.tags["mlflow.parentRunId"]) == "FAILED"


def test_each_params_file_has_its_own_parent(store, here):
    here("download", params="other.yaml")
    here("prepare")
    (download,), (prepare,) = _stage_runs(store, "download"), _stage_runs(store, "prepare")
    assert download.data.tags["mlflow.parentRunId"] != prepare.data.tags["mlflow.parentRunId"]
    assert (download.data.tags["deeplab.params_file"], prepare.data.tags["deeplab.params_file"]) == (
        "other.yaml", "params.yaml")
    assert download.data.tags["deeplab.pipeline"] != prepare.data.tags["deeplab.pipeline"]


def test_parent_groups_one_execution_and_a_repeated_stage_starts_another(store, here):
    for stage in ("train", "logits", "train"):
        here(stage)
    first, second = _stage_runs(store, "train")
    (logits,) = _stage_runs(store, "logits")
    assert logits.data.tags["mlflow.parentRunId"] == first.data.tags["mlflow.parentRunId"]
    assert second.data.tags["mlflow.parentRunId"] != first.data.tags["mlflow.parentRunId"]
    assert len(_runs(store, "pipeline")) == 2


def test_stages_of_different_dvc_commands_have_different_parents(store):
    # Two `dvc repro` (stand-ins named dvc, as the real one: python .../bin/dvc) each run a stage the other
    # did not: same commit, experiment and params, but two executions.
    fake = store / "bin" / "dvc"
    fake.parent.mkdir()
    fake.write_text("import subprocess, sys\nsys.exit(subprocess.run([sys.executable, 'stage.py', *sys.argv[1:]])"
                    ".returncode)\n")
    for stage in ("download", "prepare"):
        res = subprocess.run([sys.executable, str(fake), stage, "ok"], cwd=store, env=_env(store),
                             capture_output=True, text=True, timeout=300)
        assert res.returncode == 0, res.stderr[-3000:]
    (download,), (prepare,) = _stage_runs(store, "download"), _stage_runs(store, "prepare")
    assert download.data.tags["deeplab.pipeline"] == prepare.data.tags["deeplab.pipeline"]
    assert download.data.tags["mlflow.parentRunId"] != prepare.data.tags["mlflow.parentRunId"]
    assert download.data.tags["deeplab.dvc_process"].split(":")[1] != prepare.data.tags["deeplab.dvc_process"].split(
        ":")[1]


def test_experiment_opens_as_model_training(store, here):
    client = _client(store)
    client.create_experiment("deeplab")  # made by an older version, without the kind
    assert "mlflow.experimentKind" not in client.get_experiment_by_name("deeplab").tags
    here("download")
    assert client.get_experiment_by_name("deeplab").tags["mlflow.experimentKind"] == "custom_model_development"


def test_new_experiment_has_the_kind(store, here):
    here("download")
    assert _client(store).get_experiment_by_name("deeplab").tags["mlflow.experimentKind"] == "custom_model_development"


def test_process_start_tells_live_from_gone():
    from deeplab.tracking import process_start

    if not Path("/proc/self/stat").exists():
        pytest.skip("no /proc")
    assert process_start(os.getpid()) == process_start(os.getpid()) is not None
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    start = process_start(proc.pid)
    proc.kill()
    proc.wait()
    assert process_start(proc.pid) is None and start is not None


def test_parent_carries_the_params_that_tell_executions_apart(store, here):
    here("download")
    (parent,) = _runs(store, "pipeline")
    params, tiny = parent.data.params, tiny_params()
    assert params["dataset.name"] == "synthetic" and params["dataset.synthetic.n_train"] == "12"
    assert params["model.n_blocks"] == "[1, 1, 1, 1]" and params["model.width"] == "8"
    assert params["init.source"] == tiny["init"]["source"] and params["train.lr"] == str(tiny["train"]["lr"])
    assert params["crf.bi_w"] == str(tiny["crf"]["bi_w"])
    assert not [k for k in params if k.split(".")[0] not in ("dataset", "model", "init", "train", "crf")]
    (download,) = _stage_runs(store, "download")
    assert download.data.tags["mlflow.user"] and download.data.tags["mlflow.source.type"] == "LOCAL"


def test_results_and_dataset_go_to_the_stage_run_and_its_parent(store, here):
    here("evaluate@raw", "results")
    (run,), (parent,) = _stage_runs(store, "evaluate@raw"), _runs(store, "pipeline")
    assert run.data.tags["mlflow.parentRunId"] == parent.info.run_id
    for r in (run, parent):
        assert r.data.metrics == {"raw_mean_iou": 0.75, "raw_pixel_accuracy": 0.875}
        (given,) = r.inputs.dataset_inputs
        assert (given.dataset.name, given.dataset.digest) == ("synthetic", "0123456789abcdef0123456789abcdef.dir")
        assert json.loads(given.dataset.profile)["splits"] == {"train": 12, "val": 4}


def test_dvc_hash_reads_the_lock(tmp_path, monkeypatch):
    from deeplab.tracking import dvc_hash

    monkeypatch.chdir(tmp_path)
    (tmp_path / "dvc.lock").write_text(yaml.safe_dump({"schema": "2.0", "stages": {
        "prepare": {"cmd": "x", "deps": [{"path": "data/raw", "md5": "old.dir"}],
                    "outs": [{"path": "data/prepared", "md5": "lists.dir"}]},
        "download": {"cmd": "y", "outs": [{"path": "data/raw", "hash": "md5", "md5": "new.dir"}]}}}))
    assert dvc_hash(Path("data/raw")) == "new.dir"  # the out, not a reader's older dep entry
    assert dvc_hash(tmp_path / "data" / "prepared") == "lists.dir"
    assert dvc_hash(Path("elsewhere")) is None
    assert dvc_hash(Path("data/raw"), tmp_path / "missing.lock") is None


def test_mlflow_loads_without_its_optional_imports(tmp_path):
    # pandas and pygments are ~0.6 s of every stage's start and nothing a stage logs needs them; hidden only
    # while MLflow loads, so code that wants them later still gets them.
    code = ("import sys\nfrom deeplab.tracking import client\n"
            f"client('sqlite:///{tmp_path / 'mlflow.db'}').create_experiment('x')\n"
            "print(sorted(m for m in ('pandas', 'pygments') if m in sys.modules))\n"
            "import pandas, pygments.lexers\nprint(pandas.DataFrame({'a': [1]}).shape)\n")
    res = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env={**run_env(tmp_path), "PYTHONPATH": str(REPO)},
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.split() == ["[]", "(1,", "1)"]


NOBODY = 65534


class _Touch:
    """Pickled, it creates ``path`` when loaded: code another local user could send to run as this one."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self):
        return open, (self.path, "w")


def _as_nobody(work) -> tuple[int, int]:
    """Fork a process that runs ``work(pipe)`` as user nobody (the pipe's write end); returns its pid and the
    read end."""
    if os.geteuid() != 0 or not hasattr(socket, "SO_PEERCRED"):
        skip_or_fail("acting as another user needs root, and the peer check Linux's SO_PEERCRED")
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # only socket calls and os._exit here: the test process has threads
        try:
            os.close(r)
            os.setgid(NOBODY)
            os.setuid(NOBODY)
            work(w)
        except BaseException as e:  # said on the pipe: the test then fails on what it reads
            os.write(w, f"error: {e!r}".encode())
        finally:
            os._exit(0)
    os.close(w)
    return pid, r


def test_the_logger_reads_nothing_from_another_users_process(store, here):
    """An abstract socket has no file permissions: another user's process can connect to the logger, whose
    messages are pickles. It is closed before a byte of it is read, and the logger serves on."""
    from deeplab import tracking

    here("download")
    (logger,) = _loggers(store)
    marker = store / "pwned"  # store is root's private tmp folder: only a process of root's can create this
    address = tracking._address(tracking.tracking_uri())

    def attack(w: int) -> None:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.connect(address)
        s.settimeout(30)
        try:
            s.sendall(pickle.dumps(_Touch(marker)))  # as the opening message, the first the logger loads
            got = s.recv(1)
        except OSError:  # reset or broken pipe: closed by the logger
            got = b""
        os.write(w, b"got:" + got)

    pid, r = _as_nobody(attack)
    with os.fdopen(r, "rb") as f:
        seen = f.read()
    os.waitpid(pid, 0)
    assert seen == b"got:"  # no handshake: closed unanswered
    time.sleep(1)
    assert not marker.exists()
    here("prepare")
    assert _loggers(store) == [logger]
    assert [r.info.status for r in _runs(store, "stage")] == ["FINISHED", "FINISHED"]


def test_a_stage_sends_nothing_to_another_users_process_on_the_loggers_name(store):
    """Another user's process that bound the logger's name first gets nothing of the stage's run, and the
    stage loads nothing it answers: it fails, naming the uid."""
    from deeplab import tracking

    uri = f"sqlite:///{store / 'other.db'}"
    marker, address = store / "pwned", tracking._address(uri)

    def squat(w: int) -> None:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.bind(address)
        s.listen(1)
        os.write(w, b"r")
        s.settimeout(60)
        conn, _ = s.accept()
        conn.settimeout(5)
        try:
            conn.sendall(b"+" + pickle.dumps(_Touch(marker)))
            got = conn.recv(1 << 16)
        except OSError:  # broken pipe or reset: the stage hung up
            got = b""
        os.write(w, b"got:" + got)

    pid, r = _as_nobody(squat)
    with os.fdopen(r, "rb") as f:
        assert f.read(1) == b"r"
        with pytest.raises(RuntimeError, match=rf"held by a process of another user \(uid {NOBODY}\)"):
            tracking.RunLogger("train", uri, {"stage": "train", "params": {"secret": 1}})
        seen = f.read()
    os.waitpid(pid, 0)
    assert seen == b"got:"  # not one byte of the run
    assert not marker.exists()
    assert not (store / "other.db").exists()  # and no logger was started for the store meanwhile
