"""segmentation.inference.objects: objects grown from the boundary class, small ones removed, holes filled;
checked against scipy.ndimage and hand counts."""

import numpy as np
from scipy import ndimage
from skimage import draw, measure, segmentation

from segmentation.inference.objects import (
    ObjectRules,
    cleaned_objects,
    filled_holes,
    objects_from_boundary_probabilities,
)


def disc(shape: tuple[int, int], centre: tuple[int, int], radius: float) -> np.ndarray:
    mask = np.zeros(shape, bool)
    mask[draw.disk(centre, radius, shape=shape)] = True
    return mask


def test_holes_enclosed_by_one_object_are_filled_and_gaps_between_objects_are_not():
    ids = np.zeros((40, 60), np.int32)
    ring = disc(ids.shape, (20, 15), 10) & ~disc(ids.shape, (20, 15), 4)
    ids[ring] = 3
    # two objects that together enclose a pocket of background: neither encloses it alone
    ids[5:35, 32:40] = 5
    ids[5:35, 46:54] = 6
    ids[5:9, 40:46] = 5
    ids[31:35, 40:46] = 6
    filled = filled_holes(ids)
    hole = disc(ids.shape, (20, 15), 10) & ~ring
    assert hole.sum() > 40 and np.all(filled[hole] == 3)
    assert np.array_equal(filled == 3, ndimage.binary_fill_holes(ids == 3))  # as scipy fills that object alone
    pocket = np.zeros(ids.shape, bool)
    pocket[9:31, 40:46] = True
    assert np.all(filled[pocket] == 0) and np.array_equal(filled[~hole], ids[~hole])


def test_small_objects_are_removed_and_the_rest_renumbered():
    ids = np.zeros((30, 30), np.int32)
    ids[0:2, 0:2] = 9  # 4 px
    ids[10:13, 10:13] = 4  # 9 px
    ids[20:30, 20:30] = 7  # 100 px
    cleaned = cleaned_objects(ids, ObjectRules(min_size=9))
    assert sorted(np.unique(cleaned).tolist()) == [0, 1, 2]
    assert np.count_nonzero(cleaned) == 9 + 100 and cleaned[0, 0] == 0  # 9 px kept: "below" 9 goes
    assert measure.regionprops(cleaned)[0].area in (9, 100)
    assert np.array_equal(cleaned_objects(ids, ObjectRules()) > 0, ids > 0)  # no rule: only renumbered


def test_touching_objects_grow_from_their_insides_and_part_along_their_borders():
    shape = (40, 70)
    left, right = disc(shape, (20, 22), 12), disc(shape, (20, 42), 12)  # they overlap in a lens
    ids = np.zeros(shape, np.int32)
    ids[left] = 1
    ids[right & ~left] = 2
    assert measure.label(ids > 0, connectivity=1).max() == 1, "the two discs should touch"
    boundary = segmentation.find_boundaries(ids, mode="inner") & (ids > 0)
    probabilities = np.zeros((3, *shape), np.float32)
    probabilities[0] = ids == 0
    probabilities[1] = (ids > 0) & ~boundary
    probabilities[2] = boundary
    probabilities = 0.9 * probabilities + 0.1 / 3  # certain, not exact
    found = objects_from_boundary_probabilities(probabilities)
    assert np.array_equal(found > 0, ids > 0)  # the foreground is inside + border
    assert len(np.unique(found[found > 0])) == 2  # one object per disc, though they touch
    for true_id in (1, 2):
        values, counts = np.unique(found[ids == true_id], return_counts=True)
        assert counts.max() / counts.sum() > 0.95  # each disc is (almost all) one found object
    # a blob of border alone, with no inside to seed it, is an object of its own
    probabilities[:, 2:6, 2:6] = np.array([0.05, 0.05, 0.9])[:, None, None]
    assert len(np.unique(objects_from_boundary_probabilities(probabilities))) == 4
    # without seeds (none has min_seed_area pixels) the touching discs are one object, the blob another
    assert objects_from_boundary_probabilities(probabilities, min_seed_area=10_000).max() == 2


def test_a_seed_threshold_keeps_apart_insides_that_meet_where_the_network_is_unsure():
    # two 9 px squares of sure inside (0.9) joined by a 3 px neck where the inside is most probable but unsure (0.5)
    probabilities = np.zeros((3, 12, 25), np.float32)
    probabilities[0] = 1.0
    sure, neck = np.zeros((12, 25), bool), np.zeros((12, 25), bool)
    sure[1:10, 1:10] = sure[1:10, 15:24] = True
    neck[4:7, 10:15] = True
    probabilities[:, sure] = np.array([0.05, 0.9, 0.05])[:, None]
    probabilities[:, neck] = np.array([0.2, 0.5, 0.3])[:, None]
    default = objects_from_boundary_probabilities(probabilities)
    assert default.max() == 1 and np.count_nonzero(default) == 2 * 81 + 15  # one seed across the neck: merged
    found = objects_from_boundary_probabilities(probabilities, seed_threshold=0.6)
    assert found.max() == 2 and np.count_nonzero(found) == 2 * 81 + 15  # two seeds, the neck shared out
    left, right = np.unique(found[1:10, 1:10]), np.unique(found[1:10, 15:24])
    assert len(left) == 1 and len(right) == 1 and left[0] != right[0]
    # the neck floods from both sides: each square's object takes the neck columns next to it
    assert set(np.unique(found[neck])) == {1, 2}
