"""Losses against torch.nn.functional and hand computations; metrics against hand-counted cases."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from skimage import measure

from losses import segmentation_loss, soft_dice_loss, weighted_cross_entropy
from segmentation.metrics import confusion_matrix, instance_f1, instance_matches, segmentation_scores


def random_case(seed=0, classes=3, size=6):
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(2, classes, size, size, generator=generator)
    target = torch.randint(0, classes, (2, size, size), generator=generator)
    return logits, target


def test_unweighted_equals_torch_cross_entropy():
    logits, target = random_case()
    assert torch.allclose(weighted_cross_entropy(logits, target), F.cross_entropy(logits, target), atol=1e-6)


def test_class_weights_equal_torch_weighted_cross_entropy():
    logits, target = random_case(1)
    class_weights = torch.tensor([0.2, 1.0, 3.0])
    expected = F.cross_entropy(logits, target, weight=class_weights)
    assert torch.allclose(weighted_cross_entropy(logits, target, class_weights=class_weights), expected, atol=1e-6)


def test_weight_map_by_hand():
    # two pixels, two classes: logits (0, 0) and (2, 0); targets 0 and 1; weights 1 and 3
    logits = torch.tensor([[[[0.0, 2.0]], [[0.0, 0.0]]]])  # (1, 2, 1, 2)
    target = torch.tensor([[[0, 1]]])
    weight = torch.tensor([[[1.0, 3.0]]])
    loss_a = math.log(2)  # -log(1/2)
    loss_b = -math.log(1 / (1 + math.exp(2)))  # -log softmax(2, 0)[1]
    expected = (1 * loss_a + 3 * loss_b) / 4
    assert weighted_cross_entropy(logits, target, weight).item() == pytest.approx(expected, rel=1e-6)
    # a constant weight map changes nothing (weighted mean)
    assert weighted_cross_entropy(logits, target, torch.full_like(weight, 7.0)).item() == pytest.approx(
        (loss_a + loss_b) / 2, rel=1e-6
    )


def test_target_and_weights_are_cropped_to_the_output():
    logits, _ = random_case(2, classes=2, size=4)
    generator = torch.Generator().manual_seed(3)
    big_target = torch.randint(0, 2, (2, 10, 10), generator=generator)
    big_weight = torch.rand(2, 10, 10, generator=generator)
    centre = (slice(None), slice(3, 7), slice(3, 7))
    expected = (F.cross_entropy(logits, big_target[centre], reduction="none") * big_weight[centre]).sum() / big_weight[
        centre
    ].sum()
    assert torch.allclose(weighted_cross_entropy(logits, big_target, big_weight), expected, atol=1e-6)


def test_soft_dice_by_hand():
    # probabilities of class 1 exactly 0.8 where target is 1 (2 px), 0.2 elsewhere (2 px)
    p = 0.8
    logit = math.log(p / (1 - p))
    logits = torch.tensor([[[[0.0, 0.0], [0.0, 0.0]], [[logit, logit], [-logit, -logit]]]])
    target = torch.tensor([[[1, 1], [0, 0]]])
    intersection = 2 * p
    total = (2 * p + 2 * (1 - p)) + 2
    expected = 1 - (2 * intersection + 1) / (total + 1)
    assert soft_dice_loss(logits, target).item() == pytest.approx(expected, rel=1e-5)
    perfect = torch.stack([20 * (target == 0).float(), 20 * (target == 1).float()], dim=1)
    assert soft_dice_loss(perfect, target).item() < 1e-6


def test_combined_loss_and_gradient():
    logits, target = random_case(4, classes=2)
    logits.requires_grad_(True)
    loss = segmentation_loss("ce+dice", logits, target)
    expected = F.cross_entropy(logits, target) + soft_dice_loss(logits, target)
    assert torch.allclose(loss, expected)
    loss.backward()
    assert logits.grad is not None and logits.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="unknown loss"):
        segmentation_loss("focal", logits, target)


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
