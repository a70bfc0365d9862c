"""The U-Net paper's pixel-wise loss weights: class balance and the border term between touching objects.

The weight map is eq. 2 of Ronneberger et al., "U-Net: Convolutional Networks for Biomedical Image
Segmentation" (MICCAI 2015). Its border term is computed once per image (``border_weights``) and
stored in the preprocessing cache; the class weights are added per tile (``add_class_weights``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from scipy import ndimage

from losses import IGNORE_LABEL

# Relative size of the border term below which it is treated as zero.
_BORDER_TERM_TOLERANCE = 1e-6


def weight_map(
    label: np.ndarray,
    instances: np.ndarray,
    w_0: float = 10.0,
    sigma: float = 5.0,
    class_weights: np.ndarray | None = None,
) -> np.ndarray:
    """Pixel-wise loss weights of the U-Net paper (Ronneberger et al., eq. 2).

    ``w(x) = w_c(x) + w_0 * exp(-(d1(x) + d2(x))**2 / (2 * sigma**2))``, where
    d1 and d2 are the Euclidean distances (px) from x to the nearest and the
    second-nearest instance. The border term is added only to background
    (membrane) pixels, ``label == 0``, as in the paper, where it emphasises
    the thin gaps separating touching cells.

    Parameters
    ----------
    label : ndarray of int, shape (H, W)
        Class of each pixel, 0 = background / membrane.
    instances : ndarray of int, shape (H, W)
        Instance id of each pixel, 0 = no instance, ids > 0 are instances.
        Ids need not be consecutive.
    w_0 : float, optional
        Amplitude of the border term. 0 skips the distance computation.
    sigma : float, optional
        Width of the border term in pixels.
    class_weights : ndarray of float, shape (num_classes,), optional
        ``w_c`` indexed by class, e.g. from :func:`class_balance_weights`;
        all ones when None.

    Returns
    -------
    ndarray of float32, shape (H, W)
        The weight of every pixel. With fewer than two instances the border
        term is 0.

    Notes
    -----
    For speed each instance's distance transform is computed only inside its
    bounding box grown by ``R = sigma * sqrt(2 * ln(1e6))`` (about 5.3
    sigma); farther pixels treat that instance as infinitely far. This only
    changes the two smallest distances of a pixel whose true d2 exceeds R,
    and there both the exact and the computed border term lie in
    ``[0, w_0 * 1e-6)``, so the result differs from the exact map by less
    than ``1e-6 * w_0``.
    """
    return add_class_weights(label, border_weights(label, instances, w_0, sigma), class_weights)


def border_weights(
    label: np.ndarray,
    instances: np.ndarray,
    w_0: float = 10.0,
    sigma: float = 5.0,
    spacing: Sequence[float] | None = None,
) -> np.ndarray | None:
    """The border term of :func:`weight_map` alone: ``w_0 * exp(-(d1 + d2)**2 / (2 sigma**2))`` on
    background pixels (``label == 0``), 0 elsewhere; float64 of the shape of ``label`` ((H, W) or a volume's
    (D, H, W)), or None where it is 0 everywhere (``w_0 == 0`` or fewer than two instances). It does not depend
    on the class weights, so it can be computed once per image and stored, whatever split and class balance a
    run chooses. ``spacing``: the voxel size per axis (any unit, e.g. (50, 4, 4) nm for serial-section EM);
    distances and ``sigma`` are then in units of the last axis's pixel, so a section 12.5 pixels thick is 12.5
    pixels away from the next (None: every axis one pixel)."""
    label = np.asarray(label)
    instances = np.asarray(instances)
    if label.shape != instances.shape:
        raise ValueError(f"label {label.shape} and instances {instances.shape} differ in shape")
    # find_objects gives one slot per id up to the maximum, None for unused ids.
    boxes = ndimage.find_objects(np.where(instances > 0, instances, 0))
    present = [(index + 1, box) for index, box in enumerate(boxes) if box is not None]
    if w_0 == 0 or len(present) < 2:
        return None

    reach = sigma * math.sqrt(-2.0 * math.log(_BORDER_TERM_TOLERANCE))
    sampling = None if spacing is None else tuple(float(size) / float(spacing[-1]) for size in spacing)
    radii = [math.ceil(reach / (1.0 if sampling is None else sampling[axis])) for axis in range(instances.ndim)]
    # Running two smallest distances per pixel: keeps memory at two images
    # instead of stacking one distance image per instance.
    nearest = np.full(instances.shape, np.inf)
    second = np.full(instances.shape, np.inf)
    for instance_id, box in present:
        window = tuple(
            slice(max(part.start - radius, 0), min(part.stop + radius, side))
            for part, radius, side in zip(box, radii, instances.shape)
        )
        # The window contains the whole instance, so distances inside it are exact.
        distance = ndimage.distance_transform_edt(instances[window] != instance_id, sampling=sampling)
        nearest_window = nearest[window]
        second[window] = np.minimum(second[window], np.maximum(nearest_window, distance))
        nearest[window] = np.minimum(nearest_window, distance)

    border = w_0 * np.exp(-((nearest + second) ** 2) / (2.0 * sigma**2))
    return np.where(label == 0, border, 0.0)


def add_class_weights(
    label: np.ndarray, border: np.ndarray | None, class_weights: np.ndarray | None = None
) -> np.ndarray:
    """The weight map ``w_c(label) + border`` as (H, W) float32, summed in float64.

    ``label`` (H, W) class indices (``losses.IGNORE_LABEL`` where nothing is annotated: weight 0),
    ``border`` (H, W) from :func:`border_weights` in any float dtype (None: 0), ``class_weights``
    (num_classes,) or None for all ones. Works on any window of an image: the weights of a tile are those
    of the whole image cut to the tile.
    """
    label = np.asarray(label)
    given = label != IGNORE_LABEL
    if class_weights is None:
        weights = np.ones(label.shape, dtype=np.float64)
    else:
        weights = np.asarray(class_weights, dtype=np.float64)[np.where(given, label, 0)]
    if border is not None:
        weights += border
    if not given.all():
        weights[~given] = 0.0
    return weights.astype(np.float32)


def class_balance_weights(labels: Sequence[np.ndarray], num_classes: int) -> np.ndarray:
    """Class weights ``w_c`` that balance class frequencies.

    ``w_c`` is proportional to ``1 / freq_c``, the inverse frequency of class c
    over all pixels of all given label images, normalised so that the mean
    weight over those pixels is 1: ``sum_c freq_c * w_c == 1``. A class that
    never occurs gets weight 1.0 and is left out of the normalisation (its
    inverse frequency would be infinite).

    Parameters
    ----------
    labels : sequence of ndarray of int
        Label images of any shapes with values in ``[0, num_classes)``.
    num_classes : int
        Number of classes.

    Returns
    -------
    ndarray of float32, shape (num_classes,)
        The weight of each class.
    """
    return balanced_class_weights(
        sum((class_counts(image, num_classes) for image in labels), np.zeros(num_classes, dtype=np.int64))
    )


def class_counts(label: np.ndarray, num_classes: int) -> np.ndarray:
    """(num_classes,) int64: the number of pixels of each class in ``label`` (unannotated pixels,
    ``losses.IGNORE_LABEL``, not counted); a ValueError for other values outside ``[0, num_classes)``."""
    label = np.asarray(label)
    if label.size and label.max() == IGNORE_LABEL:
        label = label[label != IGNORE_LABEL]
    if label.size and (label.min() < 0 or label.max() >= num_classes):
        raise ValueError(f"label values must lie in [0, {num_classes})")
    return np.bincount(label.ravel(), minlength=num_classes).astype(np.int64)


def balanced_class_weights(counts: np.ndarray) -> np.ndarray:
    """:func:`class_balance_weights` from the pixel counts of each class, (num_classes,) int."""
    counts = np.asarray(counts, dtype=np.int64)
    weights = np.ones(len(counts), dtype=np.float64)
    seen = counts > 0
    frequency = counts[seen] / counts.sum()
    # With w_c = a / freq_c, sum_c freq_c * w_c = a * (number of seen classes).
    weights[seen] = 1.0 / (seen.sum() * frequency)
    return weights.astype(np.float32)
