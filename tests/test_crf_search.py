"""The README's CRF parameter search, for real: `crf.subset` on part of the validation set, a grid queued
through DVC's experiment queue and run by `dvc queue start`, ranked by `dvc exp show`, with one MLflow run per
grid point. The README's own command lines are run (the grid shrunk to 2x1), on a copy of the shared tiny
pipeline, so nothing upstream of the CRF is trained again."""

from __future__ import annotations

import contextlib
import csv
import io
import json
import time
from pathlib import Path

import yaml
from mlflow.tracking import MlflowClient

from deeplab.data import read_list
from deeplab.metrics import accumulate, scores
from tests.conftest import copy_project, sh, stages_run
from tests.test_readme import readme_commands

SUBSET = 2  # of the tiny pipeline's 4 validation images
GRID = {"crf.bi_w": [3, 5], "crf.bi_xy_std": [50]}


def _with_values(cmd: list[str], values: dict[str, str]) -> list[str]:
    """``cmd`` with the value of each ``-S key=value`` replaced; every key must be one the README sets."""
    out = list(cmd)
    keys = set()
    for i, arg in enumerate(cmd[:-1]):
        if arg == "-S":
            key = cmd[i + 1].split("=")[0]
            keys.add(key)
            out[i + 1] = f"{key}={values[key]}"
    assert keys == set(values), f"README sets {sorted(keys)}, the test expects {sorted(values)}"
    return out


def _wait_for_queue(root: Path, names: list[str], timeout: float = 1200) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = sh(root, "dvc", "queue", "status").stdout
        rows = {line.split()[1]: line.split()[-1] for line in status.splitlines() if line.split()[1:2] and
                line.split()[1] in names}
        if len(rows) == len(names) and all(s in ("Success", "Failed") for s in rows.values()):
            assert set(rows.values()) == {"Success"}, status + "".join(
                sh(root, "dvc", "queue", "logs", n, check=False).stdout[-3000:] for n in names)
            return
        time.sleep(3)
    raise AssertionError(f"queued experiments still running after {timeout} s:\n{status}")


def test_crf_grid_search_through_the_dvc_queue(tiny_pipeline, tmp_path):
    root = copy_project(tiny_pipeline, tmp_path / "repo")
    items = read_list(root / "data" / "prepared" / "val.txt")
    n_classes = yaml.safe_load((root / "params.yaml").read_text())["dataset"]["n_classes"]
    assert len(items) > SUBSET

    # 1. The search subset, in the workspace: crf and both evaluate stages on the first SUBSET images.
    [subset_cmd] = readme_commands("dvc exp run -S crf.subset=")
    res = sh(root, *_with_values(subset_cmd, {"crf.subset": str(SUBSET)}))
    assert stages_run(res.stdout) == ["crf", "evaluate@raw", "evaluate@crf"]
    assert sorted(p.stem for p in (root / "data/predictions/crf").iterdir()) == sorted(
        it.image_id for it in items[:SUBSET])
    for kind in ("raw", "crf"):
        scored = json.loads((root / f"metrics/{kind}/scores.json").read_text())
        with contextlib.chdir(root):  # the lists hold paths relative to the project
            first = scores(accumulate(items[:SUBSET], Path("data/predictions") / kind, n_classes))
        assert scored["mean_iou"] == first["mean_iou"] and scored["pixel_accuracy"] == first["pixel_accuracy"]

    # 2. The grid through DVC's queue: queued from the workspace, so every run inherits the subset.
    queue_cmd, start_cmd = readme_commands("dvc exp run -S 'crf.bi_w=")
    assert "--queue" in queue_cmd and start_cmd == ["dvc", "queue", "start"]
    queued = sh(root, *_with_values(queue_cmd, {k: ",".join(map(str, v)) for k, v in GRID.items()})).stdout
    names = [line.split("'")[1] for line in queued.splitlines() if line.startswith("Queued experiment '")]
    assert len(names) == 2, queued
    sh(root, *start_cmd)
    _wait_for_queue(root, names)

    # Only crf and evaluate@crf ran in each.
    for name in names:
        assert stages_run(sh(root, "dvc", "queue", "logs", name).stdout) == ["crf", "evaluate@crf"], name

    shown = json.loads(sh(root, "dvc", "exp", "show", "--json").stdout)
    found = {}
    for row in shown:
        for exp in row.get("experiments") or []:
            if exp["name"] in names:
                data = exp["revs"][0]["data"]
                found[exp["name"]] = (data["params"]["params.yaml"]["data"]["crf"],
                                      data["metrics"]["metrics/crf/scores.json"]["data"]["mean_iou"])
    assert sorted((c["bi_w"], c["bi_xy_std"], c["subset"]) for c, _ in found.values()) == [
        (3, 50, SUBSET), (5, 50, SUBSET)]
    assert yaml.safe_load((root / "params.yaml").read_text())["crf"]["subset"] == SUBSET  # workspace left alone

    # 3. The README's ranking: best CRF mean IoU first.
    [rank_cmd] = readme_commands("dvc exp show --sort-by")
    table = list(csv.DictReader(io.StringIO(sh(root, *rank_cmd, "--csv").stdout)))
    ranked = [(r["Experiment"], float(r["metrics/crf/scores.json:mean_iou"])) for r in table
              if r["Experiment"] in names]
    assert sorted(n for n, _ in ranked) == sorted(names) and all(found[n][1] == v for n, v in ranked)
    assert [v for _, v in ranked] == sorted((v for _, v in ranked), reverse=True)

    # 4. MLflow: one crf run per grid point with its params, and its evaluate@crf run under the same parent.
    client = MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
    exp_id = client.get_experiment_by_name("deeplab").experiment_id
    for name, (crf, mean_iou) in found.items():
        def runs(stage: str, name: str = name) -> list:
            return client.search_runs([exp_id], f"tags.`dvc.exp_name` = '{name}' and tags.`deeplab.stage` = "
                                      f"'{stage}'")
        [crf_run], [eval_run] = runs("crf"), runs("evaluate@crf")
        assert runs("evaluate@raw") == [] and runs("train") == []
        params = crf_run.data.params
        assert (float(params["crf.bi_w"]), float(params["crf.bi_xy_std"]), params["crf.subset"]) == (
            crf["bi_w"], crf["bi_xy_std"], str(SUBSET))
        assert crf_run.info.status == eval_run.info.status == "FINISHED"
        assert eval_run.data.metrics["crf_mean_iou"] == mean_iou and eval_run.data.params["crf.subset"] == str(SUBSET)
        assert eval_run.data.metrics["crf_n_images"] == SUBSET  # the images scored, as the metric says
        assert crf_run.data.tags["mlflow.parentRunId"] == eval_run.data.tags["mlflow.parentRunId"]
