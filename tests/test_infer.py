import numpy as np
import pytest
import torch

from deeplab import infer, synthetic
from deeplab.config import DatasetConfig
from deeplab.data import read_label, voc_layout_items, write_list
from deeplab.loader import SegmentationDataset
from deeplab.models import build_model, init_from_scratch
from deeplab.train import RunError


@pytest.fixture
def val_set(tmp_path):
    synthetic.generate(tmp_path / "raw", 1, 3, 40, 56, 4, seed=2)
    write_list(tmp_path / "val.txt", voc_layout_items(tmp_path / "raw", "val"))
    model = build_model(4, (1, 1, 1, 1), 8)
    init_from_scratch(model, 0)
    return tmp_path, model, SegmentationDataset(tmp_path / "val.txt", DatasetConfig().mean_bgr)


def test_channels_last_gives_the_same_logits(val_set):
    tmp, model, dataset = val_set
    for name, cl in (("nchw", False), ("nhwc", True)):
        n = infer.dump_logits(model, dataset, tmp / name, tmp / f"{name}_pred", torch.device("cpu"), channels_last=cl)
        assert n == 3
    for k in range(3):
        image_id = dataset.items[k].image_id
        a, b = (np.load(tmp / name / f"{image_id}.npy") for name in ("nchw", "nhwc"))
        assert a.dtype == np.float16 and a.shape == (4, 6, 8)  # stride 8 of 40x56 (Caffe ceil pooling)
        np.testing.assert_allclose(a.astype(np.float32), b.astype(np.float32), atol=2e-2, rtol=1e-2)
        pred = read_label(tmp / "nhwc_pred" / f"{image_id}.png")
        assert pred.shape == (40, 56)


def test_inference_out_of_memory_names_the_image(val_set, monkeypatch):
    tmp, model, dataset = val_set

    def huge(model, image, amp=False):  # a real allocator failure, as a too-large image would cause
        return torch.empty(2**62, dtype=torch.uint8)

    monkeypatch.setattr(infer, "predict_logits", huge)
    with pytest.raises(RunError, match=r"out of memory on image \S+ \(40x56\): .*logits.amp"):
        infer.dump_logits(model, dataset, tmp / "logits", tmp / "pred", torch.device("cpu"))


@pytest.fixture
def full_disk(tmp_path):
    """A real filesystem with almost no room: a 64 KiB tmpfs (needs root, as CI runs here)."""
    import os
    import subprocess

    mnt = tmp_path / "small"
    mnt.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mnt)]).returncode:
        pytest.skip("mounting a small tmpfs needs root")
    fd = os.open(mnt / "filler", os.O_WRONLY | os.O_CREAT)
    try:  # fill it up
        while os.write(fd, b"\0" * 4096):
            pass
    except OSError:
        pass
    finally:
        os.close(fd)
    yield mnt
    subprocess.run(["umount", str(mnt)], check=True)


def test_full_disk_is_one_error_naming_the_output_folder(val_set, full_disk):
    tmp, model, dataset = val_set
    with pytest.raises(RunError, match=rf"no space left on the device writing the logits of val_00000: free space "
                                       rf"where {full_disk}/logits and {tmp}/pred live") as err:
        infer.dump_logits(model, dataset, full_disk / "logits", tmp / "pred", torch.device("cpu"))
    assert "No space left on device" in str(err.value)
    assert not [p for p in (full_disk / "logits").iterdir()]  # no partial .npy left behind
