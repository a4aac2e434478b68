"""Scoring published weights without training: init.source released (the reference's release assets from a
loopback mirror), train.iterations 0, the authors' train+val caffemodel warning, and their params."""

from __future__ import annotations

import csv
import hashlib
import io
import json
import zipfile

import pytest
import torch
import yaml

from deeplab.caffe import write_caffemodel
from deeplab.config import ParamsError, load_params
from deeplab.download import RELEASED
from deeplab.models import read_state_dict, read_weights_file
from tests.conftest import make_project, sh, tiny_params
from tests.official_layouts import ArchiveServer, md5
from tests.test_caffe import small_layers
from tests.test_config import write

VOC_RELEASE = "deeplabv2_resnet101_msc-vocaug-20000.pth"


def release_bytes(state: dict[str, torch.Tensor], zip_format: bool = True) -> bytes:
    """A weights file as the reference released it: a plain state dict (keys base.*), no metadata; in torch.save's
    zip format, or its legacy pickle (``zip_format=False``: what PyTorch before 1.6 wrote)."""
    buf = io.BytesIO()
    torch.save(state, buf, _use_new_zipfile_serialization=zip_format)
    return buf.getvalue()


def mlflow_stage_runs(root) -> dict:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{root / 'mlflow.db'}")
    exp = client.get_experiment_by_name("deeplab")
    return {r.data.tags["deeplab.stage"]: r for r in client.search_runs([exp.experiment_id],
                                                                          "tags.`deeplab.role` = 'stage'")}


def test_release_table_names_the_reference_assets():
    root = "https://github.com/kazuto1011/deeplab-pytorch/releases/download/v1.0/"
    assert {name: (a.url, n) for name, (a, n) in RELEASED.items()} == {
        "cocostuff10k": (root + "deeplabv2_resnet101_msc-cocostuff10k-20000.pth", 182),
        "cocostuff164k": (root + "deeplabv2_resnet101_msc-cocostuff164k-100000.pth", 182),
        "voc12": (root + VOC_RELEASE, 21)}


def test_released_weights_score_without_training(tiny_pipeline, tmp_path):
    """The tiny pipeline's trained weights, served as the voc12 release, score exactly what that pipeline scored,
    through a real `dvc repro` of a project that trains nothing."""
    trained = read_state_dict(tiny_pipeline / "data/models/final.pt")
    data = release_bytes(trained)
    params = tiny_params()
    params["train"]["iterations"] = 0
    with ArchiveServer() as server:
        server.files[VOC_RELEASE] = data
        params["init"] = {"source": "released", "name": "voc12", "base_url": server.url, "seed": 0}
        root = make_project(tmp_path / "repo", params)
        sh(root, "dvc", "repro")
        assert server.log == [(VOC_RELEASE, None)]  # downloaded once, through the one downloader

    recorded = json.loads((root / "data/downloads/recorded.json").read_text())
    assert recorded == {VOC_RELEASE: {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}}
    state, meta = read_weights_file(root / "data/models/final.pt")
    assert state.keys() == trained.keys() and all(torch.equal(state[k], v) for k, v in trained.items())
    assert meta["n_classes"] == 6 and meta["n_blocks"] == (1, 1, 1, 1) and meta["scales"] == (0.5, 0.75)
    with open(root / "metrics/train_log.csv", newline="") as f:
        assert list(csv.reader(f)) == [["iteration", "loss", "lr"]]
    for kind in ("raw", "crf"):
        got = json.loads((root / f"metrics/{kind}/scores.json").read_text())
        assert got == json.loads((tiny_pipeline / f"metrics/{kind}/scores.json").read_text()), kind

    runs = mlflow_stage_runs(root)
    train = runs["train"].data
    assert train.tags["deeplab.trained"] == "false" and train.params["train.iterations"] == "0"
    assert "final_train_loss" not in train.metrics
    assert runs["init"].data.tags["init.released"] == VOC_RELEASE
    assert sh(root, "dvc", "status").stdout.strip() == "Data and pipelines are up to date."


def test_a_released_file_that_changed_on_the_mirror_is_refused(tmp_path):
    from deeplab.download import DownloadError, fetch_released

    first, other = release_bytes({"w": torch.zeros(2)}), release_bytes({"w": torch.ones(2)})
    with ArchiveServer() as server:
        server.files[VOC_RELEASE] = first
        assert fetch_released("voc12", tmp_path, server.url).read_bytes() == first
        (tmp_path / VOC_RELEASE).unlink()
        server.files[VOC_RELEASE] = other  # recorded size and SHA-256 on the first download must match
        with pytest.raises(DownloadError, match=rf"{VOC_RELEASE}: sha256 mismatch"):
            fetch_released("voc12", tmp_path, server.url)
    assert not (tmp_path / VOC_RELEASE).exists()
    with pytest.raises(DownloadError, match="no released weights named 'ade20k'"):
        fetch_released("ade20k", tmp_path)


@pytest.mark.parametrize("served,problem", [
    (b"<!DOCTYPE html><html><body>404 Not Found</body></html>",
     r"not PyTorch weights but a web page \(the server answered with an error or sign-in page instead of the file\)"),
    (b"\x00\x01garbage", r"not PyTorch weights \(neither a zip nor a pickle: starts b'\\x00\\x01ga'\)"),
])
def test_a_first_download_that_is_no_weights_is_refused_not_recorded(tmp_path, served, problem):
    """With no checksum published for a release, the first download's size and sha256 are recorded: an error
    page a mirror answered with (HTTP 200) must not be pinned as the weights."""
    from deeplab.download import DownloadError, fetch_released

    with ArchiveServer() as server:
        server.files[VOC_RELEASE] = served
        with pytest.raises(DownloadError, match=rf"{VOC_RELEASE}: {problem} \(from {server.url}/{VOC_RELEASE}\)"):
            fetch_released("voc12", tmp_path, server.url)
        assert sorted(p.name for p in tmp_path.iterdir()) == []  # nothing kept, nothing recorded
        server.files[VOC_RELEASE] = legacy = release_bytes({"w": torch.zeros(2)}, zip_format=False)
        assert fetch_released("voc12", tmp_path, server.url).read_bytes() == legacy  # the releases' own format
    assert json.loads((tmp_path / "recorded.json").read_text())[VOC_RELEASE]["size"] == len(legacy)


def test_scoring_the_train_val_caffemodel_on_voc_val_warns(tmp_path):
    _, layers = small_layers(n_blocks=(1, 1, 1, 1), n_classes=21)
    write_caffemodel(tmp_path / "train2_iter_20000.caffemodel", layers)
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.write(tmp_path / "train2_iter_20000.caffemodel", "prototxt_and_model/train2_iter_20000.caffemodel")
    params = tiny_params()
    params["dataset"].update(name="voc12", n_classes=21, train_split="train_aug", val_split="val")
    params["train"]["iterations"] = 0
    with ArchiveServer() as server:
        server.files["prototxt_and_model.zip"] = buf.getvalue()
        params["init"].update(source="caffemodel", name="train2_iter_20000", base_url=server.url,
                              checksums={"md5": md5(buf.getvalue())})
        root = make_project(tmp_path / "repo", params)
        res = sh(root, "python", "-m", "stages.init")
    warning = ("train2_iter_20000.caffemodel was trained by the DeepLab authors on VOC 2012 train+val (with SBD): "
               "its scores on dataset.val_split 'val' are not a held-out measure")
    assert f"stages.init: {warning}" in res.stderr
    assert warning in mlflow_stage_runs(root)["init"].data.tags["init.warning"]
    state = torch.load(root / "data/models/init.pt", weights_only=True)
    fc = next(la for la in layers if la.name.endswith("_c0"))
    assert torch.equal(state["base.aspp.c0.bias"], torch.from_numpy(fc.blobs[1].reshape(-1)))  # head copied

    # The train_aug model (or the same file scored on another dataset) says nothing.
    write_caffemodel(tmp_path / "train_iter_20000.caffemodel", layers)
    params["init"] = {"source": "caffemodel", "path": str(tmp_path / "train_iter_20000.caffemodel"), "seed": 0}
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    res = sh(root, "python", "-m", "stages.init")
    assert "train+val" not in res.stderr


@pytest.mark.parametrize(("init", "message"), [
    ({"source": "released"}, "init.name is required when init.source is 'released' (one of cocostuff164k, "
                             "cocostuff10k, voc12)"),
    ({"source": "released", "name": "ade20k"}, "init.name: 'ade20k' with init.source 'released': one of "
                                               "cocostuff164k, cocostuff10k, voc12"),
    ({"source": "released", "name": "voc12", "path": "x.pth"}, "init.path is not used with init.source 'released'"),
    ({"source": "caffemodel", "name": "voc12"}, "init.name: 'voc12' with init.source 'caffemodel': one of init, "
                                                "train_iter_20000, train2_iter_20000"),
    ({"source": "caffemodel", "name": "init", "path": "a.caffemodel"}, "init.name and init.path are both set"),
    ({"source": "scratch", "name": "voc12"}, "init.name: 'voc12' with init.source 'scratch': not used"),
])
def test_init_name_is_checked(tmp_path, init, message):
    with pytest.raises(ParamsError) as e:
        load_params(write(tmp_path, {"init": {"path": None, **init}}))
    assert message in str(e.value)


def test_iterations_zero_is_valid_and_negative_is_not(tmp_path):
    assert load_params(write(tmp_path, {"train": {"iterations": 0}})).train.iterations == 0
    with pytest.raises(ParamsError, match=r"train\.iterations: Input should be greater than or equal to 0"):
        load_params(write(tmp_path, {"train": {"iterations": -1}}))


@pytest.mark.parametrize("name", ["voc12", "cocostuff10k", "cocostuff164k"])
def test_eval_presets_score_the_release_with_the_reference_protocol(name):
    from tests.conftest import REPO

    p = load_params(REPO / "presets" / f"eval_{name}.yaml")
    assert (p.init.source, p.init.name, p.train.iterations) == ("released", name, 0)
    assert p.crf.reference_image_quirk and not p.logits.amp
    training = load_params(REPO / "presets" / f"{name}.yaml")
    # The data and the model are the training preset's: only how the weights are obtained differs.
    assert p.dataset == training.dataset and p.model == training.model and p.crf.iterations == training.crf.iterations
