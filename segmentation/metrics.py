"""Segmentation metrics: pixel error, accuracy, per-class IoU and Dice from a confusion matrix, the
ISBI 2012 challenge's Rand error and variation of information on connected components, and the F1
of matched objects (instance F1 at an IoU threshold)."""

from __future__ import annotations

import numpy as np
import torch
from skimage import measure
from skimage.metrics import adapted_rand_error, variation_of_information

from losses import IGNORE_LABEL


def confusion_matrix(prediction: torch.Tensor, target: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Count pixels by (true class, predicted class).

    Parameters
    ----------
    prediction, target : int tensors of the same shape, class indices in 0..num_classes-1; a target of
        ``losses.IGNORE_LABEL`` (not annotated) is not counted.

    Returns
    -------
    (num_classes, num_classes) int64 tensor on the CPU; row = true class, column = predicted class.
    """
    if prediction.shape != target.shape:
        raise ValueError(f"prediction {tuple(prediction.shape)} and target {tuple(target.shape)} differ in shape")
    given = target.reshape(-1) != IGNORE_LABEL
    index = target.reshape(-1)[given].long() * num_classes + prediction.reshape(-1)[given].long()
    counts = torch.bincount(index, minlength=num_classes * num_classes)
    return counts.reshape(num_classes, num_classes).cpu()


def segmentation_scores(confusion: torch.Tensor) -> dict[str, float]:
    """Scores from a confusion matrix (rows: true class, columns: predicted class).

    Returns ``pixel_error`` (fraction of wrong pixels, as in the ISBI 2012 challenge), ``accuracy``,
    ``iou_<c>`` and ``dice_<c>`` for every class c, and ``iou`` / ``dice``: the mean over the foreground
    classes 1..K-1 (for two classes, the scores of class 1). A class absent from both prediction and
    target scores 1 (nothing to find, nothing wrongly found).
    """
    confusion = confusion.double()
    total = confusion.sum().item()
    correct = confusion.diagonal().sum().item()
    scores = {"pixel_error": 1 - correct / total, "accuracy": correct / total}
    true_positive = confusion.diagonal()
    false_positive = confusion.sum(0) - true_positive
    false_negative = confusion.sum(1) - true_positive
    for c in range(confusion.shape[0]):
        tp, fp, fn = true_positive[c].item(), false_positive[c].item(), false_negative[c].item()
        scores[f"iou_{c}"] = tp / (tp + fp + fn) if tp + fp + fn else 1.0
        scores[f"dice_{c}"] = 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 1.0
    foreground = range(1, confusion.shape[0])
    scores["iou"] = sum(scores[f"iou_{c}"] for c in foreground) / len(foreground)
    scores["dice"] = sum(scores[f"dice_{c}"] for c in foreground) / len(foreground)
    return scores


def em_segmentation_scores(cell_probability: np.ndarray, label: np.ndarray, threshold: float = 0.5) -> dict[str, float]:
    """The ISBI 2012 challenge's measures, on the cells of a prediction and of the ground truth.

    Parameters
    ----------
    cell_probability : (H, W) float array, the predicted probability of class 1 (cell interior), or a
        boolean mask of the predicted cells.
    label : (H, W) int array, 1 = cell interior, 0 = membrane (the ISBI polarity); pixels of
        ``losses.IGNORE_LABEL`` (not annotated) are left out like the membrane.
    threshold : a pixel is predicted cell where ``cell_probability >= threshold`` (fixed at 0.5 by
        default, which is the argmax for two classes).

    Returns
    -------
    ``rand_error``: scikit-image's foreground-restricted adapted Rand error (the challenge's measure;
    membrane pixels of the ground truth are ignored) between the 4-connected components of the
    predicted and of the true cell interior; ``vi``: their variation of information (split + merge
    conditional entropies, in bits, likewise foreground-restricted).
    """
    predicted_cells = measure.label(cell_probability >= threshold, connectivity=1)
    true_cells = measure.label(label == 1, connectivity=1)
    error = adapted_rand_error(true_cells, predicted_cells, ignore_labels=(0,))[0]
    split, merge = variation_of_information(true_cells, predicted_cells, ignore_labels=(0,))
    return {"rand_error": float(error), "vi": float(split + merge)}


def pool_scores(confusion: torch.Tensor, cell_scores: list[dict[str, float]]) -> dict[str, float]:
    """Scores of several images: ``pixel_error``, ``dice`` and ``iou`` from their summed confusion
    matrix (pooled pixels), with more than two classes also ``dice_<c>`` of each class, and
    ``rand_error`` and ``vi`` as means of their ``em_segmentation_scores`` (when given)."""
    scores = segmentation_scores(confusion)
    per_class = [f"dice_{c}" for c in range(confusion.shape[0])] if confusion.shape[0] > 2 else []
    pooled = {key: scores[key] for key in ("pixel_error", "dice", "iou", *per_class)}
    for key in ("rand_error", "vi") if cell_scores else ():
        pooled[key] = sum(item[key] for item in cell_scores) / len(cell_scores)
    return pooled


def image_scores(
    classes: torch.Tensor, label: torch.Tensor, num_classes: int
) -> tuple[torch.Tensor, dict[str, float] | None]:
    """The confusion matrix of one image's predicted ``classes`` (H, W) against ``label`` (H, W) and,
    for two classes, its ``em_segmentation_scores``; combine several images' with ``pool_scores``."""
    confusion = confusion_matrix(classes, label, num_classes)
    cells = em_segmentation_scores((classes == 1).numpy(), label.numpy()) if num_classes == 2 else None
    return confusion, cells


def object_matching(true_ids: np.ndarray, predicted_ids: np.ndarray, threshold: float = 0.5) -> np.ndarray:
    """``[matched, true objects, predicted objects, summed IoU of the matched pairs]`` (float64) of two
    (H, W) integer id images (0 = no object); sum several images' to pool them, as stardist's
    ``matching_dataset(by_image=False)`` does, and read them with ``matching_scores``.

    A true and a predicted object match when their intersection over union exceeds ``threshold``;
    from 0.5 on an object can match at most one other (two overlaps above half its union cannot
    both fit), so counting the pairs above the threshold is the optimal matching.
    """
    if threshold < 0.5:
        raise ValueError(
            f"object_matching counts pairs, which is the optimal matching from IoU 0.5 on, not {threshold}"
        )
    true_ids, predicted_ids = np.asarray(true_ids).ravel(), np.asarray(predicted_ids).ravel()
    true_labels, true_areas = np.unique(true_ids[true_ids > 0], return_counts=True)
    predicted_labels, predicted_areas = np.unique(predicted_ids[predicted_ids > 0], return_counts=True)
    counts = np.array([0.0, len(true_labels), len(predicted_labels), 0.0])
    both = (true_ids > 0) & (predicted_ids > 0)
    if not both.any():
        return counts
    pairs, intersections = np.unique(np.stack([true_ids[both], predicted_ids[both]]), axis=1, return_counts=True)
    unions = (
        true_areas[np.searchsorted(true_labels, pairs[0])]
        + predicted_areas[np.searchsorted(predicted_labels, pairs[1])]
        - intersections
    )
    overlaps = intersections / unions
    matched = overlaps > threshold
    counts[0], counts[3] = np.count_nonzero(matched), overlaps[matched].sum()
    return counts


def matching_scores(counts: np.ndarray) -> dict[str, float]:
    """stardist's matching fields from ``object_matching`` counts: ``tp``, ``fp``, ``fn``, ``precision``
    TP/(TP+FP), ``recall`` TP/(TP+FN), ``accuracy`` TP/(TP+FP+FN) (the Data Science Bowl's), ``f1``
    2TP/(2TP+FP+FN), ``mean_matched_score`` (mean IoU of the matched pairs), ``mean_true_score`` (summed
    matched IoU / true objects) and ``panoptic_quality`` (summed matched IoU / (TP + FP/2 + FN/2)). With no
    object on either side every ratio is 1; a ratio with nothing to count is 0, as in stardist."""
    tp, true_objects, predicted_objects, iou_sum = (float(value) for value in counts)
    fp, fn = predicted_objects - tp, true_objects - tp

    def ratio(numerator: float, denominator: float) -> float:
        return numerator / denominator if denominator > 0 else float(true_objects + predicted_objects == 0)

    return {
        "tp": tp,
        "fp": fp,
        "fn": fn,
        "precision": ratio(tp, tp + fp),
        "recall": ratio(tp, tp + fn),
        "accuracy": ratio(tp, tp + fp + fn),
        "f1": ratio(2 * tp, 2 * tp + fp + fn),
        "mean_matched_score": ratio(iou_sum, tp),
        "mean_true_score": ratio(iou_sum, true_objects),
        "panoptic_quality": ratio(iou_sum, tp + fp / 2 + fn / 2),
    }
