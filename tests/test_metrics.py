import numpy as np
import pytest

from deeplab.metrics import confusion, scores


def test_confusion_by_hand_ignores_255():
    gt = np.array([[0, 0, 1], [1, 2, 255]])
    pred = np.array([[0, 1, 1], [1, 0, 2]])
    hist = confusion(gt, pred, 3)
    expected = np.array([[1, 1, 0], [0, 2, 0], [1, 0, 0]])
    assert np.array_equal(hist, expected)


def test_scores_by_hand():
    hist = np.array([[1, 1, 0], [0, 2, 0], [1, 0, 0]])
    s = scores(hist)
    assert s["pixel_accuracy"] == pytest.approx(3 / 5)
    assert s["mean_accuracy"] == pytest.approx((1 / 2 + 1 + 0) / 3)
    iou = [1 / (2 + 2 - 1), 2 / (2 + 3 - 2), 0 / (1 + 0 - 0)]
    assert s["class_iou"] == pytest.approx(iou)
    assert s["mean_iou"] == pytest.approx(np.mean(iou))
    assert s["fw_iou"] == pytest.approx(2 / 5 * iou[0] + 2 / 5 * iou[1] + 1 / 5 * iou[2])


def test_mean_iou_only_over_classes_in_ground_truth():
    # class 2 never appears in ground truth but is predicted once: it counts as a false positive of class 0
    # and its own IoU is 0, yet it is left out of the mean as in DeepLab.
    hist = np.array([[3, 0, 1], [0, 4, 0], [0, 0, 0]])
    s = scores(hist)
    assert s["class_iou"][2] == 0.0
    assert s["mean_iou"] == pytest.approx((3 / 4 + 1.0) / 2)
    absent = scores(np.array([[2, 0], [0, 0]]))
    assert absent["class_iou"][1] is None


def test_confusion_shape_mismatch():
    with pytest.raises(ValueError, match="differ in shape"):
        confusion(np.zeros((2, 2)), np.zeros((2, 3)), 2)
