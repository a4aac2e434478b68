"""DeepLab v3 / v3+ beside v2: shapes and strides, the decoder's stride-4 input, a train step per arch,
torchvision-style backbone parity with torchvision, normalization carried by the weights to predict and hub,
and the whole tiny pipeline with model.arch deeplabv3plus / deeplabv3."""

import json
import math

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from deeplab.config import DatasetConfig, ModelConfig, ParamsError, TrainConfig, load_params
from deeplab.data import read_image, read_label, voc_layout_items, write_list
from deeplab.imagenet import load_torchvision
from deeplab.loader import to_input
from deeplab.models import build_model, init_from_scratch, output_size, read_weights_file
from deeplab.resnet import ResNet
from deeplab.train import param_groups, train, train_step
from tests.conftest import REPO, make_project, run_stages, tiny_params

SMALL = {"n_blocks": (1, 1, 1, 1), "width": 8}
CASES = [("deeplabv2", 8), ("deeplabv3", 8), ("deeplabv3", 16), ("deeplabv3plus", 8), ("deeplabv3plus", 16)]


@pytest.mark.parametrize("arch,stride", CASES)
@pytest.mark.parametrize("size", [64, 65])
def test_output_shapes_and_strides(arch, stride, size):
    model = build_model(5, **SMALL, scales=(0.5,), arch=arch, output_stride=stride).eval()
    with torch.no_grad():
        out = model(torch.randn(2, 3, size, size))
    want = {"deeplabv2": output_size(size),  # Caffe-style: ceil-mode pool
            "deeplabv3": math.ceil(size / stride), "deeplabv3plus": size}[arch]
    assert out.shape == (2, 5, want, want)
    if arch != "deeplabv2":
        low, high = model.base.backbone(torch.randn(1, 3, size, size))
        assert low.shape[-1] == math.ceil(size / 4) and high.shape[-1] == math.ceil(size / stride)
        # multi-grid (1, 2, 4) on the last stage's dilation, stride on the 3x3 (torchvision placement)
        base = {8: 4, 16: 2}[stride]
        rn = ResNet((1, 1, 1, 3), 8, stride)
        assert [b.conv2.dilation[0] for b in rn.layer4] == [base, 2 * base, 4 * base]
        assert rn.layer2[0].conv2.stride == (2, 2) and rn.layer2[0].conv1.stride == (1, 1)
        rates = [b[0].dilation[0] for b in model.base.aspp.branches[1:]]
        assert rates == ([12, 24, 36] if stride == 8 else [6, 12, 18])


def test_v2_rejects_output_stride_16_and_v3_needs_three_rates(tmp_path):
    p = yaml.safe_load((REPO / "params.yaml").read_text())
    p["model"]["output_stride"] = 16
    (tmp_path / "a.yaml").write_text(yaml.safe_dump(p))
    with pytest.raises(ParamsError, match=r"model\.output_stride: deeplabv2 runs at output stride 8 only"):
        load_params(tmp_path / "a.yaml")
    p["model"]["arch"] = "deeplabv3"
    (tmp_path / "b.yaml").write_text(yaml.safe_dump(p))
    with pytest.raises(ParamsError, match=r"model\.atrous_rates: deeplabv3 takes 3 rates.*\[6, 12, 18, 24\]"):
        load_params(tmp_path / "b.yaml")
    p["model"]["atrous_rates"] = None
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(p))
    assert load_params(tmp_path / "c.yaml").model.arch == "deeplabv3"
    p["train"].update(freeze_bn=False, batch_size=1)
    (tmp_path / "d.yaml").write_text(yaml.safe_dump(p))
    with pytest.raises(ParamsError, match=r"train\.batch_size: 1 with train\.freeze_bn false cannot train deeplabv3"):
        load_params(tmp_path / "d.yaml")
    p["train"].update(freeze_bn=True)
    p["init"].update(source="caffemodel")
    (tmp_path / "e.yaml").write_text(yaml.safe_dump(p))
    with pytest.raises(ParamsError, match=r"init\.source: the DeepLab caffemodels hold a deeplabv2 network"):
        load_params(tmp_path / "e.yaml")


def test_v3plus_decoder_reads_the_stride_4_features():
    model = build_model(3, **SMALL, scales=(), arch="deeplabv3plus", output_stride=16).eval()
    seen = {}
    model.base.backbone.layer1.register_forward_hook(lambda m, i, o: seen.update(layer1=o))
    model.base.decoder.reduce.register_forward_hook(lambda m, i, o: seen.update(reduce_in=i[0]))
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        ref = model(x)
    assert seen["reduce_in"] is seen["layer1"] and seen["layer1"].shape[-2:] == (16, 16)
    # The low-level path matters: zeroing layer1's contribution to the decoder changes the logits.
    model.base.decoder.reduce.register_forward_hook(lambda m, i, o: torch.zeros_like(o))
    with torch.no_grad():
        assert not torch.allclose(model(x), ref)


@pytest.mark.parametrize("arch,stride", CASES)
def test_a_train_step_runs_for_each_arch(arch, stride):
    torch.manual_seed(0)
    model = build_model(4, **SMALL, scales=(0.75,), arch=arch, output_stride=stride)
    init_from_scratch(model, 0)
    model.train()  # trainable BN for every arch here
    groups = {g["name"]: g for g in param_groups(model, 1e-3, 5e-4)}
    if arch == "deeplabv2":
        assert {"backbone", "aspp_weight", "aspp_bias", "bn"} <= set(groups)
    else:  # the v3+ seed's recipe: backbone 1x, the rest 10x, decay everywhere
        assert set(groups) == {"backbone", "head"} and groups["head"]["lr"] == pytest.approx(1e-2)
        assert all(g["weight_decay"] == 5e-4 for g in groups.values())
        n = sum(len(g["params"]) for g in groups.values())
        assert n == len(list(model.parameters()))
    opt = torch.optim.SGD(list(groups.values()), lr=1e-3, momentum=0.9)
    images = torch.randn(2, 3, 49, 49)
    labels = torch.randint(0, 4, (2, 49, 49))
    before = [p.detach().clone() for p in model.parameters()]
    loss = train_step(model, opt, iter([(images, labels, None)]), 1, torch.device("cpu"))
    assert torch.isfinite(loss)
    changed = [not torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True)]
    assert all(changed)  # every parameter, head and BN included, learns


def test_torchvision_backbone_equals_torchvision_features(tmp_path):
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    tv = torchvision.models.resnet101().eval()  # random weights: nothing is downloaded
    with torch.no_grad():  # non-trivial BN statistics, so a BN mapped wrongly shows
        for m in tv.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    torch.save(tv.state_dict(), tmp_path / "resnet101.pth")
    state = torch.load(tmp_path / "resnet101.pth", weights_only=True)
    model = build_model(21, arch="deeplabv3", output_stride=16)
    lines = load_torchvision(model, state, tmp_path / "resnet101.pth")
    assert "dropped from the file (ImageNet classifier): fc.weight, fc.bias" in lines
    assert any(line.startswith("fresh (the head") and "base.classifier" in line for line in lines)
    # The same weights in the backbone without dilation: torchvision's own layers.
    plain = ResNet((3, 4, 23, 3), 64, output_stride=32, multi_grid=(1,)).eval()
    plain.load_state_dict(model.base.backbone.state_dict())
    x = torch.randn(1, 3, 96, 96)
    with torch.no_grad():
        stem = tv.maxpool(tv.relu(tv.bn1(tv.conv1(x))))
        l1 = tv.layer1(stem)
        l3 = tv.layer3(tv.layer2(l1))
        l4 = tv.layer4(l3)
        low, high = plain(x)
        torch.testing.assert_close(low, l1, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(high, l4, rtol=1e-4, atol=1e-5)
        # At output stride 16 only layer4 is dilated: layer3's output is torchvision's too.
        bb = model.base.backbone.eval()
        got = bb.layer3(bb.layer2(bb.layer1(bb.maxpool(torch.relu(bb.bn1(bb.conv1(x)))))))
        torch.testing.assert_close(got, l3, rtol=1e-4, atol=1e-5)


def tiny_v3plus(tmp, normalization: str) -> tuple:
    from deeplab import synthetic

    synthetic.generate(tmp / "raw", 4, 1, 48, 48, 4, seed=1)
    write_list(tmp / "train.txt", voc_layout_items(tmp / "raw", "train"))
    d = DatasetConfig(name="voc12", n_classes=4, mean_bgr=(100.0, 110.0, 120.0), normalization=normalization)
    m = ModelConfig(arch="deeplabv3plus", output_stride=16, atrous_rates=None, scales=(0.75,), **SMALL)
    model = build_model(4, m.n_blocks, m.width, m.atrous_rates, m.scales, m.arch, m.output_stride)
    init_from_scratch(model, 0)
    torch.save(model.state_dict(), tmp / "init.pt")
    t = TrainConfig(iterations=2, batch_size=2, iter_size=1, crop_size=33, checkpoint_every=2, device="cpu",
                    freeze_bn=False)
    train(d, m, t, tmp / "train.txt", tmp / "init.pt", tmp / "final.pt", tmp / "ck.pt", tmp / "log.csv")
    return tmp / "final.pt"


def test_normalization_travels_with_the_weights_to_predict_and_hub(tmp_path, monkeypatch):
    import hubconf
    from deeplab.config import default_params
    from deeplab.predict import load_model, predict_images

    weights = tiny_v3plus(tmp_path / "run", "imagenet")
    meta = torch.load(weights, weights_only=True)["deeplab"]
    assert meta["arch"] == "deeplabv3plus" and meta["output_stride"] == 16 and meta["input"] == "rgb_imagenet"
    assert meta["atrous_rates"] == [6, 12, 18]

    hub = hubconf.deeplabv3plus_resnet101(weights=str(weights))
    assert hub.meta["normalization"] == "imagenet" and hub.meta["arch"] == "deeplabv3plus"
    with pytest.raises(ValueError, match=r"holds a deeplabv3plus network: load it with deeplabv3plus_resnet101"):
        hubconf.deeplabv3_resnet101(weights=str(weights))
    with pytest.raises(ValueError, match=r"holds a deeplabv3plus network: load it with deeplabv3plus_resnet101"):
        hubconf.deeplabv2_resnet101(weights=str(weights))
    with pytest.raises(ValueError, match="output_stride=8 given, the file's metadata says output_stride=16"):
        hubconf.deeplabv3plus_resnet101(weights=str(weights), output_stride=8)

    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (40, 56, 3), dtype=np.uint8)
    monkeypatch.chdir(tmp_path)  # no params.yaml: the defaults say caffe normalization and deeplabv2
    Image.fromarray(rgb).save(tmp_path / "img.png")
    assert predict_images([tmp_path / "img.png"], weights, tmp_path / "out", device="cpu") == 0
    label = read_label(tmp_path / "out" / "img_label.png")
    model = load_model(weights, default_params())
    with torch.no_grad():
        imagenet = model(to_input(read_image(tmp_path / "img.png"), meta["mean_bgr"], "imagenet")[None])[0]
        caffe = model(to_input(read_image(tmp_path / "img.png"), meta["mean_bgr"], "caffe")[None])[0]
        hubbed = hub(to_input(rgb, hub.meta["mean_bgr"], hub.meta["normalization"])[None])[0]
    assert np.array_equal(label, imagenet.argmax(0).numpy())  # v3+ logits come at the input size
    assert not np.array_equal(label, caffe.argmax(0).numpy())  # the other normalization would differ
    torch.testing.assert_close(hubbed, imagenet)


@pytest.mark.parametrize("arch,stride", [("deeplabv3", 8), ("deeplabv3", 16), ("deeplabv3plus", 8),
                                         ("deeplabv3plus", 16)])
def test_whole_tiny_pipeline_runs_with_v3_archs(tmp_path, arch, stride):
    params = tiny_params(**{"model.arch": arch, "model.output_stride": stride, "model.atrous_rates": None})
    params["model"]["scales"] = []  # single scale, the v3 recipe (and a quarter of the compute of MSC)
    params["train"].update(freeze_bn=False, iterations=6, checkpoint_every=3)
    root = make_project(tmp_path / "repo", params)
    res = run_stages(root, env={"DEEPLAB_TRACKING": "off"})  # MLflow is not under test here (4-5 s a run)
    assert "Running stage 'evaluate@crf'" in res.stdout
    meta = torch.load(root / "data/models/final.pt", weights_only=True)["deeplab"]
    assert meta["arch"] == arch and meta["output_stride"] == stride
    assert read_weights_file(root / "data/models/final.pt")[1]["normalization"] == "caffe"
    logits = np.load(next((root / "data/logits").glob("*.npy")))
    side = 64 if arch == "deeplabv3plus" else math.ceil(64 / stride)  # tiny synthetic images are 64x64
    assert logits.shape == (6, side, side)
    for kind in ("raw", "crf"):
        scores = json.loads((root / "metrics" / kind / "scores.json").read_text())
        assert 0 <= scores["mean_iou"] <= 1
