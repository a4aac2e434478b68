"""The init stage: caffemodel downloaded from loopback and converted, a local caffemodel, a checkpoint."""

import ast
import io
import zipfile
from pathlib import Path

import pytest
import torch
import yaml
from typer.testing import CliRunner, Result

from deeplab.caffe import write_caffemodel
from deeplab.models import build_model, read_state_dict
from tests.conftest import NO_TRACKING, REPO, make_project, run_stages, sh, tiny_params
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


def init_here(root: Path, params: dict, monkeypatch: pytest.MonkeyPatch) -> Result:
    """The init stage's command on ``params`` in ``root``, in this process and untracked: for tests of its
    errors and exit status, where neither DVC nor MLflow is under test (saves a Python and torch start a run)."""
    from stages.init import app

    root.mkdir(parents=True, exist_ok=True)
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    monkeypatch.chdir(root)
    monkeypatch.setenv("DEEPLAB_TRACKING", "off")
    return CliRunner().invoke(app, [])


def refused(res: Result) -> str:
    """The stderr of an init run that stopped with exit status 1 on an expected error (no traceback: any other
    exception would be ``res.exception``)."""
    assert res.exit_code == 1 and isinstance(res.exception, SystemExit | None), (res.exception, res.output)
    return res.stderr


def test_init_downloads_and_converts_caffemodel(tmp_path):
    data, layers = caffemodel_zip(tmp_path, n_classes=6)
    params = tiny_params()
    with ArchiveServer() as server:
        server.files["prototxt_and_model.zip"] = data
        params["init"].update(source="caffemodel", base_url=server.url, checksums={"md5": md5(data)})
        root = make_project(tmp_path / "repo", params)
        res = run_stages(root, "download", "prepare", "init", env=NO_TRACKING)  # one process: DVC is not under test
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
    res = sh(root, "python", "-m", "stages.init", env=NO_TRACKING)
    assert "fresh" in res.stderr  # 21-class head does not fit 6 classes
    state = torch.load(root / "data/models/init.pt", weights_only=True)
    assert state["base.aspp.c0.weight"].shape[0] == 6

    other = build_model(21, (1, 1, 1, 1), 8)
    torch.save({"model": other.state_dict()}, tmp_path / "ckpt.pth")
    params["init"].update(source="checkpoint", path=str(tmp_path / "ckpt.pth"))
    (root / "params.yaml").write_text(__import__("yaml").safe_dump(params))
    res = sh(root, "python", "-m", "stages.init", env=NO_TRACKING)
    assert "classifier head initialised fresh (8 tensors)" in res.stderr
    state = torch.load(root / "data/models/init.pt", weights_only=True)
    assert torch.equal(state["base.layer5.block1.reduce.conv.weight"], other.base.layer5.block1.reduce.conv.weight)


def test_missing_or_pickled_init_path_is_named(tmp_path):
    from tests.test_models import Payload

    params = tiny_params()
    params["init"].update(source="caffemodel", path=str(tmp_path / "nowhere" / "init.caffemodel"))
    root = make_project(tmp_path / "repo", params)
    res = sh(root, "python", "-m", "stages.init", check=False)
    assert res.returncode == 1 and "Traceback" not in res.stderr
    assert f"error: init.path: {tmp_path / 'nowhere' / 'init.caffemodel'}: no such caffemodel file" in res.stderr

    torch.save({"model": build_model(6, (1, 1, 1, 1), 8).state_dict(), "extra": Payload()}, tmp_path / "pickled.pt")
    params["init"].update(source="checkpoint", path=str(tmp_path / "pickled.pt"))
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    res = sh(root, "python", "-m", "stages.init", check=False)
    assert res.returncode == 1 and "Traceback" not in res.stderr and "weights_only" not in res.stderr
    assert f"error: init.path: {tmp_path / 'pickled.pt'}: not a plain weights file" in res.stderr
    assert not (root / "data/models/init.pt").exists()


def test_checkpoint_written_by_train_is_checked_against_the_model(tmp_path):
    from tests.test_train import tiny_trained

    trained = tiny_trained(tmp_path / "run")  # 4 classes, width 8, mean (100, 110, 120)
    params = tiny_params()
    params["model"].update(width=16, atrous_rates=[6, 12, 18, 24])
    params["init"].update(source="checkpoint", path=str(trained))
    root = make_project(tmp_path / "repo", params, mlflow_store=False)
    res = sh(root, "python", "-m", "stages.init", check=False)
    assert res.returncode == 1 and "Traceback" not in res.stderr
    assert (f"error: init.path: {trained}: the checkpoint was trained with another model: "
            "model.width is 16 in the params, 8 in the file") in res.stderr
    assert not (root / "mlflow.db").exists()  # refused before any run was recorded

    params["model"]["width"] = 8
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    res = sh(root, "python", "-m", "stages.init", env=NO_TRACKING)
    assert "input mean [100.0, 110.0, 120.0], dataset.mean_bgr is [104.008, 116.669, 122.675]" in res.stderr
    assert "classifier head initialised fresh (8 tensors)" in res.stderr  # 4 classes trained, 6 configured
    init = torch.load(root / "data/models/init.pt", weights_only=True)
    key = "base.layer5.block1.reduce.conv.weight"
    assert "deeplab" not in init and torch.equal(init[key], read_state_dict(trained)[key])  # init.pt stays plain


def test_checkpoint_takes_the_references_coco_init_layout(tmp_path):
    """deeplabv1_resnet101-coco.pth: DeepLabV1's backbone keys without MSC's base. prefix and a 91-class 1x1 fc."""
    v1 = {k: v for k, v in build_model(91, (1, 1, 1, 1), 8).base.state_dict().items() if not k.startswith("aspp.")}
    v1["fc.weight"] = torch.randn(91, 256, 1, 1)
    v1["fc.bias"] = torch.randn(91)
    for key in ("layer1.conv1.conv.weight", "layer1.conv1.bn.running_var", "layer2.block1.shortcut.bn.running_mean",
                "layer4.block1.conv3x3.conv.weight", "layer5.block1.increase.bn.num_batches_tracked", "fc.weight"):
        assert key in v1  # the reference's key names
    torch.save(v1, tmp_path / "deeplabv1_resnet101-coco.pth")
    params = tiny_params()
    params["init"].update(source="checkpoint", path=str(tmp_path / "deeplabv1_resnet101-coco.pth"))
    root = make_project(tmp_path / "repo", params)
    res = sh(root, "python", "-m", "stages.init", env=NO_TRACKING)
    assert "in the reference's DeepLabV1 layout (its COCO init): backbone keys prefixed with base., its classifier " \
           "(fc.bias, fc.weight) dropped" in res.stderr
    assert "classifier head initialised fresh (8 tensors)" in res.stderr
    state = torch.load(root / "data/models/init.pt", weights_only=True)
    for key, value in v1.items():
        if not key.startswith("fc."):
            assert torch.equal(state[f"base.{key}"], value), key
    assert state["base.aspp.c0.weight"].shape[0] == 6 and not any(k.startswith(("fc.", "base.fc.")) for k in state)


def small_torchvision_resnet(path):
    """A torchvision ResNet with one bottleneck per stage (width 64), random weights: its state dict file."""
    from torchvision.models.resnet import Bottleneck, ResNet

    torch.manual_seed(0)
    tv = ResNet(Bottleneck, [1, 1, 1, 1])
    torch.save(tv.state_dict(), path)
    return tv.state_dict()


def test_init_from_torchvision_weights_for_both_stride_placements(tmp_path):
    tv = small_torchvision_resnet(tmp_path / "resnet.pth")
    params = tiny_params(**{"model.width": 64})
    params["init"].update(source="torchvision", path=str(tmp_path / "resnet.pth"))
    root = make_project(tmp_path / "repo", params)
    res = sh(root, "python", "-m", "stages.init", env=NO_TRACKING)  # deeplabv2, Caffe-style: the stride sits elsewhere
    assert "strides the first 1x1 conv (reduce) of res3, while torchvision's weights" in res.stderr
    assert "fresh (the head, seeded init): 8 tensors of base.aspp" in res.stderr
    assert "dataset.normalization is caffe: set it to imagenet" in res.stderr
    state = torch.load(root / "data/models/init.pt", weights_only=True)
    assert torch.equal(state["base.layer3.block1.reduce.conv.weight"], tv["layer2.0.conv1.weight"])
    assert torch.equal(state["base.layer3.block1.conv3x3.bn.running_var"], tv["layer2.0.bn2.running_var"])
    assert torch.equal(state["base.layer5.block1.shortcut.conv.weight"], tv["layer4.0.downsample.0.weight"])
    assert torch.equal(state["base.layer1.conv1.bn.weight"], tv["bn1.weight"])

    params["model"].update(arch="deeplabv3plus", output_stride=16, atrous_rates=None)
    params["dataset"]["normalization"] = "imagenet"
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    res = sh(root, "python", "-m", "stages.init", env=NO_TRACKING)
    assert "strides the first 1x1" not in res.stderr and "set it to imagenet" not in res.stderr
    assert "of base.aspp, base.classifier, base.decoder" in res.stderr
    state = torch.load(root / "data/models/init.pt", weights_only=True)
    backbone = {k.removeprefix("base.backbone."): v for k, v in state.items() if k.startswith("base.backbone.")}
    assert backbone.keys() == tv.keys() - {"fc.weight", "fc.bias"}
    assert all(torch.equal(v, tv[k]) for k, v in backbone.items())


def test_torchvision_weights_of_another_depth_are_refused_before_a_run(tmp_path):
    small_torchvision_resnet(tmp_path / "resnet.pth")
    params = tiny_params(**{"model.width": 64, "model.n_blocks": [1, 1, 2, 1]})
    params["init"].update(source="torchvision", path=str(tmp_path / "resnet.pth"))
    root = make_project(tmp_path / "repo", params, mlflow_store=False)
    res = sh(root, "python", "-m", "stages.init", check=False)
    assert res.returncode == 1 and "Traceback" not in res.stderr
    assert (f"error: init.path: {tmp_path / 'resnet.pth'}: the torchvision ResNet has n_blocks [1, 1, 1, 1] and "
            "width 64, the params give model.n_blocks [1, 1, 2, 1]") in res.stderr
    assert not (root / "mlflow.db").exists() and not (root / "data/models/init.pt").exists()


def test_weights_without_a_head_for_the_classes_are_not_scored_untrained(tmp_path, monkeypatch):
    """train.iterations 0 scores the initial weights as they are: weights whose head is for another class
    count (or torchvision's, which hold none) started a fresh head that was then scored untrained, at chance,
    as if it were the weights' result. Refused naming the file, with nothing written; training them still runs."""
    _, layers = caffemodel_zip(tmp_path, n_classes=21)
    torch.save({"model": build_model(21, (1, 1, 1, 1), 8).state_dict()}, tmp_path / "ckpt.pth")
    small_torchvision_resnet(tmp_path / "resnet.pth")
    cases = [({"source": "caffemodel", "path": str(tmp_path / "init.caffemodel")}, {},
              f"init caffemodel {tmp_path / 'init.caffemodel'}"),
             ({"source": "checkpoint", "path": str(tmp_path / "ckpt.pth")}, {},
              f"init checkpoint weights {tmp_path / 'ckpt.pth'}"),
             ({"source": "torchvision", "path": str(tmp_path / "resnet.pth")}, {"model.width": 64},
              f"init.path: {tmp_path / 'resnet.pth'}: torchvision's ImageNet ResNet")]
    for n, (init, model, what) in enumerate(cases):
        params = tiny_params(**model)
        params["init"].update(init)
        params["train"]["iterations"] = 0
        root = tmp_path / f"repo{n}"
        assert (f"error: {what}: holds no head for dataset.n_classes 6, so it would start fresh, and "
                "train.iterations is 0: the untrained head would be scored") in refused(
                    init_here(root, params, monkeypatch))
        assert not (root / "data/models/init.pt").exists()
    params["train"]["iterations"] = 2
    res = init_here(root, params, monkeypatch)
    assert res.exit_code == 0, res.output
    assert (root / "data/models/init.pt").is_file()


def test_a_checkpoint_is_scored_only_on_the_input_it_was_trained_on(tmp_path, monkeypatch):
    """train.iterations 0 with a final.pt trained on other input (dataset.mean_bgr, dataset.normalization):
    train wrote the params' input into final.pt and everything after fed the network that way, a low score
    with no more than a warning in the init log. Refused; fine-tuning (iterations > 0) still only warns."""
    from tests.test_train import tiny_trained

    trained = tiny_trained(tmp_path / "run")  # 4 classes, width 8, mean (100, 110, 120), caffe
    params = tiny_params(**{"dataset.n_classes": 4})
    params["dataset"]["normalization"] = "imagenet"
    params["init"].update(source="checkpoint", path=str(trained))
    params["train"]["iterations"] = 0
    root = tmp_path / "repo"
    assert (f"error: init.path: {trained}: train.iterations is 0, but the checkpoint was trained on other input: "
            "dataset.normalization is imagenet in the params, caffe in the file; dataset.mean_bgr is "
            "[104.008, 116.669, 122.675] in the params, [100.0, 110.0, 120.0] in the file") in refused(
                init_here(root, params, monkeypatch))
    assert not (root / "data/models/init.pt").exists()
    params["dataset"].update(normalization="caffe", mean_bgr=[100, 110, 120])
    res = init_here(root, params, monkeypatch)
    assert res.exit_code == 0, res.output
    assert (root / "data/models/init.pt").is_file()


# Modules that move, check or log files and settings without computing the weights (the downloader fetches files
# named by their checksums).
PLUMBING = {"config", "files", "stage", "tracking", "download"}


def _deeplab_imports(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("deeplab"):
            found |= {node.module.removeprefix("deeplab.")} if node.module != "deeplab" else {
                a.name for a in node.names}
    return found - PLUMBING


def test_init_stage_lists_the_code_that_computes_its_weights():
    """Every deeplab module the init stage computes init.pt with (BatchNorm calibration reads training crops
    through loader and data) is a dependency in dvc.yaml: an edit to one reruns init, not only train."""
    todo, seen = _deeplab_imports(REPO / "stages/init.py"), set()
    while todo:
        module = todo.pop()
        seen.add(module)
        todo |= _deeplab_imports(REPO / f"deeplab/{module}.py") - seen
    deps = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]["init"]["deps"]
    assert {"loader", "data", "models"} <= seen
    assert sorted(f"deeplab/{m}.py" for m in seen if f"deeplab/{m}.py" not in deps) == []
