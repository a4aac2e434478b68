import pytest
import yaml

from deeplab.config import ParamsError, load_params
from tests.conftest import REPO


def write(tmp_path, data):
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(data))
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


def test_missing_and_malformed_file(tmp_path):
    with pytest.raises(ParamsError, match="file not found"):
        load_params(tmp_path / "nope.yaml")
    (tmp_path / "bad.yaml").write_text("crf: [unclosed")
    with pytest.raises(ParamsError, match="bad.yaml: not valid YAML"):
        load_params(tmp_path / "bad.yaml")


def test_checkpoint_init_needs_path(tmp_path):
    with pytest.raises(ParamsError, match="init.path is required"):
        load_params(write(tmp_path, {"init": {"source": "checkpoint"}}))
