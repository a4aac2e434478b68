"""The capstone's augmentation options in deeplab.loader (continuous scale range, Gaussian blur), seeded per
draw, and the DeepLab v2 path they leave unchanged when off; crops that do not depend on the thread count."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from scipy.ndimage import gaussian_filter

from deeplab.config import TrainConfig
from deeplab.loader import Augment, augment, gaussian_blur
from tests.conftest import torch_threads


def _sample(h: int = 20, w: int = 24) -> tuple[torch.Tensor, np.ndarray]:
    rng = np.random.default_rng(7)
    image = torch.from_numpy(rng.normal(0, 50, (3, h, w)).astype(np.float32))
    label = rng.integers(0, 5, (h, w)).astype(np.uint8)
    return image, label


def _v2_augment(image: torch.Tensor, label: np.ndarray, crop: int, scales, seed: int, draw: int):
    """DeepLab v2's augmentation written out: discrete scale, pad bottom/right, crop, flip, in that draw order."""
    rng = np.random.default_rng([seed, draw])
    s = float(rng.choice(scales))
    h, w = label.shape
    nh, nw = int(h * s), int(w * s)
    if (nh, nw) != (h, w):
        image = F.interpolate(image[None], size=(nh, nw), mode="bilinear", align_corners=False)[0]
        label = np.asarray(Image.fromarray(label).resize((nw, nh), Image.NEAREST))
    ph, pw = max(crop - nh, 0), max(crop - nw, 0)
    image = F.pad(image, (0, pw, 0, ph), value=0.0)
    label = np.pad(label, ((0, ph), (0, pw)), constant_values=255)
    y, x = int(rng.integers(0, label.shape[0] - crop + 1)), int(rng.integers(0, label.shape[1] - crop + 1))
    image, label = image[:, y:y + crop, x:x + crop], label[y:y + crop, x:x + crop]
    if rng.random() < 0.5:
        image, label = image.flip(-1), label[:, ::-1]
    return image, label


def test_options_off_leave_the_v2_augmentation_unchanged():
    image, label = _sample()
    scales = (0.5, 0.75, 1.0, 1.25, 1.5)
    off = Augment(17, scales, True, 3, scale_range=None, blur_prob=0.0)
    assert off == Augment(17, scales, True, 3)  # the defaults are "off"
    for draw in range(12):
        got_i, got_l = augment(image, label, off, np.random.default_rng([3, draw]))
        want_i, want_l = _v2_augment(image, label, 17, scales, 3, draw)
        assert torch.equal(got_i, want_i) and np.array_equal(got_l, want_l)


@pytest.mark.parametrize("hw", [(20, 24), (80, 80), (128, 128), (375, 500)])
def test_crops_are_the_same_on_one_thread_and_on_two(hw):
    """Probe: on one thread (a DataLoader worker, OMP_NUM_THREADS=1) torch resizes a 3-channel image with another
    kernel, so 35 of the default pipeline's first 60 crops differed in the last bits from the 2-thread main
    process's, and `train.num_workers: 1` changed final.pt. Every thread count now gives the crops that the
    2-thread resize of the whole image gives (the v2 stream of a 2-core run, unchanged)."""
    image, label = _sample(*hw)
    scales = (0.5, 0.75, 1.25, 1.5)
    aug = Augment(17, scales, True, 3)
    with torch_threads(2):
        want = [_v2_augment(image, label, 17, scales, 3, draw) for draw in range(10)]
    for n in (1, 2, 3):
        with torch_threads(n):
            got = [augment(image, label, aug, np.random.default_rng([3, draw])) for draw in range(10)]
        assert all(torch.equal(g[0], w[0]) and np.array_equal(g[1], w[1]) for g, w in zip(got, want, strict=True)), n


def test_scale_range_draws_a_continuous_scale_per_draw():
    # A crop larger than any scaled image: the labelled (non-ignore) area is the scaled image, top left.
    h = w = 20
    label = np.zeros((h, w), np.uint8)
    aug = Augment(41, (1.0,), False, 5, scale_range=(0.5, 2.0))
    sizes = []
    for draw in range(40):
        image, out = augment(torch.zeros(3, h, w), label, aug, np.random.default_rng([5, draw]))
        s = np.random.default_rng([5, draw]).uniform(0.5, 2.0)  # the first draw of this sample's stream
        rows = int((out != 255).any(1).sum())
        assert image.shape == (3, 41, 41) and rows == int(h * s) and int((out != 255).any(0).sum()) == int(w * s)
        sizes.append(rows)
    assert min(sizes) >= 10 and max(sizes) <= 40 and len(set(sizes)) > 10  # not a discrete set of five
    again = [augment(torch.zeros(3, h, w), label, aug, np.random.default_rng([5, d]))[1] for d in range(3)]
    assert all(np.array_equal(a, augment(torch.zeros(3, h, w), label, aug, np.random.default_rng([5, d]))[1])
               for d, a in enumerate(again))  # seeded: a draw replays exactly


def test_blur_with_probability_blurs_the_image_only():
    image, label = _sample()
    sharp = Augment(16, (1.0,), False, 0)
    blurred = Augment(16, (1.0,), False, 0, blur_prob=1.0)
    for draw in range(5):
        base_i, base_l = augment(image, label, sharp, np.random.default_rng([0, draw]))
        out_i, out_l = augment(image, label, blurred, np.random.default_rng([0, draw]))
        rng = np.random.default_rng([0, draw])
        rng.choice((1.0,)), rng.integers(0, 5), rng.integers(0, 9), rng.random()  # scale, y, x, blur or not
        sigma = rng.random()
        assert np.array_equal(out_l, base_l)
        assert torch.allclose(out_i, gaussian_blur(base_i, sigma))
        assert torch.equal(out_i, base_i) == (sigma < 1 / 6)  # below 1/6 the 3-sigma kernel is one tap
    half = Augment(16, (1.0,), False, 0, blur_prob=0.5)
    changed = [not torch.equal(augment(image, label, half, np.random.default_rng([0, d]))[0],
                               augment(image, label, sharp, np.random.default_rng([0, d]))[0]) for d in range(200)]
    assert 0.3 < np.mean(changed) < 0.55  # half of the draws, less the one-tap sigmas (1/6 of them)


@pytest.mark.parametrize("sigma", [0.1, 0.4, 0.7, 0.99, 2.5])
def test_gaussian_blur_matches_scipy(sigma):
    image = torch.from_numpy(np.random.default_rng(1).normal(0, 40, (3, 19, 23)).astype(np.float32))
    want = np.stack([gaussian_filter(c.astype(np.float64), sigma, mode="mirror", truncate=3.0)
                     for c in image.numpy()])
    assert np.allclose(gaussian_blur(image, sigma).numpy(), want, atol=1e-4)
    flat = torch.full((3, 8, 8), -17.5)
    assert torch.allclose(gaussian_blur(flat, sigma), flat)  # the kernel sums to 1: the mean stays the mean


def test_train_config_checks_the_options():
    assert TrainConfig().scale_range is None and TrainConfig().blur_prob == 0.0
    with pytest.raises(ValueError, match=r"train.scale_range: \[2.0, 0.5\] must be \[low, high\]"):
        TrainConfig(scale_range=(2.0, 0.5))
    with pytest.raises(ValueError, match="blur_prob"):
        TrainConfig(blur_prob=1.5)
