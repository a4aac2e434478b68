"""The init stage: caffemodel downloaded from loopback and converted, a local caffemodel, a checkpoint."""

import io
import zipfile

import torch

from deeplab.caffe import write_caffemodel
from deeplab.models import build_model
from tests.conftest import make_project, run_stages, sh, tiny_params
from tests.official_layouts import ArchiveServer, md5
from tests.test_caffe import small_layers


def caffemodel_zip(tmp_path, n_classes):
    _, layers = small_layers(n_blocks=(1, 1, 1, 1), n_classes=n_classes)
    write_caffemodel(tmp_path / "init.caffemodel", layers)
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("prototxt_and_model/deploy.prototxt", "name: 'deeplab'")
        z.write(tmp_path / "init.caffemodel", "prototxt_and_model/init.caffemodel")
    return buf.getvalue(), layers


def test_init_downloads_and_converts_caffemodel(tmp_path):
    data, layers = caffemodel_zip(tmp_path, n_classes=6)
    params = tiny_params()
    with ArchiveServer() as server:
        server.files["prototxt_and_model.zip"] = data
        params["init"].update(source="caffemodel", base_url=server.url, checksums={"md5": md5(data)})
        root = make_project(tmp_path / "repo", params)
        res = run_stages(root, "download", "prepare", "init")  # in one process: DVC is not under test here
        assert len(server.log) == 1
    state = torch.load(root / "data/models/init.pt", weights_only=True)
    conv1 = next(la for la in layers if la.name == "conv1")
    assert torch.equal(state["base.layer1.conv1.conv.weight"], torch.from_numpy(conv1.blobs[0]))
    fc = next(la for la in layers if la.name.endswith("_c2"))
    assert torch.equal(state["base.aspp.c2.bias"], torch.from_numpy(fc.blobs[1].reshape(-1)))  # 6 classes: copied
    assert "initial weights (caffemodel)" in res.stderr
    model = build_model(6, (1, 1, 1, 1), 8)
    model.load_state_dict(state)


def test_init_from_local_caffemodel_with_other_classes_and_checkpoint(tmp_path):
    _, layers = caffemodel_zip(tmp_path, n_classes=21)
    params = tiny_params()
    params["init"].update(source="caffemodel", path=str(tmp_path / "init.caffemodel"))
    root = make_project(tmp_path / "repo", params)
    res = sh(root, "python", "-m", "stages.init")
    assert "fresh" in res.stderr  # 21-class head does not fit 6 classes
    state = torch.load(root / "data/models/init.pt", weights_only=True)
    assert state["base.aspp.c0.weight"].shape[0] == 6

    other = build_model(21, (1, 1, 1, 1), 8)
    torch.save({"model": other.state_dict()}, tmp_path / "ckpt.pth")
    params["init"].update(source="checkpoint", path=str(tmp_path / "ckpt.pth"))
    (root / "params.yaml").write_text(__import__("yaml").safe_dump(params))
    res = sh(root, "python", "-m", "stages.init")
    assert "classifier head initialised fresh (8 tensors)" in res.stderr
    state = torch.load(root / "data/models/init.pt", weights_only=True)
    assert torch.equal(state["base.layer5.block1.reduce.conv.weight"], other.base.layer5.block1.reduce.conv.weight)
