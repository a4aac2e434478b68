import contextlib
import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from deeplab.config import DatasetConfig, ModelConfig, TrainConfig
from deeplab.data import write_list
from deeplab.models import build_model, init_from_scratch, read_state_dict, read_weights_file
from deeplab.train import (
    RunError,
    memory_hint,
    multi_scale_loss,
    param_groups,
    poly_factor,
    resize_labels,
    train,
)


def test_param_groups_follow_caffe_multipliers():
    model = build_model(5, (1, 1, 1, 1), 8)
    model.train()
    from deeplab.models import freeze_bn

    freeze_bn(model)
    groups = {g["name"]: g for g in param_groups(model, 2.5e-4, 5e-4)}
    assert set(groups) == {"backbone", "aspp_weight", "aspp_bias"}
    assert groups["backbone"]["lr"] == 2.5e-4 and groups["backbone"]["weight_decay"] == 5e-4
    assert groups["aspp_weight"]["lr"] == pytest.approx(2.5e-3) and groups["aspp_weight"]["weight_decay"] == 5e-4
    assert groups["aspp_bias"]["lr"] == pytest.approx(5e-3) and groups["aspp_bias"]["weight_decay"] == 0
    n_conv = sum(1 for n, m in model.named_modules() if isinstance(m, torch.nn.Conv2d) and "aspp" not in n)
    assert len(groups["backbone"]["params"]) == n_conv
    assert len(groups["aspp_weight"]["params"]) == 4 and len(groups["aspp_bias"]["params"]) == 4


def test_poly_schedule_values():
    # lr used at 1-based iteration i: base * (1 - 10*floor((i-1)/10)/T)^0.9
    assert poly_factor(1, 20000, 0.9) == 1.0
    assert poly_factor(10, 20000, 0.9) == 1.0
    assert poly_factor(11, 20000, 0.9) == pytest.approx((1 - 10 / 20000) ** 0.9)
    assert poly_factor(10001, 20000, 0.9) == pytest.approx(0.5**0.9)
    assert poly_factor(20000, 20000, 0.9) == pytest.approx((10 / 20000) ** 0.9)


def test_resize_labels_matches_pil_nearest():
    lab = np.random.default_rng(0).integers(0, 21, size=(41, 41)).astype(np.uint8)
    for size in [(21, 21), (31, 31), (13, 17)]:
        ours = resize_labels(torch.from_numpy(lab.astype(np.int64))[None], size)[0].numpy()
        pil = np.asarray(Image.fromarray(lab).resize(size[::-1], Image.NEAREST))
        assert np.array_equal(ours, pil)


def test_multi_scale_loss_by_hand():
    labels = torch.tensor([[[0, 1], [255, 1]]])
    full = torch.zeros(1, 2, 2, 2)
    full[0, 1] = math.log(3)  # p(class 1) = 3/4 everywhere
    small = torch.zeros(1, 2, 1, 1)  # uniform at 1x1; label nearest-resized from (2,2) is labels[0,1,1] = 1
    loss = multi_scale_loss([full, small], labels)
    expected = (-math.log(1 / 4) - 2 * math.log(3 / 4)) / 3 + math.log(2)
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    assert F.cross_entropy(full, labels, ignore_index=255).item() == pytest.approx(expected - math.log(2), rel=1e-6)


def test_an_output_with_every_label_ignored_adds_nothing_and_trains_on():
    """A crop of unlabelled pixels: cross_entropy's mean over no pixel is NaN, which stopped training as a
    diverged loss (at the same batch on every resume). That output adds 0 and no gradient; others are exact."""
    torch.manual_seed(0)
    labels = torch.full((1, 4, 4), 255)
    labels[0, 0, 0] = 1  # one labelled pixel: lost when shrunk to 1x1 (nearest takes pixel (2, 2))
    full = torch.randn(1, 3, 4, 4, requires_grad=True)
    small = torch.randn(1, 3, 1, 1, requires_grad=True)
    loss = multi_scale_loss([full, small], labels)
    assert torch.equal(loss, F.cross_entropy(full, labels, ignore_index=255))
    loss.backward()
    assert torch.isfinite(full.grad).all() and torch.equal(small.grad, torch.zeros_like(small))
    valid = torch.randint(0, 3, (1, 4, 4))  # nothing ignored: the plain sum, bit for bit
    assert torch.equal(multi_scale_loss([full, small], valid),
                       F.cross_entropy(full, valid) + F.cross_entropy(small, resize_labels(valid, (1, 1))))


@pytest.fixture
def tiny_setup(tmp_path):
    from deeplab import synthetic
    from deeplab.data import voc_layout_items

    synthetic.generate(tmp_path / "raw", 6, 1, 48, 48, 4, seed=1)
    write_list(tmp_path / "train.txt", voc_layout_items(tmp_path / "raw", "train"))
    d = DatasetConfig(n_classes=4)
    m = ModelConfig(n_blocks=(1, 1, 1, 1), width=8)
    model = build_model(4, m.n_blocks, m.width)
    init_from_scratch(model, 0)
    torch.save(model.state_dict(), tmp_path / "init.pt")
    return tmp_path, d, m


def test_bn_frozen_after_steps_and_log_written(tiny_setup):
    tmp, d, m = tiny_setup
    t = TrainConfig(iterations=3, batch_size=2, iter_size=2, crop_size=33, checkpoint_every=2, log_every=1,
                    deterministic=True)
    logged = []
    train(d, m, t, tmp / "train.txt", tmp / "init.pt", tmp / "final.pt", tmp / "ck.pt", tmp / "log.csv",
          on_log=lambda i, loss, lr: logged.append(i))
    init, final = torch.load(tmp / "init.pt"), read_state_dict(tmp / "final.pt")
    bn_keys = [k for k in init if ".bn." in k and not k.endswith("num_batches_tracked")]
    assert bn_keys and all(torch.equal(init[k], final[k]) for k in bn_keys)
    assert not torch.equal(init["base.aspp.c0.weight"], final["base.aspp.c0.weight"])
    key = "base.layer2.block1.reduce.conv.weight"
    assert not torch.equal(init[key], final[key])
    assert logged == [1, 2, 3]
    rows = (tmp / "log.csv").read_text().splitlines()
    assert rows[0] == "iteration,loss,lr" and len(rows) == 4


class Crash(Exception):
    """Raised by ``crash_at``'s callback: a training run stopped part-way, as by a crash."""


def crash_at(stop: int):
    """An ``on_log`` callback that stops training at iteration ``stop`` (its last checkpoint kept)."""
    def on_log(it, loss, lr):
        if it == stop:
            raise Crash
    return on_log


def uninterrupted_and_crashed(tmp: Path, d: DatasetConfig, m: ModelConfig) -> TrainConfig:
    """A 5-iteration run to a.pt, and the same run to b.pt stopped at iteration 3 (its checkpoint at 2 kept);
    returns their TrainConfig."""
    t = TrainConfig(iterations=5, batch_size=2, iter_size=1, crop_size=33, checkpoint_every=2, log_every=1,
                    deterministic=True)
    train(d, m, t, tmp / "train.txt", tmp / "init.pt", tmp / "a.pt", tmp / "a_ck.pt", tmp / "a.csv")
    with pytest.raises(Crash):
        train(d, m, t, tmp / "train.txt", tmp / "init.pt", tmp / "b.pt", tmp / "b_ck.pt", tmp / "b.csv",
              on_log=crash_at(3))
    return t


def test_resume_reproduces_uninterrupted_run(tiny_setup):
    tmp, d, m = tiny_setup
    t = uninterrupted_and_crashed(tmp, d, m)
    assert torch.load(tmp / "b_ck.pt")["iteration"] == 2 and not (tmp / "b.pt").exists()
    seen = []
    res = train(d, m, t, tmp / "train.txt", tmp / "init.pt", tmp / "b.pt", tmp / "b_ck.pt", tmp / "b.csv",
                on_log=lambda it, loss, lr: seen.append(it))
    assert res.resumed_from == 2 and seen == [3, 4, 5]
    a, b = read_state_dict(tmp / "a.pt"), read_state_dict(tmp / "b.pt")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert (tmp / "a.csv").read_text() == (tmp / "b.csv").read_text()


def test_resume_of_v3plus_with_trained_bn_and_dropout_reproduces_uninterrupted_run(tmp_path):
    """v3+ trains BatchNorm and draws dropout masks from torch's RNG: the resumed run must continue that stream
    (the checkpoint holds it), not restart it from train.seed, to end with the uninterrupted run's weights."""
    from deeplab import synthetic
    from deeplab.data import voc_layout_items

    synthetic.generate(tmp_path / "raw", 6, 1, 48, 48, 4, seed=1)
    write_list(tmp_path / "train.txt", voc_layout_items(tmp_path / "raw", "train"))
    d = DatasetConfig(n_classes=4)
    m = ModelConfig(n_blocks=(1, 1, 1, 1), width=8, arch="deeplabv3plus", output_stride=16, atrous_rates=None)
    model = build_model(4, m.n_blocks, m.width, m.atrous_rates, m.scales, m.arch, m.output_stride)
    init_from_scratch(model, 0)
    torch.save(model.state_dict(), tmp_path / "init.pt")
    t = TrainConfig(iterations=4, batch_size=2, iter_size=2, crop_size=33, checkpoint_every=2, log_every=1,
                    deterministic=True, freeze_bn=False, device="cpu")
    args = (d, m, t, tmp_path / "train.txt", tmp_path / "init.pt")
    train(*args, tmp_path / "a.pt", tmp_path / "a_ck.pt", tmp_path / "a.csv")

    with pytest.raises(Crash):
        train(*args, tmp_path / "b.pt", tmp_path / "b_ck.pt", tmp_path / "b.csv", on_log=crash_at(3))
    assert train(*args, tmp_path / "b.pt", tmp_path / "b_ck.pt", tmp_path / "b.csv").resumed_from == 2
    a, b = read_state_dict(tmp_path / "a.pt"), read_state_dict(tmp_path / "b.pt")
    assert any(k.endswith("running_mean") for k in a)  # trained BN buffers are compared too
    assert [k for k in a if not torch.equal(a[k], b[k])] == []
    assert (tmp_path / "a.csv").read_text() == (tmp_path / "b.csv").read_text()


def test_resume_with_other_checkpoint_and_log_intervals_continues_the_run(tiny_setup):
    """After a crash, checkpointing or logging more often changes no weight: the checkpoint is resumed (it was
    ignored as 'written for other params', and training started over), with the uninterrupted run's result."""
    tmp, d, m = tiny_setup
    t = uninterrupted_and_crashed(tmp, d, m)
    often = t.model_copy(update={"checkpoint_every": 1, "log_every": 2})
    res = train(d, m, often, tmp / "train.txt", tmp / "init.pt", tmp / "b.pt", tmp / "b_ck.pt", tmp / "b.csv")
    assert res.resumed_from == 2
    a, b = read_state_dict(tmp / "a.pt"), read_state_dict(tmp / "b.pt")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert (tmp / "a.csv").read_text() == (tmp / "b.csv").read_text()


def test_checkpoint_of_other_params_is_not_resumed(tiny_setup):
    tmp, d, m = tiny_setup
    t = TrainConfig(iterations=2, batch_size=2, iter_size=1, crop_size=33, checkpoint_every=1)
    train(d, m, t, tmp / "train.txt", tmp / "init.pt", tmp / "a.pt", tmp / "ck.pt", tmp / "a.csv")
    res = train(d, m, t.model_copy(update={"lr": 1e-3}), tmp / "train.txt", tmp / "init.pt", tmp / "a.pt",
                tmp / "ck.pt", tmp / "a.csv")
    assert res.resumed_from == 0


def test_diverging_loss_stops_naming_the_iteration_and_keeps_the_last_good_checkpoint(tiny_setup):
    tmp, d, m = tiny_setup
    # lr 0.05 from this init overflows to inf/nan within a few iterations; checkpoints every 2, log every 5.
    t = TrainConfig(iterations=30, batch_size=2, iter_size=1, crop_size=33, checkpoint_every=2, log_every=5,
                    lr=0.05, deterministic=True)
    with pytest.raises(RunError, match=r"at iteration (\d+)") as err:
        train(d, m, t, tmp / "train.txt", tmp / "init.pt", tmp / "final.pt", tmp / "ck.pt", tmp / "log.csv")
    bad = int(re.search(r"iteration (\d+)", str(err.value)).group(1))
    ck = torch.load(tmp / "ck.pt", weights_only=True)
    assert 2 <= ck["iteration"] < bad and f"at iteration {ck['iteration']}, is kept" in str(err.value)
    assert all(torch.isfinite(v).all() for v in ck["model"].values() if v.is_floating_point())
    assert torch.isfinite(ck["log"]).all() and len(ck["log"]) == ck["iteration"]
    assert not (tmp / "final.pt").exists() and not (tmp / "log.csv").exists()
    # A rerun resumes from the kept checkpoint (and stops again at the same place: the run is deterministic).
    with pytest.raises(RunError, match=f"at iteration {bad}"):
        train(d, m, t, tmp / "train.txt", tmp / "init.pt", tmp / "final.pt", tmp / "ck.pt", tmp / "log.csv")


def test_out_of_memory_names_the_params_to_lower():
    with pytest.raises(RunError, match=r"out of memory at step 3: lower train.batch_size") as err:
        with memory_hint("at step 3", "lower train.batch_size"):
            torch.empty(2**62, dtype=torch.uint8)  # the CPU allocator refuses 4 EiB for real
    assert "can't allocate memory" in str(err.value)
    with pytest.raises(RunError, match="Tried to allocate"):
        with memory_hint("at step 3", "lower train.batch_size"):
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
    with pytest.raises(RuntimeError, match="unrelated") as other:  # other errors pass through untouched
        with memory_hint("at step 3", "lower train.batch_size"):
            raise RuntimeError("unrelated")
    assert type(other.value) is RuntimeError



def test_finished_checkpoint_trains_again_from_the_start(tiny_setup, caplog):
    """`dvc repro -f -s train` must retrain: a checkpoint resumes an unfinished run, never a finished one."""
    import logging

    caplog.set_level(logging.INFO, logger="deeplab.train")
    tmp, d, m = tiny_setup
    t = TrainConfig(iterations=4, batch_size=2, iter_size=1, crop_size=33, checkpoint_every=2, log_every=1,
                    deterministic=True)
    train(d, m, t, tmp / "train.txt", tmp / "init.pt", tmp / "a.pt", tmp / "ck.pt", tmp / "a.csv")
    assert torch.load(tmp / "ck.pt", weights_only=True)["iteration"] == 4
    seen = []
    res = train(d, m, t, tmp / "train.txt", tmp / "init.pt", tmp / "b.pt", tmp / "ck.pt", tmp / "b.csv",
                on_log=lambda it, loss, lr: seen.append(it))
    assert res.resumed_from == 0 and seen == [1, 2, 3, 4]
    assert "holds a finished run (iteration 4): training again from the start" in caplog.text
    a, b = read_state_dict(tmp / "a.pt"), read_state_dict(tmp / "b.pt")
    assert all(torch.equal(a[k], b[k]) for k in a)  # deterministic: the rerun reproduces the weights


def test_data_loader_workers_change_no_weight(tmp_path):
    """Probe: the default pipeline with `train.num_workers: 1` wrote another final.pt than with 0 (md5 5734...
    against fe0030...), though checkpoints treat where data loads as changing no weight: a worker has one
    thread, on which torch resized the images with another kernel. Same weights now, main process on 2 threads
    or worker (scale 1.5 of 80 px images: the resize that differed)."""
    from deeplab import synthetic
    from deeplab.data import voc_layout_items
    from tests.conftest import torch_threads

    synthetic.generate(tmp_path / "raw", 4, 1, 80, 80, 4, seed=1)
    write_list(tmp_path / "train.txt", voc_layout_items(tmp_path / "raw", "train"))
    d, m = DatasetConfig(n_classes=4), ModelConfig(n_blocks=(1, 1, 1, 1), width=8, scales=())
    model = build_model(4, m.n_blocks, m.width, m.atrous_rates, m.scales)
    init_from_scratch(model, 0)
    torch.save(model.state_dict(), tmp_path / "init.pt")
    with torch_threads(2):
        for workers in (0, 1):
            t = TrainConfig(iterations=2, batch_size=2, iter_size=1, crop_size=33, scales=(1.5,),
                            num_workers=workers)
            train(d, m, t, tmp_path / "train.txt", tmp_path / "init.pt", tmp_path / f"w{workers}.pt",
                  tmp_path / f"ck{workers}.pt", tmp_path / f"log{workers}.csv")
    a, b = read_state_dict(tmp_path / "w0.pt"), read_state_dict(tmp_path / "w1.pt")
    init = torch.load(tmp_path / "init.pt", weights_only=True)
    assert not torch.equal(a["base.layer1.conv1.conv.weight"], init["base.layer1.conv1.conv.weight"])  # trained
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("workers", [0, 1])
def test_out_of_range_label_stops_training_with_one_line(tiny_setup, workers):
    """Probe: a label value 7 with n_classes 6 crashed train with a bare `IndexError: Target 7 is out of bounds`."""
    from deeplab.data import DataError, read_list, write_label

    tmp, d, m = tiny_setup
    for it in read_list(tmp / "train.txt"):
        write_label(it.label, np.full((48, 48), 7, np.uint8))
    t = TrainConfig(iterations=2, batch_size=2, iter_size=1, crop_size=33, num_workers=workers)
    with pytest.raises(DataError) as err:
        train(d, m, t, tmp / "train.txt", tmp / "init.pt", tmp / "a.pt", tmp / "ck.pt", tmp / "a.csv")
    message = str(err.value)
    assert "\n" not in message and "Traceback" not in message
    assert re.fullmatch(r".*train_\d+\.png: label values 7 \(2304 pixels\) are outside the allowed 0\.\.3 .*", message)


def tiny_trained(tmp: Path, name: str = "voc12", mean_bgr: tuple[float, float, float] = (100.0, 110.0, 120.0)) -> Path:
    """final.pt of a real 2-iteration run of a 4-class (n_blocks 1,1,1,1, width 8) model on synthetic data."""
    from deeplab import synthetic
    from deeplab.data import voc_layout_items

    synthetic.generate(tmp / "raw", 4, 1, 48, 48, 4, seed=1)
    write_list(tmp / "train.txt", voc_layout_items(tmp / "raw", "train"))
    d = DatasetConfig(name=name, n_classes=4, mean_bgr=mean_bgr)
    m = ModelConfig(n_blocks=(1, 1, 1, 1), width=8, scales=(0.75,))
    model = build_model(4, m.n_blocks, m.width, m.atrous_rates, m.scales)
    init_from_scratch(model, 0)
    torch.save(model.state_dict(), tmp / "init.pt")
    t = TrainConfig(iterations=2, batch_size=2, iter_size=1, crop_size=33, checkpoint_every=2, device="cpu")
    train(d, m, t, tmp / "train.txt", tmp / "init.pt", tmp / "final.pt", tmp / "ck.pt", tmp / "log.csv")
    return tmp / "final.pt"


def test_final_weights_carry_the_model_config(tmp_path):
    path = tiny_trained(tmp_path)
    saved = torch.load(path, weights_only=True)  # metadata of str, int, float and lists only
    assert saved["deeplab"] == {
        "format": 1, "arch": "deeplabv2", "n_classes": 4, "n_blocks": [1, 1, 1, 1], "width": 8,
        "atrous_rates": [6, 12, 18, 24], "scales": [0.75],
        "class_names": ["background", "aeroplane", "bicycle", "bird"], "dataset": "voc12",
        "input": "bgr_mean_subtracted", "mean_bgr": [100.0, 110.0, 120.0]}
    state, meta = read_weights_file(path)
    assert state.keys() == build_model(4, (1, 1, 1, 1), 8).state_dict().keys()
    assert meta["n_blocks"] == (1, 1, 1, 1) and meta["class_names"][1] == "aeroplane"
    assert not torch.equal(state["base.aspp.c0.weight"], torch.load(tmp_path / "init.pt")["base.aspp.c0.weight"])


def test_unreadable_checkpoint_is_named_without_torch_advice(tiny_setup):
    tmp, d, m = tiny_setup
    (tmp / "ck.pt").write_bytes(b"PK\x03\x04 not a checkpoint")
    t = TrainConfig(iterations=2, batch_size=2, iter_size=1, crop_size=33)
    with pytest.raises(RunError, match=r"ck\.pt: not a PyTorch weights file.*; delete it to train from the start") as e:
        train(d, m, t, tmp / "train.txt", tmp / "init.pt", tmp / "a.pt", tmp / "ck.pt", tmp / "a.csv")
    assert "weights_only" not in str(e.value)


def test_training_follows_the_lr_policy_and_warmup(tiny_setup):
    tmp, d, m = tiny_setup
    t = TrainConfig(iterations=4, batch_size=1, iter_size=1, crop_size=33, checkpoint_every=4, log_every=1,
                    lr=1e-3, lr_policy="cosine", lr_step=1, warmup_iterations=2, warmup_start_factor=0.5)
    train(d, m, t, tmp / "train.txt", tmp / "init.pt", tmp / "final.pt", tmp / "ck.pt", tmp / "log.csv")
    lrs = [float(line.split(",")[2]) for line in (tmp / "log.csv").read_text().splitlines()[1:]]
    cos = [0.5 * (1 + math.cos(math.pi * k / 4)) for k in range(4)]
    assert lrs == pytest.approx([1e-3 * f for f in (0.5 * cos[0], 0.75 * cos[1], cos[2], cos[3])], rel=1e-5)


def test_training_applies_the_augmentation_options(tiny_setup):
    """scale_range and blur_prob reach the training data: each changes the weights of a deterministic run
    (test_resume_reproduces_uninterrupted_run shows equal settings give equal weights)."""
    tmp, d, m = tiny_setup
    t = TrainConfig(iterations=2, batch_size=2, iter_size=1, crop_size=33, checkpoint_every=2, deterministic=True,
                    device="cpu")
    weights = {}
    for name, update in {"v2": {}, "range": {"scale_range": (0.6, 1.4)}, "blur": {"blur_prob": 1.0}}.items():
        train(d, m, t.model_copy(update=update), tmp / "train.txt", tmp / "init.pt", tmp / f"{name}.pt",
              tmp / f"{name}_ck.pt", tmp / f"{name}.csv")
        weights[name] = read_state_dict(tmp / f"{name}.pt")["base.aspp.c0.weight"]
    assert not torch.equal(weights["v2"], weights["range"]) and not torch.equal(weights["v2"], weights["blur"])


def test_train_stage_resumed_after_sigterm_logs_the_whole_loss_series(tmp_path):
    """The MLflow run of a resumed train stage holds train_loss from iteration log_every on, as an uninterrupted
    run's does (it held only the iterations after the checkpoint), and says where it resumed."""
    import signal
    import subprocess
    import sys
    import time

    from mlflow.tracking import MlflowClient

    from tests.conftest import NO_TRACKING, make_project, run_env, run_stages, tiny_params

    params = tiny_params(**{"train.iterations": 80, "train.checkpoint_every": 10, "train.log_every": 10})
    root = make_project(tmp_path / "repo", params)
    run_stages(root, "download", "prepare", "init", env=NO_TRACKING)
    ck = root / "data/checkpoints/last.pt"
    proc = subprocess.Popen([sys.executable, "-m", "stages.train"], cwd=root, env=run_env(root),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        with contextlib.suppress(Exception):  # the file may be replaced while it is read
            if ck.exists() and torch.load(ck, weights_only=True)["iteration"] >= 20:
                break
        time.sleep(0.05)
    assert proc.poll() is None, proc.stderr.read()[-2000:]
    proc.send_signal(signal.SIGTERM)
    proc.communicate(timeout=60)
    resumed_at = torch.load(ck, weights_only=True)["iteration"]
    assert 20 <= resumed_at < 80
    res = subprocess.run([sys.executable, "-m", "stages.train"], cwd=root, env=run_env(root), capture_output=True,
                         text=True)
    assert res.returncode == 0, res.stderr[-3000:]
    client = MlflowClient(tracking_uri=f"sqlite:///{root / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("deeplab").experiment_id],
                              "tags.`deeplab.stage` = 'train'", order_by=["attributes.start_time DESC"])
    assert [r.info.status for r in runs] == ["FINISHED", "KILLED"]
    assert runs[0].data.tags["deeplab.resumed_from"] == str(resumed_at)
    history = client.get_metric_history(runs[0].info.run_id, "train_loss")
    assert sorted(m.step for m in history) == list(range(10, 81, 10))
    logged = {int(line.split(",")[0]): float(line.split(",")[1])
              for line in (root / "metrics/train_log.csv").read_text().splitlines()[1:]}
    assert all(m.value == pytest.approx(logged[m.step], abs=1e-6) for m in history)


def test_training_runs_on_over_a_label_with_every_pixel_ignored(tiny_setup):
    tmp, d, m = tiny_setup
    from deeplab.data import read_list

    label = read_list(tmp / "train.txt")[0].label  # every image is drawn in the first 6 iterations
    with Image.open(label) as im:
        unlabelled = Image.fromarray(np.full((im.height, im.width), 255, np.uint8), mode="P")
        unlabelled.putpalette(im.getpalette() or [])
    unlabelled.save(label)
    t = TrainConfig(iterations=6, batch_size=1, iter_size=1, crop_size=33, checkpoint_every=6, log_every=1,
                    device="cpu")
    train(d, m, t, tmp / "train.txt", tmp / "init.pt", tmp / "final.pt", tmp / "ck.pt", tmp / "log.csv")
    losses = [float(line.split(",")[1]) for line in (tmp / "log.csv").read_text().splitlines()[1:]]
    assert 0.0 in losses and all(math.isfinite(v) for v in losses)
