"""Sharing results the DVC way: push to a remote, clone the git repo elsewhere, pull, and find nothing to rerun.

Nothing needs special handling: every output (the `persist: true` checkpoints included) is pushed and pulled like
any other, since dvc.lock records them all. Each checkout gets its own DVC_SITE_CACHE_DIR (conftest's run_env(root)
puts it under the root, and /.site-cache/ is git-ignored), so the clone shares no DVC state with the original; the
run-cache is not pushed (`dvc push` without --run-cache) and is not needed: the committed dvc.lock is what makes
`dvc repro` in the clone a no-op. The remote is an absolute local path committed in .dvc/config, so the clone
finds it without any set-up.
"""

from __future__ import annotations

import json

import pytest
import yaml

from deeplab.files import file_hash
from tests.conftest import ALL_STAGES as STAGES
from tests.conftest import copy_project, sh, stages_run


@pytest.fixture(scope="module")
def shared(tiny_pipeline, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("remote")
    origin = copy_project(tiny_pipeline, tmp / "origin")  # the shared run, committed; the remote is ours alone
    sh(origin, "dvc", "remote", "add", "-d", "store", str(tmp / "remote"))
    sh(origin, "git", "commit", "-q", "-am", "dvc remote")
    push = sh(origin, "dvc", "push")
    clone = tmp / "clone"
    sh(tmp, "git", "clone", "-q", str(origin), str(clone))
    assert not (clone / "data").exists()
    pull = sh(clone, "dvc", "pull")
    return {"tmp": tmp, "origin": origin, "clone": clone, "push": push, "pull": pull}


def test_push_fills_the_remote(shared):
    assert "pushed" in shared["push"].stdout
    assert any((shared["tmp"] / "remote").rglob("*")), "remote is empty after dvc push"
    # the remote holds everything the cache does
    assert "in sync" in sh(shared["origin"], "dvc", "status", "--cloud").stdout
    assert 'remote "store"' in sh(shared["origin"], "git", "show", "HEAD:.dvc/config").stdout


def test_clone_pulls_every_output(shared):
    clone = shared["clone"]
    assert "fetched" in shared["pull"].stdout
    lock = yaml.safe_load((clone / "dvc.lock").read_text())
    outs = [o for stage in lock["stages"].values() for o in stage.get("outs", [])]
    assert {o["path"] for o in outs} >= {"data/models/final.pt", "data/checkpoints", "data/logits"}
    for out in outs:
        assert (clone / out["path"]).exists(), out["path"]
    final = next(o for o in outs if o["path"] == "data/models/final.pt")
    assert file_hash(clone / "data" / "models" / "final.pt") == final["md5"]
    assert sorted(p.name for p in (clone / "data" / "checkpoints").iterdir()) == sorted(
        p.name for p in (shared["origin"] / "data" / "checkpoints").iterdir())


def test_clone_has_nothing_to_rerun(shared):
    clone = shared["clone"]
    status = sh(clone, "dvc", "status")
    assert "Data and pipelines are up to date" in status.stdout
    repro = sh(clone, "dvc", "repro")
    assert stages_run(repro.stdout) == []
    for stage in STAGES:
        assert f"Stage '{stage}' didn't change, skipping" in repro.stdout
    assert "Data and pipelines are up to date" in repro.stdout
    assert not (clone / "mlflow.db").exists()  # nothing ran, so nothing was logged
    assert sh(clone, "git", "status", "--porcelain").stdout == ""


def test_clone_metrics_equal_origin(shared):
    def metrics(root):
        return json.loads(sh(root, "dvc", "metrics", "show", "--json").stdout)

    ours, theirs = metrics(shared["clone"]), metrics(shared["origin"])
    assert theirs == ours
    shown = ours[""]["data"]  # "" is the workspace
    for kind in ("raw", "crf"):
        path = f"metrics/{kind}/scores.json"
        assert shown[path]["data"] == json.loads((shared["origin"] / path).read_text())
