"""The benchmarks run (CPU-sized) and print one JSON line with both paths; so does every step of the GPU check
(bench/device.sh --quick)."""

import hashlib
import importlib.util
import json
import math
import subprocess
import sys

import pytest
import torch
import yaml

from tests.conftest import REPO, run_env


# 65 px crops and one profiled step (device.sh --quick's sizes): half the CPU of train.py's --quick defaults
@pytest.mark.parametrize("script,extra", [("train.py", ["--iters", "2", "--warmup", "1", "--batch", "2", "--size", "65",
                                                        "--profile", "1"]),
                                          ("infer.py", ["--images", "2", "--warmup", "1"])])
def test_bench_prints_one_json_line(tmp_path, script, extra):
    env = {**run_env(tmp_path), "PYTHONPATH": str(REPO)}
    res = subprocess.run([sys.executable, str(REPO / "bench" / script), "--quick", *extra], env=env,
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    lines = res.stdout.strip().splitlines()
    assert len(lines) == 1
    out = json.loads(lines[0])
    assert out["parity"]["images_per_s"] > 0 and out["fast"]["images_per_s"] > 0 and out["speedup"] > 0


STEPS = ["env", "wheels", "pydensecrf", "cuda_tests", "train", "infer", "crf", "stages", "train_compile",
         "train_v3plus"]


def device_sh(tmp_path, *args, budget=None):
    env = {**run_env(tmp_path), "PYTHONPATH": str(REPO)}
    env.pop("DEVICE_BUDGET_S", None)
    if budget is not None:
        env["DEVICE_BUDGET_S"] = str(budget)
    out = tmp_path / "out"
    res = subprocess.run(["bash", str(REPO / "bench" / "device.sh"), *args, str(out)], env=env, cwd=tmp_path,
                         capture_output=True, text=True, timeout=400)
    assert res.returncode == 0, res.stderr[-2000:] + res.stdout[-2000:]
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    return out, rows, res.stdout


def test_device_check_quick_runs_every_step(tmp_path):
    """bash bench/device.sh --quick: every step of the GPU check runs on CPU at toy sizes, one JSON line each."""
    out, rows, stdout = device_sh(tmp_path, "--quick")
    assert [r["step"] for r in rows] == STEPS
    by = {r["step"]: r for r in rows}
    cuda = torch.cuda.is_available()
    for r in rows:
        assert r["status"] in ("ok", "skipped"), r
        assert "extra_stdout_lines" not in r, r  # each benchmark prints one JSON line
        assert json.dumps(r) in stdout  # and device.sh prints it
    assert by["cuda_tests"]["status"] == ("ok" if cuda else "skipped")
    assert by["cuda_tests"]["failed"] == by["cuda_tests"]["errors"] == 0
    assert by["cuda_tests"]["passed"] + by["cuda_tests"]["skipped"] >= 1  # test_cuda_matches_cpu was collected
    train = by["train"]
    for mode in ("parity", "fast"):
        assert train[mode]["images_per_s"] > 0 and train[mode]["tflops"] >= 0
        assert len(train["loss_curves"][mode]) == 3  # warmup 1 + iters 2, every one finite
        assert all(math.isfinite(x) for x in train["loss_curves"][mode])
    assert train["flops_per_image"] > 0 and train["speedup"] > 0
    assert train["loss"]["fast"]["tail_rel_diff"] >= 0
    assert train["fast"]["profile"]["share_of_busy"]["conv"] > 0
    assert by["infer"]["speedup"] > 0 and 0.9 <= by["infer"]["argmax_agreement"] <= 1
    assert by["infer"]["flops_per_image"] > 0 and by["infer"]["fast"]["profile"]["share_of_busy"]
    crf = by["crf"]["results"]
    assert [r["classes"] for r in crf] == [21, 182]
    for r in crf:
        assert r["pydensecrf_1core_s"] > 0 and r["pydensecrf_joblib_s"] > 0 and r["agreement_cpu"] > 0.9
        assert (r["torch_cuda_s"] is not None) == cuda
    stages = by["stages"]
    assert list(stages["stage_s"]) == ["download", "prepare", "init", "train", "logits", "crf"]
    assert stages["loss_finite"] and stages["written"] == {"logits": 3, "predictions/raw": 3, "predictions/crf": 3}
    assert stages["train_progress"]["rate"] and stages["tracking"] == "off"
    assert stages["mlflow_db"] is False  # DEEPLAB_TRACKING=off: the stages logged nothing
    compiled = by["train_compile"]
    assert compiled["modes"] == ["fast", "compile"] and compiled["compile"]["images_per_s"] > 0
    assert compiled["compile_vs_fast"] > 0
    v3plus = by["train_v3plus"]
    assert v3plus["arch"] == "deeplabv3plus" and v3plus["output_stride"] == 16 and v3plus["modes"] == ["fast"]
    assert v3plus["fast"]["images_per_s"] > 0
    summary = (out / "summary.txt").read_text()
    assert "train fast/parity images/s" in summary and "crf 182: CUDA vs 1 pydensecrf core" in summary


def test_device_check_stays_in_its_budget(tmp_path):
    """With the time budget spent, every later step still leaves a line saying it did not run."""
    _, rows, _ = device_sh(tmp_path, "--quick", budget=1)
    assert [r["step"] for r in rows] == STEPS
    for r in rows:
        if r["step"] not in ("wheels", "pydensecrf"):  # skipped in --quick anyway
            assert r["status"] == "skipped" and r["note"].startswith("not run:"), r


def test_device_record_keeps_why_a_step_failed(tmp_path):
    spec = importlib.util.spec_from_file_location("device_report", REPO / "bench" / "device_report.py")
    report = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(report)
    results, out, err = tmp_path / "results.jsonl", tmp_path / "out", tmp_path / "err"
    out.write_text('{"bench": "train", "speedup": 3.5}\n')
    err.write_text("Traceback ...\nRuntimeError: CUDA error: out of memory\n")
    report.record(results, "train", 0, 12, 120, out, err)
    report.record(results, "infer", 1, 3, 75, tmp_path / "missing", err)
    report.record(results, "crf", 124, 150, 150, out, err)
    rows = [json.loads(line) for line in results.read_text().splitlines()]
    assert rows[0] == {"step": "train", "bench": "train", "speedup": 3.5, "status": "ok", "wall_s": 12, "limit_s": 120}
    assert rows[1]["status"] == "failed" and rows[1]["rc"] == 1 and "out of memory" in rows[1]["stderr_tail"]
    assert rows[2]["status"] == "timeout" and rows[2]["speedup"] == 3.5  # what it printed before the kill is kept


@pytest.mark.parametrize("layout", ["repo", "outside"])
def test_dvc_scale_bench_smoke(tmp_path, layout):
    """bench/dvc_scale.py at a few dozen files: one JSON line with every row of issue 15's table, and the crf
    experiment reran nothing before crf; with --outside the dataset folder is prepare's dependency alone."""
    env = {**run_env(tmp_path), "PYTHONPATH": str(REPO)}
    res = subprocess.run([sys.executable, str(REPO / "bench" / "dvc_scale.py"), "--files", "40",
                          "--workdir", str(tmp_path / "work"), *(["--outside"] if layout == "outside" else [])],
                         env=env, capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stderr[-2000:] + res.stdout[-2000:]
    lines = res.stdout.strip().splitlines()
    assert len(lines) == 1
    out = json.loads(lines[0])
    assert out["files"] == 40
    stages = ["prepare", "init", "train", "logits", "crf", "evaluate@raw", "evaluate@crf"]
    assert out["full_repro"]["ran"] == (["download", *stages] if layout == "outside" else stages)
    # evaluate@crf follows when the new maps differ (at this size they may come out the same)
    assert out["noop_repro"]["ran"] == [] and out["crf_exp"]["ran"] in (["crf"], ["crf", "evaluate@crf"])
    first = "first_hash" if layout == "outside" else "commit_raw"
    for row in (first, "full_repro", "noop_repro", "status", "crf_exp"):
        assert out[row]["s"] > 0 and out[row]["dvc_s"] > 0 and out[row]["peak_mb"] > 0, row
    assert 0 < out["full_repro"]["stages_s"] < out["full_repro"]["s"]
    assert out["disk_mb"]["data+cache"] > 0 and out["peak_mb"] >= out["noop_repro"]["peak_mb"]
    if layout == "outside":
        lock = yaml.safe_load((tmp_path / "work" / "repo" / "dvc.lock").read_text())["stages"]
        dataset = str(tmp_path / "work" / "dataset")
        assert [d["nfiles"] for d in lock["prepare"]["deps"] if d["path"] == dataset] == [40]
        assert out["disk_mb"]["dataset"] > 0
        image = next((tmp_path / "work" / "dataset" / "images").rglob("*.jpg"))  # hashed in place, never cached
        md5 = hashlib.md5(image.read_bytes()).hexdigest()
        assert not (tmp_path / "work" / "repo" / ".dvc" / "cache" / "files" / "md5" / md5[:2] / md5[2:]).exists()
