"""torch.hub entry point, loaded the way users load it: ``torch.hub.load(<repo>, ..., source="local")``."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from deeplab.models import MSC, build_model, init_from_scratch, read_state_dict

REPO = Path(__file__).resolve().parents[1]
SMALL = {"n_blocks": (1, 1, 1, 1), "width": 8}


def hub(**kwargs: object) -> MSC:
    return torch.hub.load(str(REPO), "deeplabv2_resnet101", source="local", **kwargs)


def test_hubconf_needs_only_torch():
    spec = importlib.util.spec_from_file_location("hubconf_under_test", REPO / "hubconf.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.dependencies == ["torch"]
    assert "ResNet-101" in module.deeplabv2_resnet101.__doc__


def test_resnet101_weights_round_trip(tmp_path):
    ref = build_model(21)
    init_from_scratch(ref, 3)
    path = tmp_path / "r101.pt"
    torch.save(ref.state_dict(), path)
    model = hub(n_classes=21, weights=str(path))
    assert isinstance(model, MSC) and not model.training and model.scales == (0.5, 0.75)
    got = model.state_dict()
    assert got.keys() == ref.state_dict().keys()
    assert len(got) > 500  # ResNet-101: 104 conv+BN units
    for k, v in ref.state_dict().items():
        assert torch.equal(got[k], v), k


def test_small_variant_checkpoint_and_forward(tmp_path):
    ref = build_model(5, **SMALL)
    init_from_scratch(ref, 0)
    path = tmp_path / "ckpt.pt"
    torch.save({"model": ref.state_dict(), "iteration": 3}, path)
    model = hub(n_classes=5, weights=path, scales=(0.75,), **SMALL)
    assert model.scales == (0.75,)
    ref.scales = (0.75,)
    x = torch.randn(1, 3, 41, 53, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = model(x)
        assert torch.equal(out, ref.eval()(x))
    assert out.shape == (1, 5, 6, 7)

    fresh = hub(n_classes=5, **SMALL)  # no weights: the fresh model
    assert not fresh.training


def test_head_of_another_class_count_is_an_error(tmp_path):
    path = tmp_path / "five.pt"
    torch.save(build_model(5, **SMALL).state_dict(), path)
    with pytest.raises(ValueError, match=r"five\.pt.*n_classes=3.*5 classes"):
        hub(n_classes=3, weights=str(path), **SMALL)
    with pytest.raises(ValueError, match=r"five\.pt: weights do not fit"):
        hub(n_classes=5, weights=str(path), n_blocks=(1, 1, 2, 1), width=8)
    with pytest.raises(FileNotFoundError, match="missing.pt"):
        hub(n_classes=5, weights=str(tmp_path / "missing.pt"), **SMALL)


@pytest.mark.parametrize("scales", [(0.0,), (0.5, -1.0), (float("nan"),), ("0.5",)])
def test_scales_that_are_no_positive_numbers_are_refused_at_load(scales):
    """Not at the first forward, as a zero scale did (interpolating to an empty input)."""
    with pytest.raises(ValueError, match=r"deeplabv2_resnet101: scales must be positive numbers, got \["):
        hub(n_classes=5, scales=scales, **SMALL)


def test_trained_weights_load_by_path_alone(tmp_path):
    from tests.test_train import tiny_trained

    path = tiny_trained(tmp_path)
    model = hub(weights=str(path))  # no n_classes, n_blocks, width: the file's metadata says them
    assert isinstance(model, MSC) and not model.training and model.scales == (0.75,)
    assert model.meta["class_names"] == ("background", "aeroplane", "bicycle", "bird")
    assert model.meta["mean_bgr"] == (100.0, 110.0, 120.0)
    state = read_state_dict(path)
    assert model.state_dict().keys() == state.keys()
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())
    with torch.no_grad():
        assert model(torch.randn(1, 3, 41, 53)).shape == (1, 4, 6, 7)
    assert hub(weights=path, n_classes=4, n_blocks=[1, 1, 1, 1], width=8).state_dict().keys() == state.keys()
    assert hub(weights=path, scales=(0.5, 1.25)).scales == (0.5, 1.25)  # an inference choice, not the weights'

    with pytest.raises(ValueError, match=r"final\.pt: n_classes=21 given, the file's metadata says n_classes=4"):
        hub(weights=path, n_classes=21)
    with pytest.raises(ValueError, match=r"n_blocks=\(3, 4, 23, 3\) given, the file's metadata says "
                                         r"n_blocks=\(1, 1, 1, 1\); width=64 given.*width=8"):
        hub(weights=path, n_blocks=(3, 4, 23, 3), width=64)
    with pytest.raises(TypeError, match="depth"):
        hub(weights=path, depth=101)
    assert hub(n_classes=4, **SMALL).meta is None  # no weights: as before


@pytest.fixture
def hub_dir(tmp_path):
    """torch.hub's cache dir in tmp_path for the test (torch.hub.set_dir is process-wide)."""
    old = torch.hub.get_dir()
    torch.hub.set_dir(str(tmp_path / "hub"))
    yield tmp_path / "hub"
    torch.hub.set_dir(old)


def test_reference_style_pretrained_downloads_into_the_hub_cache(hub_dir, tmp_path):
    """The reference's call, torch.hub.load(repo, "deeplabv2_resnet101", pretrained=..., n_classes=...), with tiny
    weights saved as the reference released them (a plain state dict, keys base.*) on a loopback mirror."""
    import hashlib

    from tests.official_layouts import ArchiveServer

    ref = build_model(182, **SMALL)
    init_from_scratch(ref, 1)
    path = tmp_path / "release.pth"
    torch.save(ref.state_dict(), path)
    data = path.read_bytes()
    name = "deeplabv2_resnet101_msc-cocostuff164k-100000.pth"
    with ArchiveServer() as server:
        server.files[name] = data
        model = hub(pretrained="cocostuff164k", n_classes=182, base_url=server.url, **SMALL)
        again = hub(pretrained="cocostuff164k", scales=None, base_url=server.url, **SMALL)  # n_classes: 182
        assert server.log == [(name, None)]  # the second call used the cache
        with pytest.raises(ValueError, match=r"pretrained='cocostuff164k' has 182 classes, n_classes=21 given"):
            hub(pretrained="cocostuff164k", n_classes=21, base_url=server.url, **SMALL)
        with pytest.raises(ValueError, match=r"pretrained='ade20k': not a released model \(known: cocostuff10k, "):
            hub(pretrained="ade20k", base_url=server.url, **SMALL)
    assert (hub_dir / "checkpoints" / name).read_bytes() == data
    recorded = json.loads((hub_dir / "checkpoints" / "recorded.json").read_text())
    assert recorded[name] == {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    for m in (model, again):
        assert isinstance(m, MSC) and m.training and m.scales == (0.5, 0.75)  # the reference returns train mode
        assert all(torch.equal(m.state_dict()[k], v) for k, v in ref.state_dict().items())
    with pytest.raises(TypeError, match="not both"):
        hub(pretrained="voc12", weights=str(path))


def test_reference_defaults_without_weights_and_head_from_a_plain_file(tmp_path):
    assert hub(**SMALL).base.aspp.c0.out_channels == 182  # the reference's default n_classes
    path = tmp_path / "five.pt"
    torch.save(build_model(5, **SMALL).state_dict(), path)
    model = hub(weights=str(path), **SMALL)  # n_classes from the file's head
    assert model.base.aspp.c0.out_channels == 5 and not model.training
