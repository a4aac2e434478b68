from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
VOC_FIXTURES = SHARED / "fixtures" / "voc2012"
PROTOTXT = SHARED / "fixtures" / "deeplab_v2_prototxt" / "deploy.prototxt"

# What a pipeline run needs from the project: code, pipeline definition, DVC config.
PROJECT_FILES = ["deeplab", "stages", "dvc.yaml", ".dvc/config", ".gitignore", "params.yaml"]


@contextlib.contextmanager
def torch_threads(n: int):
    """torch's intra-op thread count set to ``n`` inside the block, restored after (torch imported here: this
    module is imported by every test process, most of which need no torch)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def tiny_params(**overrides: object) -> dict:
    """The default params shrunk so the whole pipeline runs in well under a minute of compute."""
    p = yaml.safe_load((REPO / "params.yaml").read_text())
    p["dataset"]["synthetic"].update(n_train=12, n_val=4, height=64, width=64)
    p["model"].update(n_blocks=[1, 1, 1, 1], width=8)
    p["train"].update(iterations=40, batch_size=2, iter_size=1, crop_size=49, checkpoint_every=20, log_every=10)
    # One CRF job: 2 would start loky workers (~6 s of CPU a crf stage, more than its tiny CRF work); the
    # parallel path is tests/test_crf.py's (loky and Dask at n_jobs=2, errors re-raised from a worker).
    p["crf"].update(n_jobs=1)
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


# For stages run where MLflow is not under test: each stage process then skips MLflow's import and store
# (2-3 s of CPU; ~5 s for a whole pipeline in one process).
NO_TRACKING = {"DEEPLAB_TRACKING": "off"}


def sh(root: Path, *cmd: str, check: bool = True, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """Run ``cmd`` in ``root`` (run_env, updated by ``env``: e.g. DEEPLAB_TRACKING=off where MLflow is not under
    test, 2-3 s of MLflow start-up saved in every stage process)."""
    res = subprocess.run(cmd, cwd=root, env={**run_env(root), **(env or {})}, capture_output=True, text=True)
    if check and res.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({res.returncode}):\n{res.stdout[-4000:]}\n{res.stderr[-4000:]}")
    return res


_CONFIG: pytest.Config | None = None  # this run's, for its temporary folder


def pytest_configure(config: pytest.Config) -> None:
    global _CONFIG
    _CONFIG = config
    # One intra-op thread in every test process and what it starts (set before anything imports torch; xdist's
    # workers and every stage inherit it): the two workers already keep both cores busy, and the thread pools of
    # torch and OpenBLAS at the suite's tiny sizes spend more CPU waiting on each other than they save (the tiny
    # pipeline's train stage: 4.9 s of CPU with 1 thread, 6.5 s with 2, alone on the machine).
    os.environ.setdefault("OMP_NUM_THREADS", "1")


def _shared_tmp() -> Path | None:
    """This test run's temporary folder, shared by the xdist workers; None outside pytest."""
    if _CONFIG is None or not hasattr(_CONFIG, "_tmp_path_factory"):
        return None
    base = _CONFIG._tmp_path_factory.getbasetemp()
    return base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base


def empty_store() -> Path | None:
    """An MLflow SQLite store as the first tracked stage run creates it, before it writes anything: tables made
    by MLflow's own migrations and its Default experiment. Built once per test run (under a file lock shared by
    the xdist workers): the migrations are ~1 s of CPU in every project otherwise. None outside pytest."""
    shared = _shared_tmp()
    if shared is None:
        return None
    db = shared / "empty-mlflow-store" / "mlflow.db"
    if not db.exists():
        with open(shared / "empty-mlflow-store.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if not db.exists():
                building = db.parent / "building"
                shutil.rmtree(building, ignore_errors=True)
                building.mkdir(parents=True)
                res = subprocess.run([sys.executable, "-c", "import sys; from deeplab.tracking import client; "
                                      "client(sys.argv[1])", f"sqlite:///{building / 'mlflow.db'}"], cwd=REPO,
                                     env=run_env(building), capture_output=True, text=True)
                assert res.returncode == 0, res.stderr[-3000:]
                os.replace(building / "mlflow.db", db)
    return db


def _copy_empty_store(root: Path) -> None:
    """``empty_store()`` as ``root/mlflow.db``, its Default experiment made where and when MLflow would make it
    there (the stages run in ``root``): the stages see the store the second stage of a pipeline sees, and create
    the "deeplab" experiment and its tags themselves."""
    template = empty_store()
    if template is None:
        return
    shutil.copyfile(template, root / "mlflow.db")
    con = sqlite3.connect(root / "mlflow.db")
    with con:
        now = int(time.time() * 1000)
        con.execute("UPDATE experiments SET artifact_location = ?, creation_time = ?, last_update_time = ? "
                    "WHERE experiment_id = 0", (str(root.resolve() / "mlruns" / "0"), now, now))
    con.close()


def make_project(root: Path, params: dict, mlflow_store: bool = True) -> Path:
    """A git repository holding this project's pipeline with ``params``, committed. With ``mlflow_store`` its
    mlflow.db is there already, empty (``_copy_empty_store``); a test that checks that nothing created one
    passes False."""
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
    if mlflow_store:
        _copy_empty_store(root)
    return root


def stages_run(output: str) -> list[str]:
    return [line.split("'")[1] for line in output.splitlines() if line.startswith("Running stage '")]


def pipeline_commands(root: Path) -> list[tuple[str, str]]:
    """(stage name, command) for every stage of root's dvc.yaml, foreach expanded, in file order (which
    dvc.yaml keeps topological: each stage after the stages it depends on)."""
    out = []
    for name, spec in yaml.safe_load((root / "dvc.yaml").read_text())["stages"].items():
        if "foreach" in spec:
            out += [(f"{name}@{item}", spec["do"]["cmd"].replace("${item}", str(item))) for item in spec["foreach"]]
        else:
            out.append((name, spec["cmd"]))
    return out


# Runs `python -m <stage> <args>` commands one after another in this one process, as their __main__.
_STAGE_DRIVER = """
import runpy, sys
for name, cmd in zip(sys.argv[1::2], sys.argv[2::2]):
    python, dash_m, module, *args = cmd.split()
    assert (python, dash_m) == ("python", "-m"), cmd
    print(f"Running stage '{name}':", flush=True)
    sys.argv = [module, *args]
    try:
        runpy.run_module(module, run_name="__main__", alter_sys=True)
    except SystemExit as e:
        if e.code not in (0, None):
            sys.exit(f"stage {name} failed: {e.code}")
"""


def run_stages(root: Path, *names: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """Run the stages of root's dvc.yaml (only ``names`` if given) in order, in ONE Python process: for tests
    where the stages' work is under test and DVC is not (tests/test_pipeline.py tests `dvc repro` itself).
    Each stage otherwise pays its own interpreter, torch and MLflow start-up. Prints DVC's
    "Running stage '<name>':" lines."""
    stages = pipeline_commands(root)
    unknown = set(names) - {name for name, _ in stages}
    assert not unknown, f"no such stages in dvc.yaml: {sorted(unknown)}"
    args = [part for stage in stages if not names or stage[0] in names for part in stage]
    cmd = [sys.executable, "-c", _STAGE_DRIVER, *args]
    # Output to files, not pipes, and the process group killed after: a driver that dies midway (a signal)
    # leaves joblib's loky workers behind, holding inherited pipes open until their 300 s idle timeout.
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(cmd, cwd=root, env={**run_env(root), **(env or {})}, stdout=out, stderr=err, text=True,
                                start_new_session=True)
        try:
            code = proc.wait()
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
        out.seek(0)
        err.seek(0)
        res = subprocess.CompletedProcess(cmd, code, out.read(), err.read())
    if code != 0:
        raise AssertionError(f"stages {[n for n, _ in stages if not names or n in names]} failed ({code}):\n"
                             f"{res.stdout[-4000:]}\n{res.stderr[-4000:]}")
    return res


ALL_STAGES = frozenset({"download", "prepare", "init", "train", "logits", "crf", "evaluate@raw", "evaluate@crf"})


def copy_project(src: Path, dst: Path) -> Path:
    """A self-contained copy of a project that has run: git repository, DVC cache and outputs, MLflow store.

    DVC's per-checkout state (.dvc/tmp, the site cache) stays behind: DVC rebuilds it. The MLflow store records
    absolute artifact locations (deeplab/tracking.py puts them beside the database), so they are moved to the
    copy's own mlartifacts folder: runs logged in the copy never write into ``src``."""
    shutil.copytree(src, dst, ignore=lambda d, names: [n for n in names if (Path(d) / n) in
                                                        (src / ".site-cache", src / ".dvc" / "tmp")])
    db = dst / "mlflow.db"
    if db.exists():
        old, new = (src / "mlartifacts").as_uri(), (dst / "mlartifacts").as_uri()
        con = sqlite3.connect(db)
        with con:
            con.execute("UPDATE experiments SET artifact_location = replace(artifact_location, ?, ?)", (old, new))
            con.execute("UPDATE runs SET artifact_uri = replace(artifact_uri, ?, ?)", (old, new))
        con.close()
    return dst


def _build_tiny_pipeline(built: Path, locked: Callable[[], None] = lambda: None) -> None:
    """Build the shared run at ``built`` unless it is there; under an exclusive lock beside it (``locked`` is
    called once it is held)."""
    with open(built.parent.parent / "tiny-pipeline.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        locked()
        if (built.parent / "done").exists():
            return
        shutil.rmtree(built.parent, ignore_errors=True)
        make_project(built, tiny_params())
        res = sh(built, "dvc", "repro")
        assert set(stages_run(res.stdout)) == ALL_STAGES, res.stdout[-3000:]
        sh(built, "git", "add", "-A")
        sh(built, "git", "commit", "-q", "-m", "ran the pipeline")
        (built.parent / "done").touch()


def pytest_sessionstart(session: pytest.Session) -> None:
    """Under pytest-xdist the controller, otherwise idle, builds the shared run in the background while the
    workers run the tests that do not need it (those that do are collected last, below)."""
    if os.environ.get("PYTEST_XDIST_WORKER") or not getattr(session.config.option, "numprocesses", None):
        return
    built = session.config._tmp_path_factory.getbasetemp() / "tiny-pipeline-built" / "repo"
    started = threading.Event()

    def build() -> None:
        try:
            _build_tiny_pipeline(built, started.set)
        except Exception:  # the first worker that needs it builds it again and shows the failure
            pass
        finally:
            started.set()

    threading.Thread(target=build, daemon=True).start()
    started.wait()  # the lock is held before any worker starts


# Rough seconds of the slow tests (a 2-core run under xdist, every parameter alike), for the order below only: a
# missing or stale entry costs some wall time, never a result.
SLOW_TESTS = {
    "test_crf_search.py::test_crf_grid_search_through_the_dvc_queue": 50,
    "test_bench.py::test_device_check_quick_runs_every_step": 58,
    "test_custom_dataset.py::test_custom_dataset_through_dvc_repro[mmseg]": 39,  # reruns after a class-file edit
    "test_custom_dataset.py::test_custom_dataset_through_dvc_repro": 23,
    "test_released.py::test_released_weights_score_without_training": 25,
    "test_bench.py::test_dvc_scale_bench_smoke": 33, "test_coco21.py::test_dvc_repro_to_metrics": 15,
    "test_crf.py::test_dask_cluster_gives_the_loky_labels": 20,
    "test_deeplabv3.py::test_whole_tiny_pipeline_runs_with_v3_archs": 15,
    "test_distributed.py::test_kill_9_then_resume_matches_uninterrupted": 23,
    "test_released.py::test_scoring_the_train_val_caffemodel_on_voc_val_warns": 12,
    "test_datasets_pipeline.py::test_pipeline_on_fixture_dataset": 12,
    "test_tracking.py::test_stages_share_one_logger_that_ends_when_idle": 13,
    "test_pipeline.py::test_exp_run_temp_logs_into_main_store": 17,
    "test_pipeline.py::test_train_param_change_does_not_rerun_data_stages": 15,
    "test_distributed.py::test_two_gloo_processes_stay_in_sync": 10,
    "test_distributed.py::test_torchrun_training_logs_the_last_iteration_to_mlflow": 19,
    "test_pipeline.py::test_logits_sharded_over_two_processes_match": 15,
    "test_pipeline_faults.py::test_killed_crf_resumes_under_dvc_repro_and_never_reuses_other_params": 24,
    "test_train.py::test_train_stage_resumed_after_sigterm_logs_the_whole_loss_series": 14,
    "test_bench.py::test_bench_prints_one_json_line": 8,
    "test_init_stage.py": 6, "test_tracking.py": 5,  # each test of these modules
}
# Modules whose tests share a module-scoped fixture, with their rough seconds: each is one xdist work unit
# (pytest_xdist_make_scheduler), so the fixture is built once, not on each worker.
GROUPED = {"test_dvc_scale.py": 48, "test_readme.py": 40, "test_ui.py": 25, "test_remote.py": 7, "test_caffe.py": 5}


def _module(nodeid: str) -> str:
    return nodeid.split("::")[0].split("/")[-1]


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config: pytest.Config, log: object) -> object | None:
    """xdist's default (``load``) hands out tests one by one, which would build a GROUPED module's fixture on both
    workers; its ``loadgroup`` would not (xdist 3.8 renames the tests, which pytest 9 ignores). So: one work unit
    per GROUPED module, one per test otherwise, handed out in collection order (``--no-loadscope-reorder``)."""
    if config.getvalue("dist") != "load":
        return None
    from xdist.scheduler import LoadScopeScheduling

    class Scheduler(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return _module(nodeid) if _module(nodeid) in GROUPED else nodeid

    config.option.loadscopereorder = False
    return Scheduler(config, log)


def _weight(nodeid: str) -> float:
    """SLOW_TESTS' seconds for the test with its parameters, else for the test, else for its module."""
    test = nodeid.split("/")[-1]
    name = test.split("[")[0]
    return SLOW_TESTS.get(test, SLOW_TESTS.get(name, SLOW_TESTS.get(name.split("::")[0], 0.5)))


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Order for 2 xdist workers: the run ends when its last test does, so the slow work units go first, longest
    first (a long one started last runs on alone), then the rest; within each, the tests that read the shared run
    after those that do not, so it is built meanwhile (by the controller: pytest_sessionstart). A stable sort
    keeps every worker's collection in the same order."""
    units: dict[str, list[pytest.Item]] = {}
    for item in items:
        units.setdefault(_module(item.nodeid) if _module(item.nodeid) in GROUPED else item.nodeid, []).append(item)

    def key(unit: list[pytest.Item]) -> tuple[bool, bool, float]:
        module = _module(unit[0].nodeid)
        weight = GROUPED[module] if module in GROUPED else _weight(unit[0].nodeid)
        shared = any("tiny_pipeline" in getattr(item, "fixturenames", ()) for item in unit)
        slow = weight >= 10
        return not slow, shared, -weight if slow else 0

    items[:] = [item for unit in sorted(units.values(), key=key) for item in unit]


@pytest.fixture(scope="session")
def tiny_pipeline(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One real `dvc repro` of ``tiny_params()``, committed, built once per test run and shared by every test
    that only reads its outputs, DVC metadata or MLflow store. A test that changes anything (params, a rerun,
    an experiment, a remote) works on ``copy_project(tiny_pipeline, tmp_path / "repo")`` instead.

    Under pytest-xdist it is built in the run's shared temporary folder (by the controller, or the first worker
    to need it, while the others wait on a file lock); each worker then works on its own copy, so no two
    workers' DVC commands contend for one repository's lock."""
    base = tmp_path_factory.getbasetemp()
    shared = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base  # this run's folder under xdist
    built = shared / "tiny-pipeline-built" / "repo"
    _build_tiny_pipeline(built)
    if shared == base:
        return built
    return copy_project(built, tmp_path_factory.mktemp("tiny-pipeline") / "repo")


def in_ci() -> bool:
    """CI (.ci/run runs with CI=true) has every fixture and tool installed: a missing one is a failure there."""
    return os.environ.get("CI", "").lower() not in ("", "0", "false")


def skip_or_fail(reason: str) -> None:
    """Skip where a developer may lack ``reason``'s fixture or tool; fail in CI, where a skip would hide it."""
    if in_ci():
        pytest.fail(f"{reason} (CI=true: CI must run this test)")
    pytest.skip(reason)


@pytest.fixture
def voc_fixtures() -> Path:
    if not VOC_FIXTURES.is_dir():
        skip_or_fail(f"shared fixtures not found at {VOC_FIXTURES}")
    return VOC_FIXTURES
