"""Objects from predicted probabilities: touching objects cut apart, specks and fragments removed, holes filled.

For two classes the network's class-1 probability says where objects are, not which pixel belongs to
which object. Object ids come from the predicted mask's 4-connected components (cut apart by a seeded
watershed where ``predict.watershed_seeds`` asks for it) or, for a network with the boundary class
(``unet.boundary_class``), from the objects' insides: each connected inside (or inside probability of at least
``predict.watershed_seeds``) is a seed, and the seeds
grow over the predicted foreground (inside and border) by a watershed on the inside probability, so
that objects that touch come apart along their borders. ``ObjectRules`` then remove objects smaller
than ``min_size`` pixels (the specks and fragments of a noisy prediction) and fill the holes inside
objects; the run's plan decides them (``predict.min_object_size: auto`` learns the size from the training
objects: ``plan.learnt_min_object_size``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage
from skimage import measure, segmentation


@dataclass(frozen=True)
class ObjectRules:
    """How objects are cleaned after they are found: ``min_size`` (pixels at the image's own size; smaller
    objects become background, 0 keeps all) and ``fill_holes`` (background enclosed by one object joins it)."""

    min_size: int = 0
    fill_holes: bool = False

    @property
    def active(self) -> bool:
        return self.min_size > 0 or self.fill_holes


def objects_from_boundary_probabilities(
    probabilities: np.ndarray, threshold: float = 0.5, min_seed_area: int = 0, seed_threshold: float | None = None
) -> np.ndarray:
    """(H, W) int32 object ids (0 = background) from (3, H, W) probabilities of background, object inside
    and object border. Foreground: inside + border >= ``threshold``; seeds: the 4-connected regions where
    the inside probability is >= ``seed_threshold`` (None: where the inside is the most probable class), of
    at least ``min_seed_area`` pixels; each seed floods the foreground downhill in inside probability, and
    foreground that no seed reaches is an object of its own. A seed threshold above the inside's usual
    share keeps apart the insides of clumped objects that meet where the network is unsure."""
    background, inside, border = probabilities
    foreground = inside + border >= threshold
    seeded = inside >= (np.maximum(background, border) if seed_threshold is None else seed_threshold)
    seeds = measure.label(foreground & seeded, connectivity=1)
    if min_seed_area > 0:
        too_small = np.bincount(seeds.ravel()) < min_seed_area
        too_small[0] = False
        seeds[too_small[seeds]] = 0
    unseeded = foreground & ~ndimage.binary_propagation(seeds > 0, mask=foreground)
    extra = measure.label(unseeded, connectivity=1)
    seeds = np.where(extra > 0, extra + seeds.max(), seeds)
    return segmentation.watershed(-inside, seeds, mask=foreground, connectivity=1).astype(np.int32)


def cleaned_objects(ids: np.ndarray, rules: ObjectRules) -> np.ndarray:
    """(H, W) int32 ``ids`` with holes filled and objects below ``rules.min_size`` removed, renumbered 1..n."""
    if rules.fill_holes:
        ids = filled_holes(ids)
    if rules.min_size > 0:
        small = np.bincount(ids.ravel()) < rules.min_size
        small[0] = False
        ids = np.where(small[ids], 0, ids)
    return segmentation.relabel_sequential(ids.astype(np.int32))[0]


def filled_holes(ids: np.ndarray) -> np.ndarray:
    """(H, W) ``ids`` whose enclosed background regions join the one object around each; a region enclosed
    by several objects (a gap where they meet) stays background."""
    holes = measure.label(ndimage.binary_fill_holes(ids > 0) & (ids == 0), connectivity=1)
    if holes.max() == 0:
        return ids
    # the ids of the pixels next to each hole: one id means one object around it
    ring = ndimage.grey_dilation(holes, footprint=ndimage.generate_binary_structure(ids.ndim, 1)) * (ids > 0)
    pairs = np.unique(np.stack([ring[ring > 0], ids[ring > 0]]), axis=1)
    hole_labels, counts = np.unique(pairs[0], return_counts=True)
    owner = np.zeros(holes.max() + 1, dtype=ids.dtype)
    single = hole_labels[counts == 1]
    owner[single] = pairs[1][np.isin(pairs[0], single)]
    return np.where(holes > 0, owner[holes], ids)
