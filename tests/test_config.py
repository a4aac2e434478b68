import logging
import math
import re

import pytest
import torch
import yaml

from deeplab.config import ParamsError, load_params, min_crop_size
from deeplab.models import build_model, freeze_bn
from deeplab.train import train_step
from tests.conftest import REPO


def complete(data: dict) -> dict:
    """The repo's params.yaml with the sections/keys of ``data`` merged in (every section is required)."""
    p = yaml.safe_load((REPO / "params.yaml").read_text())
    for section, values in data.items():
        if isinstance(values, dict):
            p[section] = {**p.get(section, {}), **values}
        else:
            p[section] = values
    return p


def write(tmp_path, data, whole: bool = False):
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(data if whole else complete(data)))
    return path


def test_repo_params_are_valid():
    p = load_params(REPO / "params.yaml")
    assert p.dataset.name == "synthetic"
    assert p.crf.bi_xy_std == 67.0


def test_unknown_key_named(tmp_path):
    with pytest.raises(ParamsError, match=r"crf\.iterationz: unknown key"):
        load_params(write(tmp_path, {"crf": {"iterationz": 3}}))


def test_bad_choice_lists_allowed_values(tmp_path):
    with pytest.raises(ParamsError, match=r"train\.device: Input should be 'auto', 'cpu' or 'cuda'"):
        load_params(write(tmp_path, {"train": {"device": "tpu"}}))


def test_wrong_type_named(tmp_path):
    with pytest.raises(ParamsError, match=r"train\.iterations: .*integer.*'many'"):
        load_params(write(tmp_path, {"train": {"iterations": "many"}}))
    with pytest.raises(ParamsError, match=r"train\.lr: Input should be greater than 0"):
        load_params(write(tmp_path, {"train": {"lr": -1}}))


@pytest.mark.parametrize(("section", "key", "value"), [
    ("model", "scales", [math.inf]), ("train", "lr", math.inf), ("crf", "bi_xy_std", math.inf),
    ("dataset", "mean_bgr", [-math.inf, 1.0, 1.0]), ("crf", "bi_w", math.nan)])
def test_infinite_or_nan_numbers_are_named(tmp_path, section, key, value):
    """Probe: `model.scales: [.inf]` stopped load with a bare `OverflowError: cannot convert float infinity to
    integer`; `train.lr`, `crf.bi_xy_std` and `dataset.mean_bgr` took .inf and ran on. (YAML writes .inf.)"""
    path = write(tmp_path, {section: {key: value}})
    assert ".inf" in path.read_text() or ".nan" in path.read_text()
    with pytest.raises(ParamsError, match=rf"{section}\.{key}(\.\d)?: Input should be a finite number"):
        load_params(path)


def test_top_level_seed_is_accepted_with_a_warning_naming_the_seeds_that_count(tmp_path, caplog):
    """Probe: every params file had to hold a top-level `seed` that nothing read (no stage lists it either), so
    `seed: 1` changed nothing, silently. It is accepted (older files keep loading) with a warning."""
    caplog.set_level(logging.WARNING, logger="deeplab.config")
    assert load_params(write(tmp_path, {"seed": 1})).seed == 1
    assert "seed: 1 is read by nothing" in caplog.text
    assert all(k in caplog.text for k in ("dataset.synthetic.seed", "init.seed", "train.seed"))
    caplog.clear()
    for path in (REPO / "params.yaml", *sorted((REPO / "presets").glob("*.yaml"))):
        assert load_params(path).seed is None, path  # the project's own files no longer hold it
    assert "seed" not in caplog.text


def test_missing_and_malformed_file(tmp_path):
    with pytest.raises(ParamsError, match="file not found"):
        load_params(tmp_path / "nope.yaml")
    (tmp_path / "bad.yaml").write_text("crf: [unclosed")
    with pytest.raises(ParamsError, match="bad.yaml: not valid YAML"):
        load_params(tmp_path / "bad.yaml")


def test_checkpoint_init_needs_path(tmp_path):
    with pytest.raises(ParamsError, match="init.path is required"):
        load_params(write(tmp_path, {"init": {"source": "checkpoint"}}))


@pytest.mark.parametrize("preset", sorted((REPO / "presets").glob("*.yaml")), ids=lambda p: p.name)
def test_every_preset_loads(preset):
    p = load_params(preset)
    assert p.dataset.name == preset.stem.removeprefix("eval_").split("_")[0] and p.model.n_blocks == (3, 4, 23, 3)


def _dvc_param_keys() -> set[str]:
    keys = set()
    for stage in yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"].values():
        for entry in stage.get("do", stage).get("params", []):
            keys.update(entry if isinstance(entry, dict) else [entry])
    return keys


@pytest.mark.parametrize("preset", sorted((REPO / "presets").glob("*.yaml")), ids=lambda p: p.name)
def test_every_preset_defines_every_param_dvc_reads(preset):
    # DVC fails a stage whose listed param is missing from params.yaml, even where our config has a default.
    data = yaml.safe_load(preset.read_text())
    for key in _dvc_param_keys():
        node = data
        for part in key.split("."):
            assert isinstance(node, dict) and part in node, f"{preset.name} lacks {key}, which dvc.yaml reads"
            node = node[part]
    # dvc.yaml's ${...} values: DVC stops with a bare "unexpected error" on a missing or null one.
    for key in re.findall(r"\$\{([a-z_.]+)\}", (REPO / "dvc.yaml").read_text()):
        node = data
        for part in key.split("."):
            node = node.get(part) if isinstance(node, dict) else None
        assert node is not None or key == "item", f"{preset.name}: {key} is null or missing; dvc.yaml interpolates it"


def test_empty_file_names_every_missing_section(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text("")
    with pytest.raises(ParamsError) as e:
        load_params(path)
    assert str(e.value) == (f"{path}: invalid parameters\n  missing sections: dataset, model, init, train, "
                            "logits, crf, evaluate (every section must be in the file; params.yaml and presets/ are "
                            "complete examples)")


def test_missing_sections_named(tmp_path):
    data = complete({})
    del data["crf"], data["evaluate"]
    with pytest.raises(ParamsError, match=r"params\.yaml: invalid parameters\n  missing sections: crf, evaluate \("):
        load_params(write(tmp_path, data, whole=True))


def test_unknown_key_suggests_the_closest_allowed_key(tmp_path):
    with pytest.raises(ParamsError, match=r"  crf\.bi_ww: unknown key; did you mean crf\.bi_w\? \(allowed crf keys: "
                                          r"backend, device, .*, bi_w, n_jobs, batch_size, reference_image_quirk\)"):
        load_params(write(tmp_path, {"crf": {"bi_ww": 3}}))
    with pytest.raises(ParamsError, match=r"  dataset\.synthetic\.heigth: unknown key; did you mean "
                                          r"dataset\.synthetic\.height\? \(allowed dataset\.synthetic keys: n_train"):
        load_params(write(tmp_path, {"dataset": {"synthetic": {"heigth": 3}}}))
    with pytest.raises(ParamsError, match=r"  trian: unknown key; did you mean train\? \(allowed sections: seed, "
                                          r"dataset, model"):
        load_params(write(tmp_path, {"trian": {}}))
    with pytest.raises(ParamsError, match=r"  crf\.zzz: unknown key \(allowed crf keys: backend"):
        load_params(write(tmp_path, {"crf": {"zzz": 3}}))


def test_ignore_label_must_not_be_a_class(tmp_path):
    with pytest.raises(ParamsError, match=r"dataset\.ignore_label \(3\) is a class index: it must be at least "
                                          r"dataset\.n_classes \(6\)"):
        load_params(write(tmp_path, {"dataset": {"ignore_label": 3}}))
    assert load_params(write(tmp_path, {"dataset": {"ignore_label": 6}})).dataset.ignore_label == 6


def trains(crop: int, scales: tuple[float, ...], batch_size: int = 2, frozen_bn: bool = True) -> bool:
    """One real training step of a tiny DeepLab v2 on ``crop``-pixel crops (train.train_step, MSC loss)."""
    torch.manual_seed(0)
    model = build_model(3, (1, 1, 1, 1), 8, (6, 12, 18, 24), scales).train()
    if frozen_bn:
        freeze_bn(model)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    batch = (torch.randn(batch_size, 3, crop, crop), torch.randint(0, 3, (batch_size, crop, crop)), None)
    try:
        return bool(torch.isfinite(train_step(model, opt, iter([batch]), 1, torch.device("cpu"))))
    except (RuntimeError, ValueError):
        return False


@pytest.mark.parametrize(("scales", "bn_batch", "need"), [((0.5, 0.75), None, 2), ((), None, 1), ((0.3,), None, 4),
                                                          ((1 / 3,), None, 3), ((0.1, 1.5), None, 10),
                                                          ((0.5, 0.75), 1, 14)])
def test_min_crop_size_is_what_training_needs(scales, bn_batch, need):
    """The bound is exact: a real training step runs at it and fails one pixel below."""
    assert min_crop_size(scales, bn_batch) == need
    frozen = bn_batch is None
    assert trains(need, scales, batch_size=bn_batch or 2, frozen_bn=frozen)
    if need > 1:
        assert not trains(need - 1, scales, batch_size=bn_batch or 2, frozen_bn=frozen)


def test_crop_size_below_the_model_minimum(tmp_path):
    with pytest.raises(ParamsError, match=r"train\.crop_size: 1 is below the minimum 2 for this model: every "
                                          r"model\.scales \[0\.5, 0\.75\] input, floor\(crop_size x scale\), needs "
                                          r"at least one pixel"):
        load_params(write(tmp_path, {"train": {"crop_size": 1}}))
    with pytest.raises(ParamsError, match=r"train\.crop_size: 9 is below the minimum 10 "):
        load_params(write(tmp_path, {"train": {"crop_size": 9}, "model": {"scales": [0.1]}}))
    with pytest.raises(ParamsError, match=r"train\.crop_size: 13 is below the minimum 14 .*train\.freeze_bn false "
                                          r"and train\.batch_size 1, BatchNorm"):
        load_params(write(tmp_path, {"train": {"crop_size": 13, "freeze_bn": False, "batch_size": 1}}))
    assert load_params(write(tmp_path, {"train": {"crop_size": 2}})).train.crop_size == 2
    assert load_params(write(tmp_path, {"train": {"crop_size": 1}, "model": {"scales": []}})).train.crop_size == 1
