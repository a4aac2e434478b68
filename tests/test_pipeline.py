"""End to end: the real `dvc repro` on a tiny preset in a temporary git repository.

The tests that only read the run use conftest's shared ``tiny_pipeline``; those that change params or rerun
stages work on a private copy of it (``project``), so each starts from the same committed run."""

import json

import numpy as np
import pytest
import torch
import yaml

from tests.conftest import ALL_STAGES, NO_TRACKING, copy_project, make_project, sh, stages_run, tiny_params


@pytest.fixture
def project(tiny_pipeline, tmp_path):
    """This test's own copy of the shared run (committed, up to date), free to change."""
    return copy_project(tiny_pipeline, tmp_path / "repo")


def test_outputs_and_metrics(tiny_pipeline):
    project = tiny_pipeline
    p = tiny_params()
    n_classes = p["dataset"]["n_classes"]
    logits = sorted((project / "data" / "logits").glob("*.npy"))
    assert len(logits) == p["dataset"]["synthetic"]["n_val"]
    arr = np.load(logits[0])
    assert arr.dtype == np.float16 and arr.shape == (n_classes, 9, 9)  # 64 px at output stride 8
    for kind in ("raw", "crf"):
        s = json.loads((project / "metrics" / kind / "scores.json").read_text())
        assert set(s) == {"pixel_accuracy", "mean_accuracy", "mean_iou", "fw_iou"}
        assert 0 <= s["mean_iou"] <= 1
        rows = (project / "metrics" / kind / "class_iou.csv").read_text().splitlines()
        assert rows[0] == "class,iou" and len(rows) == n_classes + 1
        assert (project / "metrics" / kind / "confusion.png").stat().st_size > 1000
        assert len(list((project / "data" / "predictions" / kind).glob("*.png"))) == 4
    log = (project / "metrics" / "train_log.csv").read_text().splitlines()
    assert len(log) == 1 + p["train"]["iterations"]
    status = sh(project, "dvc", "status")
    assert "up to date" in status.stdout
    shown = json.loads(sh(project, "dvc", "metrics", "show", "--json").stdout)
    assert "metrics/crf/scores.json" in json.dumps(shown)


def test_noop_repro_runs_nothing(tiny_pipeline):
    assert stages_run(sh(tiny_pipeline, "dvc", "repro").stdout) == []


def test_mlflow_store_has_linked_runs(tiny_pipeline):
    project = tiny_pipeline
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{project / 'mlflow.db'}")
    exp = client.get_experiment_by_name("deeplab")
    runs = client.search_runs([exp.experiment_id], "tags.`deeplab.role` = 'stage'")
    by_stage = {r.data.tags["deeplab.stage"]: r for r in runs}
    assert set(by_stage) >= ALL_STAGES
    parents = {r.data.tags["mlflow.parentRunId"] for r in runs}
    assert len(parents) == 1
    parent = client.get_run(parents.pop())
    assert parent.data.tags["deeplab.role"] == "pipeline"
    commit = sh(project, "git", "rev-list", "--max-parents=0", "HEAD").stdout.strip()
    assert all(r.data.tags["git.commit"] == commit for r in runs)
    train = by_stage["train"]
    assert train.data.params["train.iterations"] == "40"
    history = client.get_metric_history(train.info.run_id, "train_loss")
    assert [m.step for m in history] == [10, 20, 30, 40]
    lock = yaml.safe_load((project / "dvc.lock").read_text())
    final_md5 = next(o["md5"] for o in lock["stages"]["train"]["outs"] if o["path"] == "data/models/final.pt")
    assert train.data.tags["weights.final.md5"] == final_md5
    assert train.data.tags["torch.cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    assert train.data.tags["torch.num_threads"] == str(torch.get_num_threads())  # the stage inherits OMP_NUM_THREADS
    ev = by_stage["evaluate@crf"].data.metrics
    crf_scores = json.loads((project / "metrics" / "crf" / "scores.json").read_text())
    assert ev["crf_mean_iou"] == pytest.approx(crf_scores["mean_iou"])
    n_val = tiny_params()["dataset"]["synthetic"]["n_val"]
    assert ev["crf_n_images"] == by_stage["evaluate@raw"].data.metrics["raw_n_images"] == n_val
    artifacts = [a.path for a in client.list_artifacts(by_stage["evaluate@crf"].info.run_id, "metrics/crf")]
    assert "metrics/crf/scores.json" in artifacts and "metrics/crf/confusion.png" in artifacts


def test_crf_param_change_reruns_only_crf_and_evaluate(project):
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["crf"]["iterations"] = 3
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    res = sh(project, "dvc", "repro", env=NO_TRACKING)
    assert sorted(stages_run(res.stdout)) == ["crf", "evaluate@crf"]
    diff = sh(project, "dvc", "params", "diff", "--json").stdout
    change = json.loads(diff)["params.yaml"]["crf.iterations"]
    assert (change["old"], change["new"]) == (10, 3)
    metrics = json.loads(sh(project, "dvc", "metrics", "diff", "--all", "--json").stdout)
    assert "mean_iou" in metrics["metrics/crf/scores.json"]


def test_train_param_change_does_not_rerun_data_stages(project):
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["train"]["iterations"] = 2  # any change of a train param; few iterations, as few seconds
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    ran = set(stages_run(sh(project, "dvc", "repro", env=NO_TRACKING).stdout))
    # init also reads train.crop_size (BN calibration crops), nothing else of train
    assert ran == {"train", "logits", "crf", "evaluate@raw", "evaluate@crf"}


def test_exp_run_temp_logs_into_main_store(project):
    res = sh(project, "dvc", "exp", "run", "--temp", "-S", "crf.bi_w=2", "-n", "bi2")
    assert "crf" in res.stdout
    shown = json.loads(sh(project, "dvc", "exp", "show", "--json").stdout)
    exps = [e for row in shown for e in (row.get("experiments") or []) if e["name"] == "bi2"]
    assert exps
    params = exps[0]["revs"][0]["data"]["params"]["params.yaml"]["data"]
    assert params["crf"]["bi_w"] == 2
    assert "metrics/crf/scores.json" in exps[0]["revs"][0]["data"]["metrics"]
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{project / 'mlflow.db'}")
    exp = client.get_experiment_by_name("deeplab")
    runs = client.search_runs([exp.experiment_id], "tags.`dvc.exp_name` = 'bi2'")
    assert {r.data.tags["deeplab.stage"] for r in runs if r.data.tags.get("deeplab.role") == "stage"} == {
        "crf", "evaluate@crf"}


def test_bad_params_fail_cleanly_without_output(tmp_path):
    root = make_project(tmp_path / "repo", tiny_params())
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["dataset"]["synthetic"]["n_trian"] = 5
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    res = sh(root, "python", "-m", "stages.download", check=False)
    assert res.returncode == 1
    assert "dataset.synthetic.n_trian: unknown key" in res.stderr
    assert "Traceback" not in res.stderr
    assert not (root / "data").exists()


def test_logits_sharded_over_two_processes_match(project):
    before = {p.name: np.load(p) for p in (project / "data" / "logits").glob("*.npy")}
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["logits"]["nproc_per_node"] = 2
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    res = sh(project, "dvc", "repro", env=NO_TRACKING)
    # torchrun workers run one thread each, so float sums may differ in the last bit and DVC may see new
    # logits; the values must still match to float16 precision, for every image.
    assert stages_run(res.stdout)[0] == "logits" and "torch.distributed.run" in res.stderr
    after = {p.name: np.load(p) for p in (project / "data" / "logits").glob("*.npy")}
    assert after.keys() == before.keys()
    for k in before:
        np.testing.assert_allclose(after[k].astype(np.float32), before[k].astype(np.float32), rtol=2e-3,
                                   atol=2e-3)
