import re

import pytest
import torch

from deeplab.models import (
    MSC,
    build_from_metadata,
    build_model,
    calibrate_bn,
    conflicts,
    freeze_bn,
    init_from_scratch,
    load_weights,
    output_size,
    read_state_dict,
    read_weights_file,
    weights_file,
)


@pytest.mark.parametrize("size,expected", [(321, 41), (513, 65), (240, 31), (160, 21)])
def test_output_stride_8_sizes_match_reference(size, expected):
    assert output_size(size) == expected


def test_resnet101_layout_and_keys():
    model = build_model(21)
    sd = model.state_dict()
    # ResNet-101 blocks per stage, Caffe-style stride on the first 1x1 of res3.
    assert len([k for k in sd if k.startswith("base.layer4.") and k.endswith("reduce.conv.weight")]) == 23
    assert model.base.layer3.block1.reduce.conv.stride == (2, 2)
    assert model.base.layer3.block1.conv3x3.conv.stride == (1, 1)
    assert model.base.layer4.block1.conv3x3.conv.dilation == (2, 2)
    assert model.base.layer5.block3.conv3x3.conv.dilation == (4, 4)
    assert [model.base.aspp.get_submodule(f"c{i}").dilation for i in range(4)] == [(r, r) for r in (6, 12, 18, 24)]
    assert sd["base.aspp.c3.weight"].shape == (21, 2048, 3, 3)
    assert model.base.layer1.pool.ceil_mode


def test_small_model_shapes_and_msc_outputs():
    model = build_model(5, (1, 1, 1, 1), 8)
    x = torch.randn(2, 3, 97, 97)
    model.train()
    outs = model(x)
    assert [tuple(o.shape[-2:]) for o in outs] == [(13, 13), (7, 7), (10, 10), (13, 13)]
    model.eval()
    with torch.no_grad():
        fused = model(x)
        one = model.base(x)
    assert fused.shape == (2, 5, 13, 13)
    assert torch.all(fused >= one - 1e-6)


def test_msc_fuses_by_elementwise_max():
    class Const(torch.nn.Module):
        def forward(self, x):  # logits that depend on the input scale only through its size
            return torch.full((x.shape[0], 2, 4, 4), float(x.shape[-1]))

    msc = MSC(Const(), (0.5, 0.75)).eval()
    out = msc(torch.zeros(1, 3, 32, 32))
    assert torch.all(out == 32.0)  # the 1x output is the largest
    msc.train()
    assert len(msc(torch.zeros(1, 3, 32, 32))) == 4


def test_aspp_is_summed_not_concatenated():
    model = build_model(3, (1, 1, 1, 1), 8).eval()
    feats = torch.randn(1, 256, 5, 5)
    aspp = model.base.aspp
    expected = sum(aspp.get_submodule(f"c{i}")(feats) for i in range(4))
    assert torch.allclose(aspp(feats), expected)


def test_scratch_init_is_seeded_and_calibration_normalises():
    a, b = build_model(4, (1, 1, 1, 1), 8), build_model(4, (1, 1, 1, 1), 8)
    init_from_scratch(a, 3)
    init_from_scratch(b, 3)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True))
    images = [torch.randn(4, 3, 49, 49) * 60 for _ in range(3)]
    assert calibrate_bn(a, images) == 12
    bn1 = a.base.layer1.conv1.bn
    assert bn1.running_var.mean() > 100  # raw-pixel scale inputs measured, so frozen BN normalises them


def test_freeze_bn_keeps_eval_and_no_grad():
    model = build_model(4, (1, 1, 1, 1), 8)
    model.train()
    freeze_bn(model)
    bns = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert all(not m.training and not m.weight.requires_grad for m in bns)


def test_load_weights_fresh_head_on_class_mismatch(tmp_path):
    src = build_model(7, (1, 1, 1, 1), 8)
    torch.save(src.state_dict(), tmp_path / "w.pt")
    dst = build_model(4, (1, 1, 1, 1), 8)
    fresh = load_weights(dst, tmp_path / "w.pt")
    assert sorted(fresh) == sorted(f"base.aspp.c{i}.{p}" for i in range(4) for p in ("weight", "bias"))
    assert torch.equal(dst.base.layer2.block1.reduce.conv.weight, src.base.layer2.block1.reduce.conv.weight)


def test_load_weights_rejects_missing_backbone_and_garbage(tmp_path):
    model = build_model(4, (1, 1, 1, 1), 8)
    sd = model.state_dict()
    del sd["base.layer3.block1.reduce.conv.weight"]
    torch.save(sd, tmp_path / "partial.pt")
    with pytest.raises(ValueError, match="layer3.block1.reduce.conv.weight: missing"):
        load_weights(model, tmp_path / "partial.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="junk.pt: not a PyTorch weights file"):
        load_weights(model, tmp_path / "junk.pt")


class Payload:
    """A custom class: torch.save pickles it by reference, so loading it would run this module's code."""

    def __init__(self) -> None:
        self.w = torch.zeros(2)


def test_pickled_objects_are_refused_without_weights_only_advice(tmp_path):
    torch.save({"model": build_model(4, (1, 1, 1, 1), 8).state_dict(), "extra": Payload()}, tmp_path / "pickled.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError) as err:
        read_state_dict(tmp_path / "pickled.pt")
    message = str(err.value)
    assert "pickled.pt: not a plain weights file" in message and "tests.test_models.Payload" in message
    assert "torch.save(model.state_dict(), 'weights.pt')" in message
    with pytest.raises(ValueError) as junk:
        read_state_dict(tmp_path / "junk.pt")
    assert "junk.pt: not a PyTorch weights file" in str(junk.value)
    for text in (message, str(junk.value)):
        assert "weights_only" not in text and "Weights only" not in text


def test_weights_file_metadata_round_trip_and_checks(tmp_path):
    model = build_model(3, (1, 1, 1, 1), 8, scales=())
    meta = dict(n_classes=3, n_blocks=(1, 1, 1, 1), width=8, atrous_rates=(6, 12, 18, 24), scales=(),
                class_names=("a", "b", "c"), dataset="synthetic", mean_bgr=(1, 2, 3))
    torch.save(weights_file(model.state_dict(), **meta), tmp_path / "w.pt")
    state, read = read_weights_file(tmp_path / "w.pt")
    assert state.keys() == model.state_dict().keys()
    assert {k: read[k] for k in meta} == {**meta, "mean_bgr": (1.0, 2.0, 3.0)}
    assert load_weights(build_from_metadata(read), tmp_path / "w.pt") == []
    assert conflicts(read, n_classes=3, width=16, n_blocks=[1, 1, 1, 1], atrous_rates=None) == [("width", 8, 16)]

    saved = torch.load(tmp_path / "w.pt", weights_only=True)
    for change, error in (({"format": 2}, "format 2, this code reads format 1"),
                          ({"arch": "deeplabv4"}, "arch is 'deeplabv4'"),
                          ({"input": "rgb"}, "input is 'rgb'"),
                          ({"width": None}, "malformed"),
                          ({"class_names": ["a"]}, "1 class names for 3 classes")):
        torch.save({**saved, "deeplab": {**saved["deeplab"], **change}}, tmp_path / "bad.pt")
        with pytest.raises(ValueError, match=rf"bad\.pt: .*{re.escape(error)}"):
            read_weights_file(tmp_path / "bad.pt")


def test_v3_metadata_records_arch_stride_and_normalization(tmp_path):
    small = dict(n_blocks=(1, 1, 1, 1), width=8, scales=(0.5,))
    model = build_model(3, atrous_rates=None, arch="deeplabv3", output_stride=16, **small)
    names = ("a", "b", "c")
    torch.save(weights_file(model.state_dict(), n_classes=3, atrous_rates=None, class_names=names, dataset="synthetic",
                            mean_bgr=(1, 2, 3), arch="deeplabv3", output_stride=16, normalization="imagenet", **small),
               tmp_path / "v3.pt")
    saved = torch.load(tmp_path / "v3.pt", weights_only=True)["deeplab"]
    assert (saved["arch"], saved["output_stride"], saved["input"], saved["atrous_rates"]) == (
        "deeplabv3", 16, "rgb_imagenet", [6, 12, 18])
    _, meta = read_weights_file(tmp_path / "v3.pt")
    assert meta["normalization"] == "imagenet"
    assert load_weights(build_from_metadata(meta), tmp_path / "v3.pt") == []
    assert conflicts(meta, arch="deeplabv3plus", output_stride=16) == [("arch", "deeplabv3", "deeplabv3plus")]
    # A v2 file stays as before (no output_stride key) and reads as stride 8, caffe input.
    v2 = build_model(3, **small)
    torch.save(weights_file(v2.state_dict(), n_classes=3, atrous_rates=(6, 12, 18, 24), class_names=names,
                            dataset="synthetic", mean_bgr=(1, 2, 3), **small), tmp_path / "v2.pt")
    assert "output_stride" not in torch.load(tmp_path / "v2.pt", weights_only=True)["deeplab"]
    _, meta = read_weights_file(tmp_path / "v2.pt")
    assert (meta["output_stride"], meta["normalization"]) == (8, "caffe")


def test_without_extra_scales_training_gives_one_output_for_one_loss():
    from deeplab.train import multi_scale_loss, resize_labels

    torch.manual_seed(0)
    model = build_model(4, (1, 1, 1, 1), 8, scales=()).train()
    x = torch.randn(2, 3, 33, 33)
    outputs = model(x)
    labels = torch.randint(0, 4, (2, 33, 33))
    one = torch.nn.functional.cross_entropy(outputs[0], resize_labels(labels, outputs[0].shape[-2:]))
    assert len(outputs) == 1 and torch.equal(multi_scale_loss(outputs, labels), one)
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(x), model.base(x))
