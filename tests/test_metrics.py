"""segmentation.metrics: confusion-matrix scores, the ISBI measures and object F1, against hand counts and
scikit-image."""

import numpy as np
import pytest
import torch
from skimage import measure

from segmentation.metrics import confusion_matrix, instance_f1, instance_matches, segmentation_scores


def test_confusion_and_scores_by_hand():
    target = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 0]])
    prediction = torch.tensor([[0, 1, 1, 1], [1, 0, 1, 0]])
    confusion = confusion_matrix(prediction, target, 2)
    # true 0: predicted 0 twice, 1 once; true 1: predicted 0 once, 1 four times
    assert confusion.tolist() == [[2, 1], [1, 4]]
    scores = segmentation_scores(confusion)
    assert scores["pixel_error"] == pytest.approx(2 / 8)
    assert scores["iou_1"] == pytest.approx(4 / 6) and scores["iou"] == pytest.approx(4 / 6)
    assert scores["dice_1"] == pytest.approx(8 / 10) and scores["dice_0"] == pytest.approx(4 / 6)
    # Dice = 2|A∩B|/(|A|+|B|) from the sets directly
    a, b = (prediction == 1).numpy(), (target == 1).numpy()
    assert scores["dice"] == pytest.approx(2 * np.logical_and(a, b).sum() / (a.sum() + b.sum()))


def test_absent_class_scores_one_and_shape_mismatch_fails():
    scores = segmentation_scores(
        confusion_matrix(torch.zeros(3, 3, dtype=torch.long), torch.zeros(3, 3, dtype=torch.long), 3)
    )
    assert scores["iou_2"] == 1.0 and scores["pixel_error"] == 0.0
    with pytest.raises(ValueError, match="differ in shape"):
        confusion_matrix(torch.zeros(2, 2), torch.zeros(3, 3), 2)


def test_em_scores_by_hand_and_against_scikit_image():
    from skimage.metrics import adapted_rand_error, variation_of_information

    from segmentation.metrics import em_segmentation_scores

    # two true cells separated by a membrane column; the prediction merges them (membrane missed)
    label = np.ones((4, 5), np.int64)
    label[:, 2] = 0
    merged = np.ones((4, 5))
    scores = em_segmentation_scores(merged, label)
    # true cells of 8 px each (n = 16 foreground px); prediction: one segment holding all 16.
    # SNEMI3D counts pairs of distinct pixels: sum p_ij^2 - n = 8^2 + 8^2 - 16 = 112,
    # sum t_k^2 - n = 112, sum s_k^2 - n = 16^2 - 16 = 240; error = 1 - 112 / (0.5 * 112 + 0.5 * 240)
    assert scores["rand_error"] == pytest.approx(1 - 112 / 176)
    assert scores["vi"] == pytest.approx(
        1.0
    )  # merging two equal cells: H(pred | true) = 0, H(true | pred) = log2(2) = 1 bit
    perfect = em_segmentation_scores(label.astype(float), label)
    assert perfect["rand_error"] == pytest.approx(0.0) and perfect["vi"] == pytest.approx(0.0)
    # random case against scikit-image on connected components, threshold 0.5
    rng = np.random.default_rng(0)
    probability = ndimage_smooth(rng.random((40, 40)))
    truth = (ndimage_smooth(rng.random((40, 40))) > 0.5).astype(np.int64)
    expected = adapted_rand_error(
        measure.label(truth == 1, connectivity=1), measure.label(probability >= 0.5, connectivity=1)
    )[0]
    assert em_segmentation_scores(probability, truth)["rand_error"] == pytest.approx(expected)
    split, merge = variation_of_information(
        measure.label(truth == 1, connectivity=1), measure.label(probability >= 0.5, connectivity=1), ignore_labels=(0,)
    )
    assert em_segmentation_scores(probability, truth)["vi"] == pytest.approx(split + merge)


def ndimage_smooth(noise):
    from scipy import ndimage

    smooth = ndimage.gaussian_filter(noise, 2)
    return (smooth - smooth.min()) / (smooth.max() - smooth.min())


def test_instance_f1_by_hand():
    truth = np.zeros((10, 12), int)
    predicted = np.zeros((10, 12), int)
    truth[0:4, 0:4] = 7  # 16 px
    predicted[0:4, 0:3] = 3  # 12 px inside it: IoU 12 / 16 = 0.75 > 0.5, a match
    truth[6:10, 6:10] = 9  # 16 px
    predicted[6:8, 6:10] = 4  # 8 px inside it: IoU 8 / 16 = 0.5, not above 0.5: no match
    predicted[0:2, 9:12] = 5  # nothing true there: a false positive
    assert instance_matches(truth, predicted) == (1, 2, 3)
    assert instance_f1(1, 2, 3) == pytest.approx(2 * 1 / (2 * 1 + 2 + 1))  # 2 TP / (2 TP + FP + FN) = 0.4
    assert instance_matches(truth, truth * 2) == (2, 2, 2) and instance_f1(2, 2, 2) == 1.0  # ids need not agree
    assert instance_matches(truth, predicted, threshold=0.4) == (2, 2, 3)
    assert instance_f1(0, 0, 0) == 1.0 and instance_f1(0, 3, 0) == 0.0
