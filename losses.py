"""Losses: the paper's pixel-weighted cross-entropy, soft Dice, and their sum.

All take raw logits ``(B, K, h, w)`` and integer targets ``(B, H, W)``. With valid convolutions the
output is smaller than the input tile, so targets and weight maps are centre-cropped to the output.
Targets of ``IGNORE_LABEL`` mark pixels nobody annotated (``train.ignore_value``): they count nowhere.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from model import center_crop

LOSSES = ("ce", "dice", "ce+dice")
IGNORE_LABEL = 255  # the target of a pixel that is not annotated: no class, no loss, no score


def annotated(target: torch.Tensor) -> torch.Tensor:
    """Boolean tensor of ``target``'s shape: where a class is given (not ``IGNORE_LABEL``)."""
    return target != IGNORE_LABEL


def scored_classes(target: torch.Tensor, num_classes: int) -> torch.Tensor:
    """``target`` in the user's ``num_classes`` classes, for scores: a class beyond them (the object border of a
    network with the boundary class) is its object's, the last; unannotated pixels stay ``IGNORE_LABEL``."""
    return torch.where(annotated(target), target.clamp(max=num_classes - 1), target)


def weighted_cross_entropy(
    logits: torch.Tensor,
    target: torch.Tensor,
    weight_map: torch.Tensor | None = None,
    class_weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """The energy function of Ronneberger et al. (2015), eq. 1: sum_x w(x) * -log p_l(x)(x), normalised.

    Parameters
    ----------
    logits : (B, K, h, w) float tensor, unnormalised class scores ((B, K, d, h, w) for volumes, with
        target and weight map (B, D, H, W)).
    target : (B, H, W) int64 tensor of class indices, H >= h and W >= w (cropped to the centre);
        ``IGNORE_LABEL`` where nothing is annotated, which weighs 0.
    weight_map : (B, H, W) float tensor of per-pixel weights w(x) >= 0, or None for all ones.
    class_weights : (K,) float tensor, multiplied into every pixel's weight by its target class.

    Returns
    -------
    Scalar float32 tensor: the weighted mean sum(w * ce) / sum(w), the same normalisation as
    ``F.cross_entropy(weight=class_weights)``, so the loss scale does not depend on the tile size or on
    the weights' overall scale.
    """
    spatial = logits.shape[2:]  # (h, w), or a volume's (d, h, w)
    target = center_crop(target, *spatial)
    pixel_loss = F.cross_entropy(logits.float(), target, reduction="none", ignore_index=IGNORE_LABEL)
    weight = torch.ones_like(pixel_loss) if weight_map is None else center_crop(weight_map, *spatial).float()
    given = annotated(target)
    if class_weights is not None:
        weight = weight * class_weights.to(pixel_loss.device)[target.where(given, 0)]
    # An unannotated pixel weighs nothing: its loss is 0 (ignore_index), and its weight leaves the normalisation
    # by subtraction, which is exact (a sum of zeros) where every pixel is annotated: masking the weights instead
    # would copy them into another memory layout and change the summation order of every other run.
    total = weight.sum() - torch.where(given, 0.0, weight).sum()
    # clamp: a tile of pixels that all weigh 0 would otherwise give 0/0
    return (weight * pixel_loss).sum() / total.clamp_min(1e-12)


def soft_dice_loss(logits: torch.Tensor, target: torch.Tensor, smooth: float = 1.0) -> torch.Tensor:
    """1 - soft Dice averaged over the foreground classes 1..K-1 (Milletari et al. 2016).

    Parameters
    ----------
    logits : (B, K, h, w) float tensor; target : (B, H, W) int64, centre-cropped to (h, w), where
        ``IGNORE_LABEL`` pixels take part neither in the prediction's sums nor in the target's.
    smooth : added to numerator and denominator so that a class absent from target and prediction
        scores 1 instead of 0/0.

    Returns
    -------
    Scalar float32 tensor in [0, 1]; sums run over the whole batch, as in nnU-Net's batch Dice.
    """
    num_classes = logits.shape[1]
    target = center_crop(target, *logits.shape[2:])
    given = annotated(target)[:, None]
    probabilities = logits.float().softmax(dim=1) * given
    one_hot = F.one_hot(target.where(given[:, 0], 0), num_classes).movedim(-1, 1).to(probabilities.dtype)
    one_hot = one_hot * given
    dims = (0, *range(2, logits.ndim))
    intersection = (probabilities * one_hot).sum(dims)
    total = probabilities.sum(dims) + one_hot.sum(dims)
    dice = (2 * intersection + smooth) / (total + smooth)
    return 1 - dice[1:].mean()


def segmentation_loss(
    kind: str,
    logits: torch.Tensor,
    target: torch.Tensor,
    weight_map: torch.Tensor | None = None,
    class_weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """The loss named by ``train.loss`` (``ce``, ``dice`` or ``ce+dice``); arguments as above."""
    if kind == "ce":
        return weighted_cross_entropy(logits, target, weight_map, class_weights)
    if kind == "dice":
        return soft_dice_loss(logits, target)
    if kind == "ce+dice":
        return weighted_cross_entropy(logits, target, weight_map, class_weights) + soft_dice_loss(logits, target)
    raise ValueError(f"unknown loss {kind!r}; choose one of {', '.join(LOSSES)}")
