"""``deeplab predict``: any image files and folders, weights in every supported format, CRF, resizing, errors."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from typer.testing import CliRunner

from deeplab.caffe import write_caffemodel
from deeplab.cli import app
from deeplab.config import CrfConfig, ParamsError, default_params
from deeplab.data import PALETTE, read_image, read_label
from deeplab.infer import predict_logits, upsample_argmax, upsample_probs
from deeplab.loader import to_input
from deeplab.models import build_model, init_from_scratch, read_weights_file
from deeplab.predict import (
    MIN_SIDE,
    find_images,
    load_model,
    network_size,
    output_stems,
    predict_label,
    resolve_params,
    with_metadata,
)
from deeplab.viz import present_classes
from tests.conftest import tiny_params

N_CLASSES = 6
# A complete params file (every section is required), with the tiny model of tiny_model().
TINY = tiny_params(**{"dataset.n_classes": N_CLASSES})


def tiny_model(n_classes: int = N_CLASSES, seed: int = 0) -> torch.nn.Module:
    model = build_model(n_classes, (1, 1, 1, 1), 8)
    init_from_scratch(model, seed)
    with torch.no_grad():  # a head strong enough that predictions vary across the image
        for name, p in model.named_parameters():
            if ".aspp." in name and name.endswith("weight"):
                p.normal_(0, 0.5, generator=torch.Generator().manual_seed(seed))
    return model.eval()


@pytest.fixture
def setup(tmp_path: Path) -> dict[str, Path]:
    params = tmp_path / "tiny.yaml"
    params.write_text(yaml.safe_dump(TINY))
    weights = tmp_path / "final.pt"
    torch.save(tiny_model().state_dict(), weights)
    return {"params": params, "weights": weights, "root": tmp_path}


def photo(h: int, w: int, seed: int = 0) -> np.ndarray:
    """Smooth colour blobs: something the network gives several classes on."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w] / max(h, w)
    chans = [np.sin(x * rng.uniform(3, 9) + rng.uniform(0, 6)) * np.cos(y * rng.uniform(3, 9)) for _ in range(3)]
    return ((np.stack(chans, -1) + 1) * 127.5).astype(np.uint8)


def write_inputs(folder: Path) -> dict[str, tuple[int, int]]:
    """The test images and the (height, width) each label must have."""
    folder.mkdir(parents=True, exist_ok=True)
    Image.fromarray(photo(48, 64)).save(folder / "normal.jpg", quality=90)
    Image.fromarray(photo(30, 40, 1)).convert("L").save(folder / "gray.png")
    rgba = np.dstack([photo(36, 52, 2), np.full((36, 52), 128, np.uint8)])
    Image.fromarray(rgba, "RGBA").save(folder / "alpha.png")
    # Stored 60 wide x 40 tall; orientation 6 (rotate 90 clockwise) makes it 40 wide x 60 tall.
    exif = Image.Exif()
    exif[274] = 6
    Image.fromarray(photo(40, 60, 3)).save(folder / "rotated.jpg", exif=exif)
    (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    (folder / "notes.txt").write_text("not an image: skipped by suffix")
    return {"normal": (48, 64), "gray": (30, 40), "alpha": (36, 52), "rotated": (60, 40)}


def run(*args: str | Path) -> object:
    return CliRunner().invoke(app, ["predict", *map(str, args)])


def test_folder_of_mixed_images_and_a_corrupt_file(setup):
    root = setup["root"]
    expected = write_inputs(root / "images")
    out = root / "out"
    result = run(root / "images", "--model", setup["weights"], "--params", setup["params"], "--out", out,
                 "--device", "cpu")
    assert result.exit_code == 1, result.output
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "broken.jpg" in errors[0]
    written = sorted(p.name for p in out.iterdir())
    assert written == sorted(f"{s}_{k}.png" for s in expected for k in ("label", "overlay"))
    for stem, (h, w) in expected.items():
        with Image.open(out / f"{stem}_label.png") as im:
            assert im.mode == "P" and im.size == (w, h)
            assert np.array_equal(np.frombuffer(bytes(im.getpalette()), np.uint8).reshape(-1, 3), PALETTE)
        label = read_label(out / f"{stem}_label.png")
        assert label.max() < N_CLASSES
        with Image.open(out / f"{stem}_overlay.png") as im:
            assert im.width >= 2 * w and im.height > h  # image | blend, legend below
        assert str(root / "images" / f"{stem}") in result.stdout
    assert not any(p.name.startswith(".") for p in out.iterdir())  # no temporary files left


def test_all_good_exits_0_and_missing_input_is_named(setup):
    root = setup["root"]
    Image.fromarray(photo(33, 47)).save(root / "one.png")
    common = ["--model", setup["weights"], "--params", setup["params"], "--out", root / "out", "--device", "cpu"]
    result = run(root / "one.png", *common)
    assert result.exit_code == 0, result.output
    assert result.stderr == ""
    assert (root / "out" / "one_label.png").is_file()

    result = run(root / "one.png", root / "nowhere.jpg", *common)
    assert result.exit_code == 1
    assert "nowhere.jpg" in result.stderr
    assert (root / "out" / "one_overlay.png").is_file()


def test_out_beside_the_images_never_overwrites_an_input(setup):
    """--out the images' folder, holding x.png and x_label.png: x's label map would replace the photo
    x_label.png before it is read. Refused before anything is written; without such a name it runs. An --out
    that is a file is named once (every image failed with '[Errno 17] File exists')."""
    root = setup["root"]
    photos = root / "photos"
    photos.mkdir()
    Image.fromarray(photo(33, 47)).save(photos / "x.png")
    Image.fromarray(photo(33, 47, 1)).save(photos / "x_label.png")
    before = {p.name: p.read_bytes() for p in photos.iterdir()}
    common = ["--model", setup["weights"], "--params", setup["params"], "--out", photos, "--device", "cpu"]
    result = run(photos, *common)
    assert result.exit_code == 1
    assert (f"error: {photos / 'x_label.png'}: an input image that the output {photos / 'x_label.png'} would "
            "overwrite (1 such inputs): give --out a folder apart from the images") in result.stderr
    assert {p.name: p.read_bytes() for p in photos.iterdir()} == before
    (root / "a_file").touch()
    result = run(photos / "x.png", *common[:-3], root / "a_file", "--device", "cpu")
    assert result.exit_code == 1 and f"error: --out {root / 'a_file'}: exists and is not a folder\n" == result.stderr
    (photos / "x_label.png").rename(photos / "y.png")
    assert run(photos, *common).exit_code == 0
    assert sorted(p.name for p in photos.iterdir()) == ["x.png", "x_label.png", "x_overlay.png", "y.png",
                                                        "y_label.png", "y_overlay.png"]


def test_checkpoint_plain_state_dict_and_caffemodel_give_the_same_labels(setup):
    from tests.test_caffe import small_layers

    root = setup["root"]
    Image.fromarray(photo(41, 57, 5)).save(root / "img.png")
    checkpoint = root / "ckpt.pt"
    torch.save({"model": torch.load(setup["weights"]), "iteration": 7}, checkpoint)
    labels = []
    for weights in (setup["weights"], checkpoint):
        result = run(root / "img.png", "--model", weights, "--params", setup["params"], "--out", root / weights.stem)
        assert result.exit_code == 0, result.output
        labels.append(read_label(root / weights.stem / "img_label.png"))
    assert np.array_equal(labels[0], labels[1])

    _, layers = small_layers(n_classes=N_CLASSES)
    caffemodel = root / "small.caffemodel"
    write_caffemodel(caffemodel, layers)
    result = run(root / "img.png", "--model", caffemodel, "--params", setup["params"], "--out", root / "caffe")
    assert result.exit_code == 0, result.output
    assert read_label(root / "caffe" / "img_label.png").shape == (41, 57)


def test_wrong_head_or_architecture_is_an_error_naming_the_file(setup):
    root = setup["root"]
    Image.fromarray(photo(20, 20)).save(root / "img.png")
    result = run(root / "img.png", "--model", setup["weights"], "--params", setup["params"], "--n-classes", "4")
    assert result.exit_code == 1
    assert str(setup["weights"]) in result.stderr and "6 classes" in result.stderr and "4 classes" in result.stderr
    assert not (root / "predictions").exists()

    wide = root / "wide.yaml"
    wide.write_text(yaml.safe_dump({**TINY, "model": {"n_blocks": [1, 1, 1, 1], "width": 16}}))
    result = run(root / "img.png", "--model", setup["weights"], "--params", wide)
    assert result.exit_code == 1 and "width 8" in result.stderr and "width 16" in result.stderr

    result = run(root / "img.png", "--model", root / "missing.pt", "--params", setup["params"])
    assert result.exit_code == 1 and "missing.pt" in result.stderr


def test_crf_and_max_size(setup):
    root = setup["root"]
    Image.fromarray(photo(90, 150, 7)).save(root / "big.png")
    common = ["--model", setup["weights"], "--params", setup["params"], "--device", "cpu"]
    for extra, name in (([], "plain"), (["--crf"], "crf"), (["--max-size", "64"], "small"),
                        (["--crf", "--max-size", "64"], "small_crf")):
        result = run(root / "big.png", *common, "--out", root / name, *extra)
        assert result.exit_code == 0, result.output
        assert read_label(root / name / "big_label.png").shape == (90, 150)
    # The CRF changes something but keeps the classes the network found.
    plain, crf = read_label(root / "plain" / "big_label.png"), read_label(root / "crf" / "big_label.png")
    assert set(np.unique(crf)) <= set(np.unique(plain))


def test_predict_label_matches_the_evaluation_path(setup):
    """No CRF, no resizing: the argmax of ``upsample_probs`` of the MSC logits, as the logits stage writes."""
    model = tiny_model()
    rgb = photo(45, 61, 9)
    mean = (104.008, 116.669, 122.675)
    logits = predict_logits(model, to_input(rgb, mean)[None])[0]
    expected = upsample_probs(logits, (45, 61)).argmax(0).numpy()
    assert np.array_equal(predict_label(model, rgb, mean, torch.device("cpu")), expected)
    crf = predict_label(model, rgb, mean, torch.device("cpu"), crf=CrfConfig())
    assert crf.shape == (45, 61) and crf.dtype == np.uint8


def test_upsample_argmax_in_chunks_equals_full_argmax():
    logits = torch.randn(21, 7, 9, generator=torch.Generator().manual_seed(0))
    full = upsample_probs(logits, (50, 70)).argmax(0)
    for chunk in (1, 4, 16, 64):
        assert torch.equal(upsample_argmax(logits, (50, 70), chunk).long(), full)


def test_network_size():
    assert network_size(300, 400, None) == (300, 400)
    assert network_size(300, 400, 200) == (150, 200)
    assert network_size(300, 400, 500) == (300, 400)
    assert network_size(5, 3, None) == (27, MIN_SIDE)  # tiny images are enlarged for the 0.5x branch
    model = tiny_model()
    label = predict_label(model, photo(5, 3), (0, 0, 0), torch.device("cpu"))
    assert label.shape == (5, 3)


def test_find_images_and_output_stems(tmp_path):
    (tmp_path / "d").mkdir()
    (tmp_path / "e").mkdir()
    for name in ("b.png", "a.JPG", "a.png", ".hidden.png", "readme.md"):
        (tmp_path / "d" / name).write_bytes(b"")
    (tmp_path / "x").write_bytes(b"")
    found, errors = find_images([tmp_path / "d", tmp_path / "d" / "b.png", tmp_path / "x", tmp_path / "e",
                                 tmp_path / "nope"])
    assert [p.name for p in found] == ["a.JPG", "a.png", "b.png", "x"]
    assert len(errors) == 2 and "e: no image files" in errors[0] and "nope" in errors[1]
    assert output_stems([Path("d/a.jpg"), Path("d/a.png"), Path("b.png"), Path("x/b.png"), Path("c.png")]) == \
        ["a_jpg", "a_png", "b_png", "b_png_2", "c"]


def test_resolve_params(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert resolve_params().model.n_blocks == (3, 4, 23, 3)  # no params.yaml: ResNet-101 defaults
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(TINY))
    p = resolve_params()
    assert (p.dataset.name, p.dataset.n_classes, p.model.width) == ("synthetic", 6, 8)
    assert resolve_params(dataset="voc12").dataset.n_classes == 21
    assert resolve_params(dataset="voc12", n_classes=5).dataset.n_classes == 5
    assert resolve_params(n_classes=3).dataset.n_classes == 3
    with pytest.raises(ParamsError, match="--dataset"):
        resolve_params(dataset="imagenet")
    with pytest.raises(ParamsError, match="--n-classes"):
        resolve_params(n_classes=1)
    with pytest.raises(ParamsError, match="missing.yaml"):
        resolve_params(Path("missing.yaml"))


def test_predict_help_shows_flags_without_a_value():
    result = CliRunner().invoke(app, ["predict", "--help"], env={"COLUMNS": "250", "TERMINAL_WIDTH": "250"})
    assert result.exit_code == 0
    assert "<bool>" not in result.output  # --crf and --help take no value
    crf = next(line for line in result.output.splitlines() if line.strip().startswith("--crf"))
    assert re.fullmatch(r"\s*--crf\s+Refine with the dense CRF \(crf\.\* from the params\)\.\s*", crf), crf
    flat = " ".join(result.output.split())  # click wraps the help at 80 columns
    assert "--params <path>" in flat and "A params file must hold every section." in flat


def test_resolve_params_rejects_a_partial_file(tmp_path, monkeypatch):
    """Only the absence of any params file falls back to the built-in defaults; a file must be complete."""
    monkeypatch.chdir(tmp_path)
    partial = tmp_path / "partial.yaml"
    partial.write_text(yaml.safe_dump({"model": {"n_blocks": [1, 1, 1, 1], "width": 8}}))
    with pytest.raises(ParamsError, match=r"partial\.yaml: invalid parameters\n  missing sections: dataset, "
                                          r"init, train, logits, crf, evaluate"):
        resolve_params(partial)
    (tmp_path / "params.yaml").write_text("")
    with pytest.raises(ParamsError, match="params.yaml: invalid parameters\n  missing sections: dataset, model"):
        resolve_params()


def test_load_model_is_strict(setup):
    model = load_model(setup["weights"], resolve_params(setup["params"]))
    assert not model.training
    for k, v in torch.load(setup["weights"]).items():
        assert torch.equal(model.state_dict()[k], v)


def test_legend_lists_only_present_classes_in_order():
    names = ["background", "disc", "box", "triangle", "ring", "stripe-band"]
    label = np.array([[5, 0, 0], [3, 3, 5]], np.uint8)
    assert present_classes(label, names) == [(0, "background"), (3, "triangle"), (5, "stripe-band")]
    assert present_classes(np.array([[1, 9, 255]], np.uint8), names) == [(1, "disc"), (9, "class9"), (255, "ignore")]


def test_trained_weights_predict_by_path_alone(tmp_path, monkeypatch):
    from tests.test_train import tiny_trained

    weights = tiny_trained(tmp_path / "run")  # voc12 names, 4 classes, width 8, mean (100, 110, 120)
    monkeypatch.chdir(tmp_path)  # no params.yaml: the built-in defaults are ResNet-101 with 6 synthetic classes
    Image.fromarray(photo(40, 56, 4)).save(tmp_path / "img.png")
    result = run(tmp_path / "img.png", "--model", weights, "--out", tmp_path / "out", "--device", "cpu")
    assert result.exit_code == 0, result.output
    label = read_label(tmp_path / "out" / "img_label.png")
    model = load_model(weights, default_params())
    assert model.scales == (0.75,)
    # The file's input mean and class names are used, not the params' defaults.
    expected = predict_label(model, read_image(tmp_path / "img.png"), (100.0, 110.0, 120.0), torch.device("cpu"))
    assert np.array_equal(label, expected)
    p, names = with_metadata(weights, read_weights_file(weights)[1], default_params())
    assert names == ["background", "aeroplane", "bicycle", "bird"] and p.dataset.mean_bgr == (100.0, 110.0, 120.0)
    assert f"({', '.join(names[c] for c in np.unique(label))})" in result.stdout

    result = run(tmp_path / "img.png", "--model", weights, "--n-classes", "6", "--out", tmp_path / "bad")
    assert result.exit_code == 1 and "--n-classes 6 given, but the weights were trained with 4" in result.stderr
    result = run(tmp_path / "img.png", "--model", weights, "--dataset", "synthetic", "--out", tmp_path / "bad")
    assert result.exit_code == 1
    assert "--dataset synthetic given, but the weights were trained with voc12" in result.stderr
    assert not (tmp_path / "bad").exists()
