"""segmentation.metrics: confusion-matrix scores, the ISBI measures and object F1, against hand counts and
scikit-image."""

import numpy as np
import pytest
import torch
from skimage import measure

from losses import IGNORE_LABEL
from segmentation.metrics import (
    confusion_matrix,
    em_segmentation_scores,
    matching_scores,
    object_matching,
    segmentation_scores,
)


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


def test_object_matching_by_hand():
    truth = np.zeros((10, 12), int)
    predicted = np.zeros((10, 12), int)
    truth[0:4, 0:4] = 7  # 16 px
    predicted[0:4, 0:3] = 3  # 12 px inside it: IoU 12 / 16 = 0.75 > 0.5, a match
    truth[6:10, 6:10] = 9  # 16 px
    predicted[6:8, 6:10] = 4  # 8 px inside it: IoU 8 / 16 = 0.5, not above 0.5: no match
    predicted[0:2, 9:12] = 5  # nothing true there: a false positive
    counts = object_matching(truth, predicted)
    assert counts.tolist() == [1, 2, 3, 0.75]
    scores = matching_scores(counts)
    expected = {"tp": 1, "fp": 2, "fn": 1, "precision": 1 / 3, "recall": 1 / 2, "accuracy": 1 / 4, "f1": 2 / 5}
    expected.update(mean_matched_score=0.75, mean_true_score=0.75 / 2, panoptic_quality=0.75 / (1 + 2 / 2 + 1 / 2))
    assert scores == pytest.approx(expected)
    assert matching_scores(object_matching(truth, truth * 2))["f1"] == 1.0  # ids need not agree
    assert matching_scores(object_matching(truth * 0, truth * 0))["f1"] == 1.0  # nothing to find, nothing found
    assert matching_scores(object_matching(truth, truth * 0))["f1"] == 0.0
    with pytest.raises(ValueError, match="optimal matching from IoU 0.5"):
        object_matching(truth, predicted, threshold=0.4)


def blob_ids(rng: np.random.Generator, level: float, shift: int = 0) -> np.ndarray:
    """Object ids of a smooth random field above ``level``, shifted by ``shift`` px: objects of many sizes
    that merge, split and move between two levels."""
    field = ndimage_smooth(rng.random((96, 96)))
    return measure.label(np.roll(field, shift, axis=1) > level, connectivity=1)


def test_matching_agrees_with_stardist_per_image_and_over_images():
    matching = pytest.importorskip("stardist.matching")
    rng = np.random.default_rng(3)
    pairs = []
    for index in range(6):
        seed = rng.integers(1 << 30)
        truth = blob_ids(np.random.default_rng(seed), 0.6)
        predicted = blob_ids(np.random.default_rng(seed), 0.55 + 0.02 * index, shift=index % 3)
        predicted[rng.random(predicted.shape) > 0.995] = predicted.max() + 1  # specks
        pairs.append((truth, measure.label(predicted, connectivity=1)))
    fields = ("tp", "fp", "fn", "precision", "recall", "accuracy", "f1", "mean_matched_score", "panoptic_quality")
    fields += ("mean_true_score",)
    # stardist counts IoU = 0.5 as a match, the Data Science Bowl (and this code) only IoU > 0.5
    strictly_above_half = 0.5 + 1e-6  # above float32 0.5, in which stardist compares
    for truth, predicted in pairs:
        theirs = matching.matching(truth, predicted, thresh=strictly_above_half)._asdict()
        ours = matching_scores(object_matching(truth, predicted))
        assert theirs["tp"] > 0 and theirs["fp"] > 0 and theirs["fn"] > 0, "the case should have all three"
        assert {key: ours[key] for key in fields} == pytest.approx({key: theirs[key] for key in fields})
    theirs = matching.matching_dataset(*zip(*pairs), thresh=strictly_above_half, by_image=False, show_progress=False)
    ours = matching_scores(sum(object_matching(truth, predicted) for truth, predicted in pairs))
    assert {key: ours[key] for key in fields} == pytest.approx({key: getattr(theirs, key) for key in fields})


def test_unannotated_pixels_are_not_counted():
    generator = torch.Generator().manual_seed(3)
    target = torch.randint(0, 3, (20, 30), generator=generator)
    prediction = torch.randint(0, 3, (20, 30), generator=generator)
    unannotated = torch.rand(20, 30, generator=generator) < 0.3
    confusion = confusion_matrix(prediction, target.masked_fill(unannotated, IGNORE_LABEL), 3)
    # by hand: count (true, predicted) pairs over the annotated pixels only
    expected = np.zeros((3, 3), dtype=np.int64)
    for true, predicted in zip(target[~unannotated].tolist(), prediction[~unannotated].tolist()):
        expected[true, predicted] += 1
    assert np.array_equal(confusion.numpy(), expected) and confusion.sum() == (~unannotated).sum()
    # the cells of the Rand error are those the annotation shows; unannotated pixels are left out like the membrane
    label = np.ones((10, 10), dtype=np.int64)
    label[:, 5] = 0
    sparse = label.copy()
    sparse[:, 7:] = IGNORE_LABEL
    predicted = label.copy()
    predicted[:, 7:] = 0  # wrong only where nothing is annotated
    assert em_segmentation_scores(predicted, sparse)["rand_error"] == 0.0
    assert em_segmentation_scores(predicted, label)["rand_error"] > 0.0
