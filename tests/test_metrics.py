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


def test_label_values_outside_classes_and_ignore_are_named(tmp_path):
    """A ground-truth value in n_classes..254 must not vanish from the confusion matrix (probe: every pixel of a
    val label set to 7 with n_classes 6 moved mean IoU from 0.8644 to 0.8646 with exit 0)."""
    from deeplab.data import DataError, Item, write_label
    from deeplab.metrics import accumulate

    gt = np.zeros((4, 4), np.uint8)
    gt[0, 0], gt[3, 3] = 255, 1
    write_label(tmp_path / "gt" / "a.png", gt)
    write_label(tmp_path / "pred" / "a.png", gt.clip(0, 5))
    items = [Item("a", tmp_path / "a.jpg", tmp_path / "gt" / "a.png")]
    assert accumulate(items, tmp_path / "pred", 6).sum() == 15  # 255 ignored
    write_label(tmp_path / "gt" / "a.png", np.full((4, 4), 7, np.uint8))
    with pytest.raises(DataError, match=r"gt/a\.png: label values 7 \(16 pixels\) are outside the allowed 0\.\.5 "
                                        r"\(dataset\.n_classes 6\) and 255 \(dataset\.ignore_label\)"):
        accumulate(items, tmp_path / "pred", 6)
    write_label(tmp_path / "gt" / "a.png", gt)
    write_label(tmp_path / "pred" / "a.png", np.full((4, 4), 6, np.uint8))
    with pytest.raises(DataError, match=r"pred/a\.png: predicted class 6 is not below dataset\.n_classes 6"):
        accumulate(items, tmp_path / "pred", 6)


def test_a_missing_prediction_or_one_of_another_size_is_named(tmp_path):
    """evaluate's errors name the prediction file and its label, not only two array shapes."""
    from deeplab.data import DataError, Item, write_label
    from deeplab.metrics import accumulate

    write_label(tmp_path / "gt" / "a.png", np.zeros((4, 6), np.uint8))
    items = [Item("a", tmp_path / "a.jpg", tmp_path / "gt" / "a.png")]
    with pytest.raises(DataError, match=r"pred/a\.png: no prediction for image 'a' of the list"):
        accumulate(items, tmp_path / "pred", 2)
    write_label(tmp_path / "pred" / "a.png", np.zeros((6, 4), np.uint8))
    with pytest.raises(DataError, match=r"pred/a\.png: prediction size 4x6 differs from its label .*gt/a\.png "
                                        r"\(6x4\)"):
        accumulate(items, tmp_path / "pred", 2)
