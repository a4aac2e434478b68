"""Faults an outside probe found, checked through the real `dvc repro`: a killed crf resumes from its progress, a
forced train rerun trains, and writing onto a checked-out output cannot rewrite DVC's cache."""

import hashlib
import json
import os
import signal
import subprocess
import time

import numpy as np
import pytest
import yaml

from tests.conftest import NO_TRACKING, copy_project, run_env, sh, stages_run


@pytest.fixture
def project(tiny_pipeline, tmp_path):
    return copy_project(tiny_pipeline, tmp_path / "repo")


def cache_object(root, md5: str):
    return root / ".dvc" / "cache" / "files" / "md5" / md5[:2] / md5[2:]


def test_forced_train_rerun_trains_from_the_start(project):
    res = sh(project, "dvc", "repro", "-f", "-s", "train", env=NO_TRACKING)  # MLflow: not under test
    assert stages_run(res.stdout) == ["train"]
    assert "holds a finished run (iteration 40): training again from the start" in res.stderr
    assert "resuming from" not in res.stderr


def test_writing_onto_a_checked_out_output_leaves_the_cache_intact(project):
    """As root the read-only bit protects nothing: a hardlinked output would be rewritten in the cache itself."""
    lock = yaml.safe_load((project / "dvc.lock").read_text())
    out = next(o for o in lock["stages"]["logits"]["outs"] if o["path"] == "data/logits")
    entries = json.loads(cache_object(project, out["md5"].removesuffix(".dir") + ".dir").read_text())
    entry = entries[0]
    target = project / "data" / "logits" / entry["relpath"]
    sh(project, "dvc", "checkout", "--force", "data/logits")  # the workspace copy as DVC links or copies it
    target.chmod(0o644)
    np.save(target, np.zeros((2, 2), np.float16))  # what a user or a tool might do by hand
    obj = cache_object(project, entry["md5"])
    assert hashlib.md5(obj.read_bytes()).hexdigest() == entry["md5"]
    assert "data/logits" in sh(project, "dvc", "status", "logits").stdout  # the edit is seen as a change
    sh(project, "dvc", "checkout", "--force", "data/logits")
    assert hashlib.md5(target.read_bytes()).hexdigest() == entry["md5"]


def test_killed_crf_resumes_under_dvc_repro_and_never_reuses_other_params(project):
    """DVC deletes a stage's outputs before running it; the progress folder is not one, so a kill -9 mid-CRF
    resumes. Maps made with other params (the first run's) are not reused."""
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["crf"]["iterations"] = 250  # about 0.7 s an image here: time to kill it half-way
    params["crf"]["n_jobs"] = 2  # loky's worker processes inside the DVC stage, killed with it
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    progress = project / "data" / "crf_progress"
    before = {d.name for d in progress.iterdir()}
    proc = subprocess.Popen(["dvc", "repro"], cwd=project, env={**run_env(project), **NO_TRACKING},
                            start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def new_maps():
        return [p for d in progress.iterdir() if d.name not in before for p in d.glob("*.png")]

    deadline = time.monotonic() + 300
    while not new_maps() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    done = len(new_maps())
    n_val = params["dataset"]["synthetic"]["n_val"]
    assert 1 <= done < n_val, f"{done} of {n_val} maps at the kill: the test needs a slower CRF"
    res = sh(project, "dvc", "repro", env=NO_TRACKING)
    assert stages_run(res.stdout) == ["crf", "evaluate@crf"]
    assert f"crf: {done} of {n_val} label maps reused" in res.stderr
    # The resumed run gives what an uninterrupted run with these params gives.
    from deeplab.config import load_params
    from deeplab.crf import run_crf
    from deeplab.data import read_label, read_list

    p = load_params(project / "params.yaml")
    items = [it.__class__(it.image_id, project / it.image, project / it.label)
             for it in read_list(project / "data" / "prepared" / "val.txt")]
    fresh = project.parent / "fresh"
    assert run_crf(items, project / "data" / "logits", fresh, p.crf, p.dataset.mean_bgr, 1, fresh / "p") == n_val
    for it in items:
        name = f"{it.image_id}.png"
        assert np.array_equal(read_label(project / "data" / "predictions" / "crf" / name), read_label(fresh / name))
