"""Every stage of dvc.yaml through to metrics on each real dataset's fixture archives, downloaded from loopback.

The stages run in one process (conftest.run_stages): what is under test is each dataset's way through the
stages' code; DVC's part, the same for every dataset, is tests/test_pipeline.py's."""

import json

import pytest

from tests.conftest import NO_TRACKING, make_project, run_stages, stages_run, tiny_params
from tests.official_layouts import ArchiveServer, cocostuff10k_archive, cocostuff164k_archives, md5, voc_archives

CASES = {
    "voc12": (voc_archives, dict(n_classes=21, train_split="train_aug", val_split="val"), 3),
    "cocostuff10k": (cocostuff10k_archive, dict(n_classes=182, train_split="train", val_split="test",
                                                warp_size=49), 3),
    "cocostuff164k": (cocostuff164k_archives, dict(n_classes=182, train_split="train2017", val_split="val2017"), 3),
}


@pytest.mark.parametrize("name", list(CASES))
def test_pipeline_on_fixture_dataset(tmp_path, name):
    build, dataset, n_val = CASES[name]
    files = build()
    with ArchiveServer() as server:
        server.files.update(files)
        params = tiny_params()
        params["dataset"] = {
            **{k: v for k, v in params["dataset"].items() if k != "synthetic"},
            "name": name, "base_url": server.url,
            "checksums": {f: {"md5": md5(data)} for f, data in files.items()}, **dataset}
        params["train"]["iterations"] = 4
        root = make_project(tmp_path / "repo", params)
        res = run_stages(root, env=NO_TRACKING)  # MLflow is not under test here
    assert "crf" in stages_run(res.stdout)
    assert sorted(p.name for p in (root / "data" / "downloads").iterdir() if p.suffix != ".json") == sorted(files)
    for kind in ("raw", "crf"):
        scores = json.loads((root / "metrics" / kind / "scores.json").read_text())
        assert 0 <= scores["mean_iou"] <= 1
        rows = (root / "metrics" / kind / "class_iou.csv").read_text().splitlines()
        assert len(rows) == 1 + dataset["n_classes"]
        n_listed = len((root / "data" / "prepared" / f"{dataset['val_split']}.txt").read_text().splitlines())
        assert n_listed >= n_val
        assert len(list((root / "data" / "predictions" / kind).glob("*.png"))) == n_listed
    expected_first = {"voc12": "background", "cocostuff10k": "person", "cocostuff164k": "person"}[name]
    assert rows[1].startswith(f"{expected_first},")
