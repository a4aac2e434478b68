"""train.lr_policy (poly, step, cosine) and the linear warmup: lr factors at chosen iterations (1-based, as the
training loop asks for them), and the default that stays DeepLab v2's poly stepped every 10 iterations."""

import math

import pytest
from pydantic import ValidationError

from deeplab.config import TrainConfig
from deeplab.train import lr_factor, poly_factor


def test_default_policy_is_v2_poly_stepped_every_10():
    t = TrainConfig(iterations=20000)
    assert (t.lr_policy, t.lr_step, t.warmup_iterations) == ("poly", 10, 0)
    for it in (1, 2, 10, 11, 19, 20, 21, 5000, 10001, 19991, 20000):
        assert lr_factor(it, t) == poly_factor(it, 20000, 0.9, 10)
    assert lr_factor(10, t) == 1.0 and lr_factor(11, t) == pytest.approx((1 - 10 / 20000) ** 0.9)


def test_step_policy():
    t = TrainConfig(iterations=1000, lr_policy="step", step_size=300, step_factor=0.1)
    assert [lr_factor(it, t) for it in (1, 300, 301, 600, 601, 1000)] == pytest.approx(
        [1.0, 1.0, 0.1, 0.1, 0.01, 0.001])
    # Held for lr_step iterations like every policy: a step_size that is no multiple of it drops at the next one.
    t = TrainConfig(iterations=100, lr_policy="step", step_size=25, step_factor=0.5)
    assert [lr_factor(it, t) for it in (26, 30, 31, 51)] == pytest.approx([1.0, 1.0, 0.5, 0.25])
    t = TrainConfig(iterations=100, lr_policy="step", step_size=25, step_factor=0.5, lr_step=1)
    assert [lr_factor(it, t) for it in (25, 26, 51)] == pytest.approx([1.0, 0.5, 0.25])


def test_cosine_policy():
    t = TrainConfig(iterations=1000, lr_policy="cosine", lr_step=1)
    assert lr_factor(1, t) == 1.0
    assert lr_factor(501, t) == pytest.approx(0.5)
    assert lr_factor(251, t) == pytest.approx(0.5 * (1 + math.cos(math.pi / 4)))
    assert lr_factor(1000, t) == pytest.approx(0.5 * (1 + math.cos(math.pi * 999 / 1000)))
    t10 = t.model_copy(update={"lr_step": 10})
    assert lr_factor(259, t10) == lr_factor(251, t) and lr_factor(260, t10) == lr_factor(251, t)


def test_linear_warmup_multiplies_the_policy():
    t = TrainConfig(iterations=1000, warmup_iterations=100, warmup_start_factor=0.1)
    assert lr_factor(1, t) == pytest.approx(0.1)
    assert lr_factor(51, t) == pytest.approx((0.1 + 0.9 * 0.5) * (1 - 50 / 1000) ** 0.9)
    assert lr_factor(100, t) == pytest.approx((0.1 + 0.9 * 0.9) * (1 - 90 / 1000) ** 0.9)
    assert lr_factor(101, t) == pytest.approx((1 - 100 / 1000) ** 0.9)  # warmup over
    # The capstone's warmup: from 0, every iteration, on any policy.
    c = TrainConfig(iterations=1000, lr_policy="cosine", lr_step=1, warmup_iterations=20)
    assert lr_factor(1, c) == 0.0
    assert lr_factor(11, c) == pytest.approx(0.5 * 0.5 * (1 + math.cos(math.pi * 10 / 1000)))
    assert lr_factor(21, c) == pytest.approx(0.5 * (1 + math.cos(math.pi * 20 / 1000)))


def test_step_policy_needs_a_step_size():
    with pytest.raises(ValidationError, match=r"train.step_size is required when train.lr_policy is 'step'"):
        TrainConfig(lr_policy="step")
    with pytest.raises(ValidationError, match="lr_policy"):
        TrainConfig(lr_policy="exp")
