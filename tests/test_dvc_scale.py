"""DVC sees the user's data (issues 13 and 15): a dataset folder outside the repository is hashed in place as the
prepare stage's dependency, and the stages after prepare depend on the split list they read, which records the
md5 of every listed file. Checked through the real `dvc repro` / `dvc status`."""

import os

import numpy as np
import pytest
import yaml
from PIL import Image

from deeplab import synthetic
from tests.conftest import NO_TRACKING, make_project, sh, stages_run, tiny_params

VAL_ONWARDS = ["prepare", "logits", "crf", "evaluate@raw", "evaluate@crf"]


def dvc(root, *args):
    """A DVC command in ``root``, its stages untracked: MLflow is not under test here."""
    return sh(root, "dvc", *args, env=NO_TRACKING)


@pytest.fixture(scope="module")
def outside(tmp_path_factory):
    """A finished, committed pipeline whose dataset.root is a folder outside the repository."""
    tmp = tmp_path_factory.mktemp("outside")
    p = tiny_params()
    s = p["dataset"]["synthetic"]
    dataset = tmp / "my-dataset"
    synthetic.generate(dataset, s["n_train"], s["n_val"], s["height"], s["width"], p["dataset"]["n_classes"], s["seed"])
    p["dataset"]["root"] = str(dataset)
    root = make_project(tmp / "repo", p)
    res = dvc(root, "repro")
    assert "prepare" in stages_run(res.stdout)
    sh(root, "git", "add", "-A")
    sh(root, "git", "commit", "-q", "-m", "ran the pipeline")
    return root, dataset


def val_label(dataset):
    listing = (dataset / "ImageSets" / "Segmentation" / "val.txt").read_text().split()
    return dataset / "SegmentationClass" / f"{listing[0]}.png"


def test_prepare_depends_on_the_outside_folder_and_nothing_else_does(outside):
    root, dataset = outside
    lock = yaml.safe_load((root / "dvc.lock").read_text())["stages"]
    deps = {name: {d["path"]: d for d in stage.get("deps", [])} for name, stage in lock.items()}
    assert [name for name in deps if str(dataset) in deps[name]] == ["prepare"]
    assert deps["prepare"][str(dataset)]["md5"].endswith(".dir")  # DVC hashed the folder's files
    assert deps["prepare"][str(dataset)]["nfiles"] == sum(p.is_file() for p in dataset.rglob("*"))
    assert not any("data/raw" in d for stage in deps.values() for d in stage)  # the repo's data/raw: unused
    assert "Data and pipelines are up to date" in dvc(root, "status").stdout


def test_a_file_no_split_lists_reruns_prepare_only(outside):
    """The folder's hash changes, so prepare reruns; its lists record content and come out identical, so
    nothing after prepare reruns. (A file only touched reruns nothing: DVC compares content, not mtimes.)"""
    root, dataset = outside

    def prepared():
        (out,) = yaml.safe_load((root / "dvc.lock").read_text())["stages"]["prepare"]["outs"]
        return out["md5"]

    before = prepared()
    (dataset / "NOTES.txt").write_text("labelled by hand\n")
    assert stages_run(dvc(root, "repro").stdout) == ["prepare"]
    assert prepared() == before  # its output persists (dvc.yaml) and comes out as a run from scratch makes it
    label = val_label(dataset)
    st = label.stat()
    os.utime(label, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    assert "Data and pipelines are up to date" in dvc(root, "status").stdout


def test_changed_label_bytes_rerun_what_reads_it_and_crf_params_still_rerun_only_crf(outside):
    root, dataset = outside
    label = val_label(dataset)
    with Image.open(label) as im:
        values, palette = np.array(im), im.getpalette()
    values[:4, :4] = (values[:4, :4] + 1) % 6  # other classes in one corner
    edited = Image.fromarray(values, mode="P")
    edited.putpalette(palette)
    edited.save(label)
    status = dvc(root, "status").stdout
    assert "prepare:" in status and f"modified:           {dataset}" in status
    res = dvc(root, "repro")
    # A validation label: the val list changes, the train list does not, so training is not redone.
    assert stages_run(res.stdout) == VAL_ONWARDS
    assert "Data and pipelines are up to date" in dvc(root, "status").stdout
    sh(root, "git", "commit", "-q", "-am", "label edited")
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["crf"]["bi_w"] = 5.0
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    assert stages_run(dvc(root, "repro").stdout) == ["crf", "evaluate@crf"]


@pytest.mark.parametrize("inside", [True, False])
def test_prepare_advises_moving_a_large_dataset_out_of_the_repository(tmp_path, monkeypatch, caplog, inside):
    """Past LARGE_DATASET_FILES listed files (lowered here to this dataset's 32), prepare warns that a folder
    inside the repository costs DVC two walks a status and a copy in its cache; outside it, nothing is said."""
    from deeplab import datasets
    from stages.prepare import prepare

    p = tiny_params()
    s = p["dataset"]["synthetic"]
    repo = tmp_path / "repo"
    dataset = repo / "data" / "raw" if inside else tmp_path / "elsewhere"
    synthetic.generate(dataset, s["n_train"], s["n_val"], s["height"], s["width"], p["dataset"]["n_classes"], s["seed"])
    p["dataset"]["root"] = str(dataset)
    repo.mkdir(exist_ok=True)
    (repo / "params.yaml").write_text(yaml.safe_dump(p, sort_keys=False))
    monkeypatch.chdir(repo)
    monkeypatch.setenv("DEEPLAB_TRACKING", "off")
    monkeypatch.delenv("DVC_ROOT", raising=False)
    n_files = 2 * (s["n_train"] + s["n_val"])
    monkeypatch.setattr(datasets, "LARGE_DATASET_FILES", n_files)
    with caplog.at_level("WARNING"):
        prepare(params=repo / "params.yaml", raw=repo / "data" / "raw", out=repo / "data" / "prepared")
    warned = [r.getMessage() for r in caplog.records if "inside the repository" in r.getMessage()]
    if inside:
        assert warned == [datasets.large_dataset_hint(dataset, repo, n_files)]
        assert f"{n_files:,} files" in warned[0] and str(dataset) in warned[0] and "README" in warned[0]
        assert datasets.large_dataset_hint(dataset, repo, n_files - 1) is None  # one file under: small
    else:
        assert warned == []
        assert datasets.large_dataset_hint(dataset, repo, 10**6) is None
    assert (repo / "data" / "prepared" / "val.txt").exists()
