"""What a person sees: the MLflow UI (REST API, rendered run page) and `dvc plots show`, on one tiny pipeline run.

The MLflow server and headless Chromium only ever talk to 127.0.0.1: the server binds loopback, telemetry is off,
and Chromium gets its background networking disabled and every host name but 127.0.0.1 mapped to "not found".
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from tests.conftest import ALL_STAGES as STAGES
from tests.conftest import run_env, sh, skip_or_fail, tiny_params

CHROMIUM = Path("/usr/bin/chromium")
HEALTH_TIMEOUT_S = 120  # 4-18 s on an idle 2-core machine; much more while other jobs load it


@pytest.fixture(scope="module")
def project(tiny_pipeline) -> Path:
    """The shared tiny run (conftest): these tests only read its outputs and MLflow store."""
    return tiny_pipeline


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(project, tmp_path_factory):
    """`mlflow server` on the project's SQLite store; yields its base URL and stops it afterwards.

    Artifacts: the experiment's artifact location is an absolute file:// URI (<root>/mlartifacts, see
    deeplab/tracking.py). For such roots the server reads the files itself: /api/2.0/mlflow/artifacts/list and
    /get-artifact?run_uuid=...&path=... work as they are (that is also what the UI's artifact browser calls).
    --serve-artifacts (the default) only matters for mlflow-artifacts:/ roots; --artifacts-destination points it
    at the same folder so the server never creates an ./mlartifacts of its own elsewhere.
    """
    port = _free_port()
    log = tmp_path_factory.mktemp("mlflow-server") / "server.log"
    env = run_env(project)
    env.update(MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false", MLFLOW_DISABLE_TELEMETRY="true")
    cmd = [str(Path(sys.executable).parent / "mlflow"), "server",
           "--backend-store-uri", f"sqlite:///{project / 'mlflow.db'}",
           "--artifacts-destination", (project / "mlartifacts").as_uri(),
           "--host", "127.0.0.1", "--port", str(port), "--workers", "1"]
    with open(log, "wb") as out:
        # Own process group: `mlflow server` starts uvicorn as a child; the finalizer stops both.
        proc = subprocess.Popen(cmd, cwd=project, env=env, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + HEALTH_TIMEOUT_S
        while True:
            if proc.poll() is not None:
                raise AssertionError(f"mlflow server exited with {proc.returncode}:\n{log.read_text()[-4000:]}")
            try:
                with urllib.request.urlopen(f"{base}/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise AssertionError(f"no /health after {HEALTH_TIMEOUT_S} s:\n{log.read_text()[-4000:]}")
            time.sleep(0.5)
        yield base
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


def _get(base: str, endpoint: str, query: dict[str, str] | None = None) -> bytes:
    url = f"{base}{endpoint}" + (f"?{urllib.parse.urlencode(query)}" if query else "")
    with urllib.request.urlopen(url, timeout=30) as r:
        assert r.status == 200, url
        return r.read()


def _api(base: str, endpoint: str, query: dict[str, str] | None = None, body: dict | None = None) -> dict:
    if body is None:
        return json.loads(_get(base, f"/api/2.0/mlflow/{endpoint}", query))
    req = urllib.request.Request(f"{base}/api/2.0/mlflow/{endpoint}", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"}, method="POST")
    with urllib.request.urlopen(req, timeout=30) as r:
        return json.loads(r.read())


@pytest.fixture(scope="module")
def runs(server) -> dict:
    exp = _api(server, "experiments/get-by-name", {"experiment_name": "deeplab"})["experiment"]
    found = _api(server, "runs/search", body={"experiment_ids": [exp["experiment_id"]], "max_results": 1000})["runs"]
    out: dict = {"experiment": exp, "stages": {}, "pipelines": []}
    for run in found:
        tags = {t["key"]: t["value"] for t in run["data"].get("tags", [])}
        run["tags"] = tags
        if tags.get("deeplab.role") == "pipeline":
            out["pipelines"].append(run)
        elif tags.get("deeplab.role") == "stage":
            out["stages"][tags["deeplab.stage"]] = run
    return out


def test_rest_experiment_runs_and_params(runs):
    assert runs["experiment"]["name"] == "deeplab"
    assert set(runs["stages"]) == STAGES
    assert len(runs["pipelines"]) == 1
    parent_id = runs["pipelines"][0]["info"]["run_id"]
    assert {r["tags"]["mlflow.parentRunId"] for r in runs["stages"].values()} == {parent_id}
    params = {p["key"]: p["value"] for p in runs["stages"]["train"]["data"]["params"]}
    assert params["train.iterations"] == str(tiny_params()["train"]["iterations"])
    assert params["train.log_every"] == str(tiny_params()["train"]["log_every"])


def test_rest_parent_run_carries_results_params_and_dataset(runs, project):
    # The runs table compares pipeline executions by their parent runs: results, params, dataset.
    (parent,) = runs["pipelines"]
    metrics = {m["key"]: m["value"] for m in parent["data"]["metrics"]}
    for kind in ("raw", "crf"):
        scores = json.loads((project / "metrics" / kind / "scores.json").read_text())
        for name in ("mean_iou", "pixel_accuracy"):
            assert metrics[f"{kind}_{name}"] == pytest.approx(scores[name], rel=1e-12)
    params = {p["key"]: p["value"] for p in parent["data"]["params"]}
    tiny = tiny_params()
    assert params["dataset.name"] == "synthetic" and params["model.width"] == str(tiny["model"]["width"])
    assert params["train.iterations"] == str(tiny["train"]["iterations"]) and params["init.source"] == "scratch"
    assert params["crf.iterations"] == str(tiny["crf"]["iterations"])
    (given,) = parent["inputs"]["dataset_inputs"]
    lock = yaml.safe_load((project / "dvc.lock").read_text())["stages"]
    (raw,) = [o for o in lock["download"]["outs"] if o["path"] == "data/raw"]
    assert (given["dataset"]["name"], given["dataset"]["digest"]) == ("synthetic", raw["md5"])
    synthetic = tiny["dataset"]["synthetic"]
    assert json.loads(given["dataset"]["profile"])["splits"] == {"train": synthetic["n_train"],
                                                                   "val": synthetic["n_val"]}
    assert parent["info"]["status"] == "FINISHED"


def test_rest_train_loss_history(server, runs):
    train = tiny_params()["train"]
    query = {"run_id": runs["stages"]["train"]["info"]["run_id"], "metric_key": "train_loss"}
    history = _api(server, "metrics/get-history", query)["metrics"]
    assert [m["step"] for m in history] == list(range(train["log_every"], train["iterations"] + 1, train["log_every"]))
    assert all(np.isfinite(m["value"]) and m["value"] > 0 for m in history)


def test_rest_artifacts_list_and_download(server, runs, project):
    run_id = runs["stages"]["evaluate@crf"]["info"]["run_id"]
    listed = _api(server, "artifacts/list", {"run_id": run_id, "path": "metrics/crf"})
    paths = {f["path"] for f in listed["files"]}
    assert {"metrics/crf/scores.json", "metrics/crf/confusion.png"} <= paths
    served = json.loads(_get(server, "/get-artifact", {"run_uuid": run_id, "path": "metrics/crf/scores.json"}))
    assert served == json.loads((project / "metrics" / "crf" / "scores.json").read_text())
    png = _get(server, "/get-artifact", {"run_uuid": run_id, "path": "metrics/crf/confusion.png"})
    assert png == (project / "metrics" / "crf" / "confusion.png").read_bytes()


def _chromium(tmp: Path, *args: str) -> subprocess.CompletedProcess:
    if not CHROMIUM.exists():  # .ci/run installs it (`make browser`): in CI its absence fails
        skip_or_fail(f"{CHROMIUM} not found: install Debian's chromium with `make browser` to run the UI checks")
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             "--disable-default-apps", "--disable-extensions", "--disable-dev-shm-usage", "--mute-audio",
             # nothing but loopback: a page that wants a CDN or Google service gets "host not found"
             "--host-resolver-rules=MAP * ~NOTFOUND , EXCLUDE 127.0.0.1",
             f"--user-data-dir={tmp / 'chromium-profile'}", "--window-size=1400,1800",
             # the MLflow UI is a React app that fetches the run over REST; virtual time lets it settle
             "--virtual-time-budget=20000"]
    return subprocess.run([str(CHROMIUM), *flags, *args], capture_output=True, text=True, timeout=180)


def test_run_page_renders_metrics(server, runs, project, tmp_path):
    run = runs["stages"]["evaluate@crf"]
    url = f"{server}/#/experiments/{run['info']['experiment_id']}/runs/{run['info']['run_id']}"
    expected = json.loads((project / "metrics" / "crf" / "scores.json").read_text())["mean_iou"]

    shot = tmp_path / "evaluate-crf-run.png"
    res = _chromium(tmp_path, f"--screenshot={shot}", url)
    print(f"\nscreenshot of {url}: {shot}")
    assert shot.exists(), res.stderr[-3000:]
    pixels = np.asarray(Image.open(shot).convert("L"), dtype=np.float32)
    assert pixels.shape == (1800, 1400)
    assert pixels.std() > 10 and len(np.unique(pixels)) > 50  # text, icons and panels, not a blank page

    # The overview tab lists the run's metrics in a table: <a>crf_mean_iou</a> ... <span title="0.2062...">.
    # The UI shows the full float (JS toString), so compare numerically. A slow render gets one more try.
    cell = re.compile(r">crf_mean_iou<.*?>(-?\d+(?:\.\d+)?(?:e-?\d+)?)<", re.DOTALL)
    for _ in range(2):
        dom = _chromium(tmp_path, "--dump-dom", url).stdout
        match = cell.search(dom)
        if match:
            break
    assert match, f"metric table not rendered; DOM tail:\n{dom[-3000:]}"
    assert float(match.group(1)) == pytest.approx(expected, rel=1e-6)
    assert run["info"]["run_id"] in dom and "evaluate@crf" in dom


def test_experiment_runs_tab_shows_the_runs(server, runs, tmp_path):
    # The README's way to the runs: the Runs tab's URL, or the Machine learning workflow. Plain
    # #/experiments/<id> opens MLflow 3.17's GenAI overview whatever the experiment's kind tag says.
    tags = {t["key"]: t["value"] for t in runs["experiment"]["tags"]}
    assert tags["mlflow.experimentKind"] == "custom_model_development"
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    exp_id = runs["experiment"]["experiment_id"]
    assert "http://127.0.0.1:5000/#/experiments/1/runs" in readme and exp_id == "1"
    parent = runs["pipelines"][0]["info"]["run_name"]
    dataset = runs["pipelines"][0]["inputs"]["dataset_inputs"][0]["dataset"]
    column = f"{dataset['name']} ({dataset['digest']})"  # the Dataset column: name and DVC hash
    page = f"{server}/#/experiments/{exp_id}"
    for url in (f"{page}/runs", f"{page}?workflowType=machine_learning"):
        for _ in range(2):  # a slow render gets one more try
            dom = _chromium(tmp_path, "--dump-dom", url).stdout
            if parent in dom and column in dom:
                break
        assert parent in dom, f"{url}: runs table not rendered; DOM tail:\n{dom[-3000:]}"
        assert column in dom, f"{url}: no Dataset column entry {column!r}"
        assert "No data available" not in dom


def _specs(html: str) -> dict[str, dict]:
    """The vega-lite specs `dvc plots show` embeds, keyed by the div id (the plot file path, mangled)."""
    out = {}
    for div, spec in re.findall(r'<div id = "([^"]+)">\s*<script type = "text/javascript">\s*var spec = (\{.*?\});\n',
                                html, flags=re.DOTALL):
        out[div] = json.loads(spec)
    return out


def test_dvc_plots_show(project, tmp_path):
    # vega, vega-lite and vega-embed are <script src="https://cdn.jsdelivr.net/..."> tags: offline (and with
    # traffic kept on loopback) they cannot load, so the charts would not draw in Chromium. Check the page's
    # content instead: the embedded specs carry the data of each plot, and the confusion matrix is a local image.
    out = tmp_path / "plots"
    sh(project, "dvc", "plots", "show", "-o", str(out))
    html = (out / "index.html").read_text()
    for name in ("metrics/train_log.csv", "metrics/crf/class_iou.csv", "metrics/crf/confusion.png"):
        assert name.replace("/", "_").replace(".", "_") in html, name
    specs = _specs(html)

    train = specs["metrics_train_log_csv"]
    rows = (project / "metrics" / "train_log.csv").read_text().splitlines()
    header = rows[0].split(",")
    assert len(train["data"]["values"]) == len(rows) - 1 == tiny_params()["train"]["iterations"]
    first = dict(zip(header, rows[1].split(","), strict=True))
    assert float(train["data"]["values"][0]["loss"]) == pytest.approx(float(first["loss"]))
    assert train["encoding"]["x"]["field"] == "iteration" and '"field": "loss"' in json.dumps(train["layer"])

    iou = specs["metrics_crf_class_iou_csv"]
    assert (iou["encoding"]["x"]["field"], iou["encoding"]["y"]["field"]) == ("iou", "class")
    csv_rows = [r.split(",") for r in (project / "metrics" / "crf" / "class_iou.csv").read_text().splitlines()[1:]]
    assert {v["class"]: float(v["iou"]) for v in iou["data"]["values"]} == pytest.approx(
        {c: float(v) for c, v in csv_rows})

    img = re.search(r'id="metrics_crf_confusion_png".*?<img src="([^"]+)"', html, flags=re.DOTALL)
    assert img, "confusion matrix image missing from the page"
    assert (out / img.group(1)).read_bytes() == (project / "metrics" / "crf" / "confusion.png").read_bytes()


def test_chromium_missing_skips_with_hint(monkeypatch, tmp_path):
    monkeypatch.setattr(sys.modules[__name__], "CHROMIUM", tmp_path / "no-chromium")
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception, match="make browser"):
        _chromium(tmp_path, "--version")


def test_make_browser_target_is_wired_into_ci():
    if not shutil.which("make"):
        skip_or_fail("make not installed")
    repo = Path(__file__).resolve().parents[1]
    dry = subprocess.run(["make", "-n", "browser"], cwd=repo, capture_output=True, text=True)
    assert dry.returncode == 0 and "apt-get install -y -qq chromium" in dry.stdout
    ci = (repo / ".ci" / "run").read_text()
    assert ci.index("make browser") < ci.index("make test")
