"""Losses: the paper's pixel-weighted cross-entropy, soft Dice, and their sum.

All take raw logits ``(B, K, h, w)`` and integer targets ``(B, H, W)``. With valid convolutions the
output is smaller than the input tile, so targets and weight maps are centre-cropped to the output.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from model import center_crop

LOSSES = ("ce", "dice", "ce+dice")


def weighted_cross_entropy(
    logits: torch.Tensor,
    target: torch.Tensor,
    weight_map: torch.Tensor | None = None,
    class_weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """The energy function of Ronneberger et al. (2015), eq. 1: sum_x w(x) * -log p_l(x)(x), normalised.

    Parameters
    ----------
    logits : (B, K, h, w) float tensor, unnormalised class scores.
    target : (B, H, W) int64 tensor of class indices, H >= h and W >= w (cropped to the centre).
    weight_map : (B, H, W) float tensor of per-pixel weights w(x) >= 0, or None for all ones.
    class_weights : (K,) float tensor, multiplied into every pixel's weight by its target class.

    Returns
    -------
    Scalar float32 tensor: the weighted mean sum(w * ce) / sum(w), the same normalisation as
    ``F.cross_entropy(weight=class_weights)``, so the loss scale does not depend on the tile size or on
    the weights' overall scale.
    """
    height, width = logits.shape[-2:]
    target = center_crop(target, height, width)
    pixel_loss = F.cross_entropy(logits.float(), target, reduction="none")
    weight = torch.ones_like(pixel_loss) if weight_map is None else center_crop(weight_map, height, width).float()
    if class_weights is not None:
        weight = weight * class_weights.to(pixel_loss.device)[target]
    # clamp: a tile of pixels that all weigh 0 would otherwise give 0/0
    return (weight * pixel_loss).sum() / weight.sum().clamp_min(1e-12)


def soft_dice_loss(logits: torch.Tensor, target: torch.Tensor, smooth: float = 1.0) -> torch.Tensor:
    """1 - soft Dice averaged over the foreground classes 1..K-1 (Milletari et al. 2016).

    Parameters
    ----------
    logits : (B, K, h, w) float tensor; target : (B, H, W) int64, centre-cropped to (h, w).
    smooth : added to numerator and denominator so that a class absent from target and prediction
        scores 1 instead of 0/0.

    Returns
    -------
    Scalar float32 tensor in [0, 1]; sums run over the whole batch, as in nnU-Net's batch Dice.
    """
    num_classes = logits.shape[1]
    target = center_crop(target, *logits.shape[-2:])
    probabilities = logits.float().softmax(dim=1)
    one_hot = F.one_hot(target, num_classes).permute(0, 3, 1, 2).to(probabilities.dtype)
    dims = (0, 2, 3)
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
