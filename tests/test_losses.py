"""losses.py: the weighted cross-entropy and soft Dice against torch.nn.functional and hand computations."""

import math

import pytest
import torch
import torch.nn.functional as F

from losses import IGNORE_LABEL, segmentation_loss, soft_dice_loss, weighted_cross_entropy


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


def random_case(seed=0, classes=3, size=6):
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(2, classes, size, size, generator=generator)
    target = torch.randint(0, classes, (2, size, size), generator=generator)
    return logits, target


def test_unannotated_pixels_count_nowhere_in_the_cross_entropy():
    logits, target = random_case(4)
    generator = torch.Generator().manual_seed(5)
    unannotated = torch.rand(target.shape, generator=generator) < 0.4
    sparse = target.masked_fill(unannotated, IGNORE_LABEL)
    weight = 0.5 + torch.rand(target.shape, generator=generator)
    class_weights = torch.tensor([0.2, 1.0, 3.0])
    # by hand: the weighted mean over the annotated pixels alone
    pixel = F.cross_entropy(logits, target, reduction="none")
    kept = weight * class_weights[target] * ~unannotated
    expected = (kept * pixel).sum() / kept.sum()
    found = weighted_cross_entropy(logits, sparse, weight, class_weights)
    assert torch.allclose(found, expected, atol=1e-6)
    # what the unannotated pixels' logits say changes nothing
    changed = logits.clone()
    changed[:, 0][unannotated] += 50.0
    assert torch.allclose(weighted_cross_entropy(changed, sparse, weight, class_weights), found, atol=1e-6)
    # a tile with no annotated pixel weighs nothing (0, not 0/0)
    assert weighted_cross_entropy(logits, torch.full_like(target, IGNORE_LABEL)).item() == 0.0


def test_unannotated_pixels_count_nowhere_in_the_dice():
    logits, target = random_case(6)
    generator = torch.Generator().manual_seed(7)
    unannotated = torch.rand(target.shape, generator=generator) < 0.5
    sparse = target.masked_fill(unannotated, IGNORE_LABEL)
    # by hand: soft Dice over the annotated pixels of the batch, per foreground class, then 1 - mean
    probabilities = logits.softmax(1).permute(0, 2, 3, 1)[~unannotated]  # (N, K)
    truth = F.one_hot(target[~unannotated], logits.shape[1]).float()
    dice = (2 * (probabilities * truth).sum(0) + 1) / (probabilities.sum(0) + truth.sum(0) + 1)
    expected = 1 - dice[1:].mean()
    assert soft_dice_loss(logits, sparse).item() == pytest.approx(expected.item(), rel=1e-5)
    for kind in ("ce", "dice", "ce+dice"):
        assert torch.isfinite(segmentation_loss(kind, logits, sparse))
