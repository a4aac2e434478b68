import numpy as np
import pytest
import torch

from deeplab.config import CrfConfig
from deeplab.crf import (
    choose_n_jobs,
    dense_crf,
    reference_quirk_image,
    run_crf,
    torch_batch_size,
    worker_memory,
)
from deeplab.data import Item, read_label
from deeplab.infer import load_logits, save_logits


def two_region_case(h=64, w=64):
    rgb = np.zeros((h, w, 3), np.uint8)
    rgb[:, w // 2:] = (200, 40, 40)
    rgb[:, : w // 2] = (30, 30, 160)
    truth = np.zeros((h, w), np.uint8)
    truth[:, w // 2:] = 1
    rng = np.random.default_rng(0)
    probs = np.where(truth[None] == np.arange(2)[:, None, None], 0.6, 0.4).astype(np.float32)
    flip = rng.random((h, w)) < 0.25  # a quarter of the pixels get the wrong class from the unary
    probs[:, flip] = probs[::-1, flip]
    return rgb, truth, probs


def test_dense_crf_cleans_noise_along_colour_edges():
    rgb, truth, probs = two_region_case()
    before = (probs.argmax(0) == truth).mean()
    after = (dense_crf(probs, rgb, CrfConfig()) == truth).mean()
    assert before < 0.8 and after > 0.99


def test_reference_quirk_wraps_negatives():
    rgb = np.array([[[0, 117, 255]]], np.uint8)  # R, G, B
    out = reference_quirk_image(rgb, (104.008, 116.669, 122.675))
    # BGR - mean = (150.992, 0.331, -122.675) -> trunc -> (150, 0, -122) -> low byte (150, 0, 134)
    assert out[0, 0].tolist() == [150, 0, 134]


def test_n_jobs_capped_by_memory(monkeypatch, caplog):
    import logging

    import deeplab.crf as crf

    caplog.set_level(logging.INFO)
    monkeypatch.setattr(crf, "available_memory", lambda: 5 * worker_memory(182, 513, 513) // 2)
    assert choose_n_jobs(64, 182, 513, 513) == 2
    assert "capping n_jobs from 64 to 2" in caplog.text
    assert worker_memory(182, 513, 513) / 2**30 == pytest.approx(2.0, rel=0.25)


def test_run_crf_writes_maps_and_skips_done(tmp_path):
    from PIL import Image

    rgb, truth, probs = two_region_case(48, 48)
    Image.fromarray(rgb).save(tmp_path / "a.png")
    logits = torch.from_numpy(np.log(probs[:, ::8, ::8].copy()))
    save_logits(tmp_path / "logits" / "a.npy", logits)
    assert np.load(tmp_path / "logits" / "a.npy").dtype == np.float16
    assert load_logits(tmp_path / "logits" / "a.npy").shape == (2, 6, 6)
    items = [Item("a", tmp_path / "a.png", tmp_path / "a.png")]
    assert run_crf(items, tmp_path / "logits", tmp_path / "out", CrfConfig(), (0, 0, 0), n_jobs=1) == 1
    assert read_label(tmp_path / "out" / "a.png").shape == (48, 48)
    assert run_crf(items, tmp_path / "logits", tmp_path / "out", CrfConfig(), (0, 0, 0), n_jobs=1) == 0


def _logit_set(tmp_path, n=3):
    from PIL import Image

    items = []
    rng = np.random.default_rng(3)
    for k in range(n):
        rgb, truth, probs = two_region_case(40 + 8 * k, 48)
        rgb = np.roll(rgb, 5 * k, axis=1)
        Image.fromarray(rgb).save(tmp_path / f"{k}.png")
        noisy = np.log(probs + rng.uniform(0, 0.3, probs.shape)).astype(np.float32)
        save_logits(tmp_path / "logits" / f"{k}.npy", torch.from_numpy(noisy[:, ::8, ::8].copy()))
        items.append(Item(str(k), tmp_path / f"{k}.png", tmp_path / f"{k}.png"))
    return items


def test_dask_cluster_gives_the_loky_labels(tmp_path):
    from dask.distributed import LocalCluster

    items = _logit_set(tmp_path)
    run_crf(items, tmp_path / "logits", tmp_path / "loky", CrfConfig(), (0, 0, 0), n_jobs=2)
    with LocalCluster(n_workers=2, threads_per_worker=1, host="127.0.0.1", dashboard_address=None,
                      processes=True) as cluster:
        cfg = CrfConfig(parallel="dask", scheduler=cluster.scheduler_address)
        assert run_crf(items, tmp_path / "logits", tmp_path / "dask", cfg, (0, 0, 0), n_jobs=2) == len(items)
    for it in items:
        name = f"{it.image_id}.png"
        assert np.array_equal(read_label(tmp_path / "loky" / name), read_label(tmp_path / "dask" / name))
    with pytest.raises(ValueError, match="crf.scheduler"):
        run_crf(items, tmp_path / "logits", tmp_path / "none", CrfConfig(parallel="dask"), (0, 0, 0), n_jobs=1)


def test_torch_backend_batches_same_size_images_with_the_same_labels(tmp_path):
    from PIL import Image

    items = []
    rng = np.random.default_rng(5)
    for k, h in enumerate([40, 48, 40, 48, 40]):  # sorted by size, batches of 2: [40, 40], [40], [48, 48]
        rgb, _, probs = two_region_case(h, 48)
        Image.fromarray(np.roll(rgb, 3 * k, axis=1)).save(tmp_path / f"{k}.png")
        noisy = np.log(probs + rng.uniform(0, 0.3, probs.shape)).astype(np.float32)
        save_logits(tmp_path / "logits" / f"{k}.npy", torch.from_numpy(noisy[:, ::8, ::8].copy()))
        items.append(Item(str(k), tmp_path / f"{k}.png", tmp_path / f"{k}.png"))
    for batch_size in (1, 2):
        cfg = CrfConfig(backend="torch", device="cpu", batch_size=batch_size)
        assert run_crf(items, tmp_path / "logits", tmp_path / f"b{batch_size}", cfg, (0, 0, 0), n_jobs=1) == 5
    run_crf(items, tmp_path / "logits", tmp_path / "pydensecrf", CrfConfig(), (0, 0, 0), n_jobs=1)
    for it in items:
        one, two = (read_label(tmp_path / f"b{b}" / f"{it.image_id}.png") for b in (1, 2))
        assert one.shape == (40 if it.image_id in "024" else 48, 48) and np.array_equal(one, two)
        assert (one == read_label(tmp_path / "pydensecrf" / f"{it.image_id}.png")).mean() > 0.999


def test_torch_batch_size_from_free_memory():
    assert torch_batch_size(torch.device("cpu"), 182, 513, 513) == 1
    cuda = torch.device("cuda")
    assert torch_batch_size(cuda, 182, 513, 513, free_bytes=80 * 2**30) == 16  # capped
    assert torch_batch_size(cuda, 182, 513, 513, free_bytes=10 * 2**30) == 4  # ~1.7 GB per image
    assert torch_batch_size(cuda, 21, 513, 513, free_bytes=10 * 2**30) == 11  # ~0.67 GB per image
    assert torch_batch_size(cuda, 182, 513, 513, free_bytes=2**20) == 1


def test_same_size_batches_split_on_size_and_limit():
    from deeplab.crf import _same_size_batches

    entries = [(k, None, np.zeros((h, 8, 3), np.uint8)) for k, h in enumerate([4, 4, 4, 6, 6, 4])]
    batches = list(_same_size_batches(iter(entries), lambda e: 2))
    assert [[e[0] for e in b] for b in batches] == [[0, 1], [2], [3, 4], [5]]


def test_finished_maps_are_keyed_to_settings_and_inputs(tmp_path):
    """A map made with other CRF params, or from other logits, is never reused; the same inputs and settings are."""
    items = _logit_set(tmp_path)
    logits, progress = tmp_path / "logits", tmp_path / "progress"
    strong, none = CrfConfig(), CrfConfig(bi_w=0.0, pos_w=0.0)

    def maps(out):
        return {it.image_id: read_label(out / f"{it.image_id}.png") for it in items}

    assert run_crf(items, logits, tmp_path / "out", strong, (0, 0, 0), 1, progress) == 3
    first = maps(tmp_path / "out")
    assert run_crf(items, logits, tmp_path / "out", none, (0, 0, 0), 1, progress) == 3  # not "3 already done"
    without = maps(tmp_path / "out")
    # No pairwise terms: the CRF keeps the unary's argmax, which differs from the smoothed maps.
    assert any(not np.array_equal(first[k], without[k]) for k in first)
    assert run_crf(items, logits, tmp_path / "fresh", none, (0, 0, 0), 1, tmp_path / "p2") == 3
    assert all(np.array_equal(without[k], v) for k, v in maps(tmp_path / "fresh").items())
    # Flipping back reuses the first maps; n_jobs does not change the key.
    assert run_crf(items, logits, tmp_path / "out", strong.model_copy(update={"n_jobs": 2}), (0, 0, 0), 2,
                   progress) == 0
    assert all(np.array_equal(first[k], v) for k, v in maps(tmp_path / "out").items())
    # New logits for one image: only that image is recomputed.
    save_logits(logits / "1.npy", torch.from_numpy(np.load(logits / "1.npy").astype(np.float32)[::-1].copy()))
    assert run_crf(items, logits, tmp_path / "out", strong, (0, 0, 0), 1, progress) == 1


def test_corrupt_truncated_or_nonfinite_logits_are_named(tmp_path):
    from deeplab.data import DataError

    items = _logit_set(tmp_path, n=2)
    path = tmp_path / "logits" / "1.npy"
    good = np.load(path)
    path.write_bytes(path.read_bytes()[:60])  # truncated inside the data
    for n_jobs in (1, 2):  # in this process, and re-raised from a loky worker
        with pytest.raises(DataError, match=r"1\.npy: cannot read logits"):
            run_crf(items, tmp_path / "logits", tmp_path / f"out{n_jobs}", CrfConfig(), (0, 0, 0), n_jobs)
    bad = good.copy()
    bad[0, 0, 0] = np.nan
    np.save(path, bad)
    with pytest.raises(DataError, match=r"1\.npy: logits hold NaN or infinite values \(1 of"):
        run_crf(items, tmp_path / "logits", tmp_path / "out", CrfConfig(), (0, 0, 0), 1)
    path.unlink()
    with pytest.raises(DataError, match=r"1\.npy: logits file not found"):
        run_crf(items, tmp_path / "logits", tmp_path / "out", CrfConfig(), (0, 0, 0), 1)


def test_a_subset_run_keeps_the_other_images_maps(tmp_path):
    """crf.subset runs the first N images: the finished maps of the rest stay, so the full split after a
    search on part of it computes nothing it already had."""
    items = _logit_set(tmp_path)
    logits, progress = tmp_path / "logits", tmp_path / "progress"
    assert run_crf(items, logits, tmp_path / "all", CrfConfig(), (0, 0, 0), 1, progress) == 3
    assert run_crf(items[:1], logits, tmp_path / "sub", CrfConfig(), (0, 0, 0), 1, progress) == 0
    assert sorted(p.name for p in (tmp_path / "sub").iterdir()) == ["0.png"]
    assert run_crf(items, logits, tmp_path / "again", CrfConfig(), (0, 0, 0), 1, progress) == 0
    # Maps of the subset's own images made from other logits are still replaced.
    save_logits(logits / "0.npy", torch.from_numpy(np.load(logits / "0.npy").astype(np.float32)[::-1].copy()))
    assert run_crf(items[:1], logits, tmp_path / "sub", CrfConfig(), (0, 0, 0), 1, progress) == 1
    assert len(list(next(progress.iterdir()).glob("0.*.png"))) == 1


def test_ids_naming_a_folder_of_other_ids(tmp_path):
    """Ids 'a' and 'a/b' (a split list's subfolders): the store's folder 'a' was taken for a stale map of id
    'a' and unlinked, an IsADirectoryError on every run."""
    from PIL import Image

    rgb, _, probs = two_region_case(48, 48)
    Image.fromarray(rgb).save(tmp_path / "img.png")
    logits = torch.from_numpy(np.log(probs[:, ::8, ::8].copy()))
    items = [Item(i, tmp_path / "img.png", tmp_path / "img.png") for i in ("a", "a/b")]
    for it in items:
        save_logits(tmp_path / "logits" / f"{it.image_id}.npy", logits)
    assert run_crf(items, tmp_path / "logits", tmp_path / "out", CrfConfig(), (0, 0, 0), n_jobs=1) == 2
    assert read_label(tmp_path / "out" / "a.png").shape == read_label(tmp_path / "out" / "a" / "b.png").shape
    assert run_crf(items, tmp_path / "logits", tmp_path / "out", CrfConfig(), (0, 0, 0), n_jobs=1) == 0
    save_logits(tmp_path / "logits" / "a" / "b.npy", -logits)  # new logits of a/b: its old map is stale
    assert run_crf(items, tmp_path / "logits", tmp_path / "out", CrfConfig(), (0, 0, 0), n_jobs=1) == 1
    (store,) = (tmp_path / "out.progress").iterdir()
    assert len(list((store / "a").iterdir())) == 1 and len(list(store.glob("a.*.png"))) == 1
