"""The synthetic EM generator: deterministic, ISBI-like, not solvable by a threshold."""

import math

import numpy as np
import pytest
from scipy import ndimage
from skimage import measure

from segmentation.data.synthetic import synthetic_em, synthetic_em_set


def best_threshold_accuracy(image: np.ndarray, label: np.ndarray) -> float:
    """Best pixel accuracy of 'interior where image > t' over 200 thresholds."""
    thresholds = np.quantile(image, np.linspace(0.0, 1.0, 200))
    interior = label == 1
    return max(float(np.mean((image > t) == interior)) for t in thresholds)


def same_partition(a: np.ndarray, b: np.ndarray) -> bool:
    """True if the label images a and b differ only by a renaming of ids."""
    pairs = np.unique(np.stack([a.ravel(), b.ravel()]), axis=1)
    # A bijection between the ids pairs every id of a with exactly one of b.
    return pairs.shape[1] == np.unique(a).size == np.unique(b).size


@pytest.fixture(scope="module")
def em_256():
    return synthetic_em(256, np.random.default_rng(7))


# ---------------------------------------------------------------- synthetic_em


def test_synthetic_em_is_deterministic_given_the_seed():
    first = synthetic_em(64, np.random.default_rng(3))
    again = synthetic_em(64, np.random.default_rng(3))
    other = synthetic_em(64, np.random.default_rng(4))
    for a, b in zip(first, again):
        np.testing.assert_array_equal(a, b)
    assert not np.array_equal(first[0], other[0])
    assert not np.array_equal(first[1], other[1])


def test_synthetic_em_types_shapes_and_ranges(em_256):
    image, label, instances = em_256
    assert image.shape == label.shape == instances.shape == (256, 256)
    assert image.dtype == np.float32 and label.dtype == np.uint8 and instances.dtype == np.int32
    assert image.min() >= 0.0 and image.max() <= 1.0
    assert set(np.unique(label)) == {0, 1}
    assert image.std() > 0.05


def test_synthetic_em_instances_are_4_connected_components_of_interior(em_256):
    _, label, instances = em_256
    np.testing.assert_array_equal(instances == 0, label == 0)
    assert same_partition(instances, measure.label(label == 1, connectivity=1))
    # The comparison itself must notice two merged cells.
    merged = np.where(instances == 2, 1, instances)
    assert not same_partition(instances, merged)


def test_synthetic_em_membrane_fraction_is_isbi_like(em_256):
    _, label, _ = em_256
    assert 0.10 < np.mean(label == 0) < 0.40


@pytest.mark.parametrize("cell_diameter", [24.0, 32.0])
def test_synthetic_em_cell_count_matches_seed_density(cell_diameter):
    size = 256
    _, _, instances = synthetic_em(size, np.random.default_rng(11), cell_diameter)
    # Seeds lie on a jittered hexagonal lattice (one per sqrt(3)/2 d^2); the
    # cells cut by the border add about half a cell on each side.
    expected = (size + 0.5 * cell_diameter) ** 2 / (math.sqrt(3.0) / 2.0 * cell_diameter**2)
    assert 0.85 * expected < instances.max() < 1.25 * expected


def test_synthetic_em_is_not_solvable_by_a_threshold(em_256):
    image, label, _ = em_256
    assert image[label == 0].mean() < image[label == 1].mean() - 0.1
    accuracy = best_threshold_accuracy(image, label)
    # Better than always predicting "interior", but far from perfect.
    assert np.mean(label == 1) < accuracy < 0.95


def test_synthetic_em_has_dark_blobs_inside_cells(em_256):
    image, label, _ = em_256
    deep_inside = ndimage.distance_transform_edt(label) > 3
    smoothed = ndimage.gaussian_filter(image, 1.0)  # so that noise alone is not dark enough
    dark = smoothed[deep_inside] < np.median(image[label == 0])
    assert dark.mean() > 0.002


def test_synthetic_em_has_pixel_noise(em_256):
    image, label, _ = em_256
    deep_inside = ndimage.distance_transform_edt(label) > 3
    pairs = deep_inside[:, 1:] & deep_inside[:, :-1]
    # Robust (median absolute deviation) estimate of the std of white noise
    # from differences of horizontal neighbours inside smooth cell interiors.
    noise_std = np.median(np.abs(np.diff(image, axis=1)[pairs])) / 0.6745 / math.sqrt(2.0)
    assert 0.03 < noise_std < 0.1


def test_synthetic_em_set_images_do_not_depend_on_count():
    three = synthetic_em_set(3, 48, seed=5)
    five = synthetic_em_set(5, 48, seed=5)
    assert len(three) == 3 and len(five) == 5
    for small, large in zip(three, five):
        for a, b in zip(small, large):
            np.testing.assert_array_equal(a, b)
    assert not np.array_equal(five[0][0], five[1][0])


def test_touching_nuclei_touch_and_merge_in_a_binary_mask():
    from segmentation.data.readers import separation_lines
    from segmentation.data.synthetic import touching_nuclei

    image, ids = touching_nuclei(128, np.random.default_rng(3), spacing=22.0)
    assert image.dtype == np.float32 and image.min() >= 0 and image.max() <= 1 and ids.dtype == np.uint16
    count = len(np.unique(ids)) - 1
    merged = measure.label(ids > 0, connectivity=1).max()
    assert count > 20 and merged < 0.8 * count  # many nuclei touch: a 0/255 mask joins them
    assert separation_lines(ids.astype(np.int32)).sum() > 50
    assert image[ids > 0].mean() > image[ids == 0].mean() + 0.3  # bright nuclei on a dark background
